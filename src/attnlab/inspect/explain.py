"""``attnlab explain``: where one token looks, as tables, and the whole arithmetic of one head.

Choosing the query: by word (``--token it``; a word that occurs several times needs
``--occurrence``), by token index (``--token 7``), or by character offset in the text
(``--position 30``). A word made of several tokens is the mean of its pieces' rows.
"""

from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.table import Table

from attnlab.capture import Capture
from attnlab.errors import InputError
from attnlab.inspect.attention_map import AttentionMap


@dataclass(frozen=True)
class Query:
    """The token(s) whose attention is shown: one token, or the pieces of one word."""

    tokens: list[int]
    label: str


def token_listing(amap: AttentionMap, limit: int = 40) -> str:
    """'0 'The', 1 ' cat', …' for error messages."""
    listed = ", ".join(f"{i} {t!r}" for i, t in enumerate(amap.tokens[:limit]))
    return listed + (" …" if len(amap.tokens) > limit else "")


def character_spans(amap: AttentionMap) -> list[tuple[int, int] | None]:
    """Where each token's text lies in ``amap.text``: found in order, case-insensitively (BERT
    lowercases); None for special tokens and pieces that cannot be found (normalised accents)."""
    lowered = amap.text.lower()
    cursor = 0
    spans: list[tuple[int, int] | None] = []
    for text in amap.tokens:
        piece = text.removeprefix("##").strip().lower()
        found = lowered.find(piece, cursor) if piece else -1
        if found < 0 or (piece.startswith("<") and piece.endswith(">")) or piece.startswith("["):
            spans.append(None)
            continue
        spans.append((found, found + len(piece)))
        cursor = found + len(piece)
    return spans


def choose_query(amap: AttentionMap, *, token: str | None = None, position: int | None = None,
                 occurrence: int | None = None) -> Query:
    """The query named by ``token`` (a word or a token index) or ``position`` (a character offset)."""
    if (token is None) == (position is None):
        raise InputError("say which token to explain: --token WORD, --token INDEX or --position CHAR "
                         f"(tokens: {token_listing(amap)})")
    n = len(amap.tokens)
    if position is not None:
        if not 0 <= position < len(amap.text):
            raise InputError(f"position {position} is outside the text (0-{len(amap.text) - 1})")
        for index, span in enumerate(character_spans(amap)):
            if span is not None and span[0] <= position < span[1]:
                return Query([index], f"token {index} {amap.tokens[index]!r} (character {position})")
        raise InputError(f"no token covers character {position} ({amap.text[position]!r}, whitespace?); "
                         f"tokens: {token_listing(amap)}")
    if token.lstrip("-").isdigit():
        index = int(token)
        if not -n <= index < n:
            raise InputError(f"token index {index} is out of range: the text has {n} tokens "
                             f"({token_listing(amap)})")
        index %= n
        return Query([index], f"token {index} {amap.tokens[index]!r}")
    wanted = token.strip().lower()
    matches = [w for w, word in enumerate(amap.words) if word.lower() == wanted]
    if not matches:  # also accept the text of a single token ('ired')
        pieces = [i for i, t in enumerate(amap.tokens) if t.strip().lower() == wanted]
        if pieces:
            matches = [amap.word_of_token[i] for i in pieces]
    if not matches:
        raise InputError(f"{token!r} is not a word or token of the text; tokens: {token_listing(amap)}")
    if occurrence is None and len(matches) > 1:
        where = ", ".join(str(amap.tokens_of_word(w)[0]) for w in matches)
        raise InputError(f"{token!r} occurs {len(matches)} times (tokens {where}): choose one with "
                         f"--occurrence 1-{len(matches)} or --token INDEX")
    number = occurrence or 1
    if not 1 <= number <= len(matches):
        raise InputError(f"--occurrence {number}: {token!r} occurs {len(matches)} time(s)")
    word = matches[number - 1]
    tokens = amap.tokens_of_word(word)
    pieces = "" if len(tokens) == 1 else f", pieces {tokens} averaged"
    nth = f" (occurrence {number} of {len(matches)})" if len(matches) > 1 else ""
    return Query(tokens, f"word {amap.words[word]!r}{nth}, token {tokens[0]}{pieces}")


@dataclass(frozen=True)
class Explanation:
    """What the query attends to: mean weights over the chosen layers × heads, and the top heads.

    ``weights`` (K,) over keys (tokens, or words when ``words``); ``per_head`` (L', H', K) the same
    for every chosen (layer, head), from which the strongest heads per key are read.
    """

    query: Query
    keys: list[str]
    weights: torch.Tensor
    per_head: torch.Tensor
    layers: list[int]
    heads: list[int]
    words: bool
    visible: list[bool]  # False for keys the query cannot see (later tokens, in a decoder)

    def strongest_heads(self, key: int, top: int = 3) -> list[tuple[int, int, float]]:
        """The (layer, head, weight) that put the most weight on ``key``."""
        flat = self.per_head[..., key].flatten()
        best = flat.topk(min(top, flat.numel())).indices.tolist()
        n_heads = len(self.heads)
        return [(self.layers[i // n_heads], self.heads[i % n_heads], float(flat[i])) for i in best]

    def to_json(self) -> dict:
        return {
            "query": {"tokens": self.query.tokens, "label": self.query.label},
            "keys": self.keys,
            "unit": "word" if self.words else "token",
            "layers": self.layers,
            "heads": self.heads,
            "mean_weights": [round(float(w), 6) for w in self.weights],
            "strongest_heads": [[{"layer": layer, "head": head, "weight": round(weight, 6)}
                                 for layer, head, weight in self.strongest_heads(k)] for k in range(len(self.keys))],
        }


def explain(amap: AttentionMap, query: Query, *, layers: list[int] | None = None, heads: list[int] | None = None,
            words: bool = False) -> Explanation:
    """Weights of ``query`` over the keys, averaged over ``layers`` × ``heads`` (default: all held)."""
    layers = amap.layers if layers is None else layers
    heads = amap.heads if heads is None else heads
    probs = amap.probs[[amap.layer_index(layer) for layer in layers]][:, [amap.head_index(h) for h in heads]]
    if words:
        word = amap.word_of_token[query.tokens[0]]
        per_head = replace(amap, probs=probs, layers=layers, heads=heads).word_probs()[:, :, word]  # (L', H', W)
        keys = amap.words
        last_visible = amap.word_of_token[query.tokens[-1]]
    else:
        per_head = probs[:, :, query.tokens].mean(2)  # (L', H', T): mean over the query's pieces
        keys = amap.tokens
        last_visible = query.tokens[-1]
    visible = [not amap.causal or k <= last_visible for k in range(len(keys))]
    return Explanation(query, keys, per_head.mean((0, 1)), per_head, layers, heads, words, visible)


@dataclass(frozen=True)
class HeadArithmetic:
    """Every number of one head's attention for one query token, from the model's own forward pass.

    Shapes: x (d,), q_before_rope / q (hd,), k / v (i+1 or T, hd) for the keys the query sees,
    scores / scaled / masked / weights (same length), output (hd,), contribution (d,).
    """

    layer: int
    head: int
    kv_head: int
    query: int
    key_tokens: list[int]
    x: torch.Tensor
    q_before_rope: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    scale: float
    softcap: float | None
    masked: torch.Tensor
    weights: torch.Tensor
    output: torch.Tensor
    contribution: torch.Tensor
    uses_rope: bool
    qk_norm: bool
    q_bias: bool  # BERT, GPT-2: q = x·W_Q + b_Q
    check: dict[str, float]  # |Δ| between recomputing each step by hand and the model's captured value


    def to_json(self, decimals: int = 6) -> dict:
        def plain(t: torch.Tensor) -> list:
            return t.double().round(decimals=decimals).tolist()

        return {"layer": self.layer, "head": self.head, "kv_head": self.kv_head, "query": self.query,
                "key_tokens": self.key_tokens, "x": plain(self.x), "q_before_rope": plain(self.q_before_rope),
                "q": plain(self.q), "k": plain(self.k), "v": plain(self.v), "scores": plain(self.scores),
                "scale": self.scale, "softcap": self.softcap, "scaled_masked": plain(self.masked),
                "weights": plain(self.weights), "output": plain(self.output),
                "contribution": plain(self.contribution), "check_max_abs_diff": self.check}


@torch.inference_mode()
def head_arithmetic(lm, ids: list[int], layer: int, head: int, query: int) -> HeadArithmetic:
    """Capture one layer completely and lay out the arithmetic of ``head`` for token ``query``.

    Each step is recomputed here from the previous one, the way the formula reads, and compared with
    what the model computed (``check``): the numbers shown are the numbers the model used.
    """
    config = lm.config
    lm.check_layers_heads([layer], [head])
    capture = Capture(points=("input", "q", "k", "v", "scores", "masked_scores", "probs", "head_output",
                              "head_contrib"), layers=[layer])
    lm.model(torch.tensor([ids]), capture=capture, return_hidden=True)
    attention = lm.model.blocks[layer].attention
    kv_head = head // (config.n_heads // config.n_kv_heads)
    hd = config.head_dim
    x = capture.get("input", layer)[0, query]  # (d,)
    q_before_rope = torch.nn.functional.linear(x, attention.w_q.weight[head * hd:(head + 1) * hd],
                                               None if attention.w_q.bias is None
                                               else attention.w_q.bias[head * hd:(head + 1) * hd])
    q = capture.get("q", layer)[0, head, query]
    keys = capture.get("k", layer)[0, kv_head]  # (T, hd)
    values = capture.get("v", layer)[0, kv_head]
    masked_all = capture.get("masked_scores", layer)[0, head, query]
    seen = [j for j in range(len(ids)) if masked_all[j] > torch.finfo(masked_all.dtype).min / 2]
    k, v = keys[seen], values[seen]
    scores = k @ q  # q·k_j
    scaled = scores * attention.scale
    if attention.softcap is not None:
        scaled = attention.softcap * torch.tanh(scaled / attention.softcap)
    weights = torch.softmax(scaled, dim=-1)
    output = weights @ v  # Σ_j w_j·v_j
    w_o_head = attention.w_o.weight[:, head * hd:(head + 1) * hd]  # (d, hd): this head's slice of W_O
    contribution = w_o_head @ output
    check = {
        "q·k_j": float((scores - capture.get("scores", layer)[0, head, query, seen]).abs().max()),
        "softmax": float((weights - capture.get("probs", layer)[0, head, query, seen]).abs().max()),
        "Σ w_j·v_j": float((output - capture.get("head_output", layer)[0, head, query]).abs().max()),
        "W_O": float((contribution - capture.get("head_contrib", layer)[0, head, query]).abs().max()),
    }
    return HeadArithmetic(layer, head, kv_head, query, seen, x, q_before_rope, q, k, v, scores, attention.scale,
                          attention.softcap, masked_all[seen], weights, output, contribution,
                          config.positions == "rope", config.qk_norm, attention.w_q.bias is not None, check)


def _bar(weight: float, width: int = 20) -> str:
    filled = weight * width
    return "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")


def explanation_table(amap: AttentionMap, explanation: Explanation, top_heads: int = 3) -> Table:
    """Keys in text order with the mean weight, a bar, and the heads that weigh each key most."""
    where = _scope(explanation, amap)
    table = Table(title=f"{amap.model}: attention from {explanation.query.label}\n{where}")
    table.add_column("#", justify="right")
    table.add_column("word" if explanation.words else "token")
    table.add_column("weight", justify="right")
    table.add_column("")
    show_heads = explanation.per_head.shape[0] * explanation.per_head.shape[1] > 1  # not for a single head
    if show_heads:
        table.add_column("strongest heads (layer.head weight)")
    for key, label in enumerate(explanation.keys):
        if not explanation.visible[key]:
            continue
        weight = float(explanation.weights[key])
        heads = ", ".join(f"{layer}.{head} {w:.2f}" for layer, head, w in explanation.strongest_heads(key, top_heads))
        is_query = key in (explanation.query.tokens if not explanation.words
                           else [amap.word_of_token[explanation.query.tokens[0]]])
        row = [str(key), repr(label) + (" ◀ query" if is_query else ""), f"{weight:.3f}", _bar(weight)]
        table.add_row(*row, *([heads] if show_heads else []))
    return table


def _scope(explanation: Explanation, amap: AttentionMap) -> str:
    layers, heads = explanation.layers, explanation.heads
    layer_text = f"layer {layers[0]}" if len(layers) == 1 else f"mean over {len(layers)} layers"
    head_text = f"head {heads[0]}" if len(heads) == 1 else f"{len(heads)} heads"
    parts = [f"{layer_text}, {head_text}"]
    if explanation.words:
        parts.append("words: key pieces summed, query pieces averaged")
    if amap.sink_removed:
        parts.append(f"first token {amap.tokens[0]!r} (attention sink) set aside, rows renormalised")
    if amap.causal and not all(explanation.visible):
        parts.append("later tokens are masked (causal)")
    return "; ".join(parts)


def _vector(values: torch.Tensor, dims: int | None) -> str:
    shown = values if dims is None else values[:dims]
    text = " ".join(f"{float(v):+.3f}" for v in shown)
    return f"[{text}{' …' if dims is not None and len(values) > dims else ''}] ({len(values)} dims)"


def print_arithmetic(console: Console, arithmetic: HeadArithmetic, tokens: list[str], *, dims: int | None = 8,
                     n_heads: int, n_kv_heads: int) -> None:
    """The arithmetic of one head, step by step, as the formula reads."""
    a = arithmetic
    group = n_heads // n_kv_heads
    sharing = ""
    if n_kv_heads < n_heads:
        sharers = ", ".join(str(h) for h in range(a.kv_head * group, (a.kv_head + 1) * group))
        sharing = f" — grouped-query attention: query head {a.head} shares key/value head {a.kv_head} " \
                  f"with query heads {sharers}"
    hd = len(a.q)
    console.print(f"layer {a.layer}, head {a.head}, query token {a.query} {tokens[a.query]!r}{sharing}",
                  highlight=False, markup=False, style="bold")
    console.print(f"x  (normed input of token {a.query}) = {_vector(a.x, dims)}", highlight=False, markup=False)
    bias = f" + b_Q[head {a.head}]" if a.q_bias else ""
    console.print(f"q = x·W_Q[head {a.head}]{bias} = {_vector(a.q_before_rope, dims)}", highlight=False, markup=False)
    steps = []
    if a.qk_norm:
        steps.append("RMS-normalised (QK-norm)")
    if a.uses_rope:
        steps.append(f"rotated by RoPE for position {a.query}")
    if steps:
        console.print(f"q, {' and '.join(steps)} = {_vector(a.q, dims)}", highlight=False, markup=False)
    table = Table(title=f"scores and weights: softmax(q·k_j / √d_k + mask), d_k = {hd}, √d_k = {hd ** 0.5:.3f}"
                  + ("" if abs(a.scale - hd ** -0.5) < 1e-9 else f" (this model scales by {a.scale:.4f})")
                  + (f", soft-capped at {a.softcap}" if a.softcap else ""))
    for column in ("j", "key token", "k_j" + ("" if not a.uses_rope else " (after RoPE)"), "q·k_j", "× scale",
                   "weight w_j"):
        table.add_column(column, justify="right" if column not in ("key token", "k_j (after RoPE)", "k_j") else "left")
    for row, j in enumerate(a.key_tokens):
        table.add_row(str(j), repr(tokens[j]), _vector(a.k[row], min(dims or 4, 4)), f"{float(a.scores[row]):+.3f}",
                      f"{float(a.masked[row]):+.3f}", f"{float(a.weights[row]):.4f}")
    console.print(table)
    if len(a.key_tokens) < len(tokens):
        console.print(f"keys {sorted(set(range(len(tokens))) - set(a.key_tokens))} are masked (−∞ before softmax: "
                      "weight 0)", highlight=False, markup=False)
    console.print("output = Σ_j w_j·v_j = " + _vector(a.output, dims), highlight=False, markup=False)
    for row in a.weights.argsort(descending=True)[:3].tolist():
        j = a.key_tokens[row]
        console.print(f"   largest terms: w_{j} = {float(a.weights[row]):.4f} × v_{j} = {_vector(a.v[row], dims)}",
                      highlight=False, markup=False)
    console.print(f"contribution to the residual stream = output·W_O[head {a.head}]ᵀ = {_vector(a.contribution, dims)}",
                  highlight=False, markup=False)
    worst = max(a.check.values())
    console.print(f"check: each step recomputed here equals the model's own value (max |Δ| = {worst:.1e})",
                  highlight=False, markup=False)

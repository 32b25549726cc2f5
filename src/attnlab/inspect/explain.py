"""``attnlab explain``: where one token looks, as tables, and the whole arithmetic of one head.

Choosing the query: by word (``--token it``; a word that occurs several times needs
``--occurrence``), by token index (``--token 7``), or by character offset in the text
(``--position 30``). A word made of several tokens is the mean of its pieces' rows.
"""

import math
from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.table import Table

from attnlab.attention import attention_allowed, soft_cap
from attnlab.capture import Capture
from attnlab.errors import InputError
from attnlab.inspect.attention_map import AttentionMap
from attnlab.variants import LINEAR_EPS, MergedQKAttention, module_variant


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

    Shapes: x (d,), q_before_rope / q (hd, or d / r for merged-qk), k (keys the query sees, same
    width as q), v (keys the query sees, hd), scores / masked / weights (one per key seen), output (hd,),
    contribution (d,). ``masked`` is what the layer normalises: score·scale (soft-capped) for softmax
    and kernel, score·scale − log n for sigmoid, the score itself for linear attention.

    ``variant`` is the layer's own rule, read from its module and mask (``attnlab swap`` may have made
    it differ from the config): softmax, no-q/no-k/no-v, merged-qk:r|full, kernel, sigmoid, linear:φ;
    ``window`` the local mask's w, or None.
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
    variant: str = "softmax"
    window: int | None = None
    key_head: int | None = None  # which key head the query reads (None: kv_head; merged-qk keys differ)
    sigmoid_bias: float | None = None  # sigmoid's −log n
    head_dim: int | None = None

    def to_json(self, decimals: int = 6) -> dict:
        def plain(t: torch.Tensor) -> list:
            return t.double().round(decimals=decimals).tolist()

        return {"layer": self.layer, "head": self.head, "kv_head": self.kv_head, "query": self.query,
                "variant": self.variant, "window": self.window, "key_head": self.key_head,
                "key_tokens": self.key_tokens, "x": plain(self.x), "q_before_rope": plain(self.q_before_rope),
                "q": plain(self.q), "k": plain(self.k), "v": plain(self.v), "scores": plain(self.scores),
                "scale": self.scale, "softcap": self.softcap, "sigmoid_bias": self.sigmoid_bias,
                "scaled_masked": plain(self.masked), "weights": plain(self.weights), "output": plain(self.output),
                "contribution": plain(self.contribution), "check_max_abs_diff": self.check}


# What each variant's steps are called in the check (and the score column of the table).
SCORE_STEP = {"kernel": "−‖q−k_j‖²/2", "linear": "φ(q)·φ(k_j)"}
WEIGHT_STEP = {"sigmoid": "σ", "linear": "φ(q)·φ(k_j) / Σ_l"}


def _head_slice(t: torch.Tensor, head: int, width: int) -> torch.Tensor:
    """Columns head·width … (head+1)·width − 1 of the last dimension: what no-q/no-k/no-v take from x."""
    return t[..., head * width:(head + 1) * width]


def _query_projection(attention, x: torch.Tensor, head: int, hd: int) -> torch.Tensor:
    """x·W_Q[head] (+ b_Q), x's head slice (no-q), or x·W_QK[head] / x·L[head] (merged-qk)."""
    if isinstance(attention, MergedQKAttention):
        return x @ (attention.w_qk[head] if attention.rank is None else attention.w_qk_left[head])
    if isinstance(attention.w_q, torch.nn.Identity):
        return _head_slice(x, head, hd)
    return torch.nn.functional.linear(x, _head_slice(attention.w_q.weight.T, head, hd).T,
                                      None if attention.w_q.bias is None else _head_slice(attention.w_q.bias, head, hd))


def _weigh(attention, name: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score_j, what is normalised, w_j) for one query over the keys it sees, as the variant defines them."""
    if name == "linear":  # w_j = φ(q)·φ(k_j) / Σ_l φ(q)·φ(k_l): no scale, no exponential
        scores = attention.feature_map(k) @ attention.feature_map(q)
        return scores, scores, scores / (scores.sum() + LINEAR_EPS)
    scores = -0.5 * ((k - q) ** 2).sum(-1) if name == "kernel" else k @ q  # −‖q − k_j‖²/2, or q·k_j
    scaled = soft_cap(scores * attention.scale, attention.softcap)
    if name == "sigmoid":  # σ(q·k_j·scale − log n), each key on its own
        scaled = scaled + attention.bias
        return scores, scaled, torch.sigmoid(scaled)
    return scores, scaled, torch.softmax(scaled, dim=-1)


@torch.inference_mode()
def head_arithmetic(lm, ids: list[int], layer: int, head: int, query: int) -> HeadArithmetic:
    """Capture one layer completely and lay out the arithmetic of ``head`` for token ``query``.

    Each step is recomputed here from the previous one, the way the formula of the layer's variant
    reads, and compared with what the model computed (``check``): the numbers shown are the numbers
    the model used. Which keys the query sees comes from the layer's mask (causal, local window), not
    from recorded scores: linear attention records no masked scores.
    """
    config, model = lm.config, lm.model
    lm.check_layers_heads([layer], [head])
    capture = Capture(points=("input", "q", "k", "v", "scores", "probs", "head_output", "head_contrib"),
                      layers=[layer])
    model(torch.tensor([ids]), capture=capture, return_hidden=True)
    attention = model.blocks[layer].attention
    name = module_variant(attention).name
    window = model.local_window if model.layer_kinds[layer][1] == "local" else None
    kv_head = head // (config.n_heads // config.n_kv_heads)
    key_head = head // (config.n_heads // attention.key_heads)
    hd = config.head_dim
    inputs = capture.get("input", layer)[0]  # (T, d)
    x = inputs[query]
    q_before_rope = _query_projection(attention, x, head, hd)
    q = capture.get("q", layer)[0, head, query]
    positions = torch.arange(len(ids))
    allowed = attention_allowed(positions[query:query + 1], positions, causal=config.causal, sliding_window=window)
    seen = allowed[0, 0, 0].nonzero().flatten().tolist()
    k, v = capture.get("k", layer)[0, key_head, seen], capture.get("v", layer)[0, kv_head, seen]
    scores, masked, weights = _weigh(attention, name, q, k)
    output = weights @ v  # Σ_j w_j·v_j
    w_o_head = _head_slice(attention.w_o.weight, head, hd)  # (d, hd): this head's slice of W_O
    contribution = w_o_head @ output

    def diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
        return float((ours - theirs).abs().max())

    check = {}
    position_free = config.positions != "rope" and not config.qk_norm  # q, k as projected, not rotated
    if name == "merged-qk" or (name == "no-q" and position_free):
        check["q = " + ("x·W_QK" if name == "merged-qk" else "x slice")] = diff(q_before_rope, q)
    if name == "merged-qk":
        keys = inputs[seen] if attention.rank is None else inputs[seen] @ attention.w_qk_right[head]
        check["k_j = x_j" + ("" if attention.rank is None else "·R")] = diff(keys, k)
    if name == "no-k" and position_free:
        check["k_j = x_j slice"] = diff(_head_slice(inputs[seen], kv_head, hd), k)
    if name == "no-v":
        check["v_j = x_j slice"] = diff(_head_slice(inputs[seen], kv_head, hd), v)
    check |= {
        SCORE_STEP.get(name, "q·k_j"): diff(scores, capture.get("scores", layer)[0, head, query, seen]),
        WEIGHT_STEP.get(name, "softmax"): diff(weights, capture.get("probs", layer)[0, head, query, seen]),
        "Σ w_j·v_j": diff(output, capture.get("head_output", layer)[0, head, query]),
        "W_O": diff(contribution, capture.get("head_contrib", layer)[0, head, query]),
    }
    q_bias = isinstance(getattr(attention, "w_q", None), torch.nn.Linear) and attention.w_q.bias is not None
    return HeadArithmetic(layer, head, kv_head, query, seen, x, q_before_rope, q, k, v, scores, attention.scale,
                          attention.softcap, masked, weights, output, contribution, config.positions == "rope",
                          config.qk_norm, q_bias, check, variant=str(module_variant(attention)), window=window,
                          key_head=key_head, sigmoid_bias=getattr(attention, "bias", None) if name == "sigmoid"
                          else None, head_dim=hd)


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


def _projection_lines(a: HeadArithmetic, hd: int) -> tuple[str, list[str]]:
    """How q is made (the line's left side), and lines saying how k and v are made where a variant changes them."""
    name, rank = a.variant.partition(":")[0], a.variant.partition(":")[2]
    h, kv = a.head, a.kv_head
    if name == "merged-qk" and rank == "full":
        return (f"q = x·W_QK[head {h}] (merged-qk: one learned d×d matrix per head, score_j = x·W_QK·x_jᵀ)",
                ["k_j = x_j itself (merged-qk: the key is the input, shared by every head)"])
    if name == "merged-qk":
        return (f"q = x·L[head {h}] (merged-qk rank {rank}: W_QK = L·Rᵀ)", [f"k_j = x_j·R[head {h}]"])
    if name == "no-q":
        return f"q = x[{h * hd}:{(h + 1) * hd}] (no-q: the query is x's slice for head {h}, no W_Q)", []
    lines = {"no-k": [f"k_j = x_j[{kv * hd}:{(kv + 1) * hd}] (no-k: the key is x_j's slice for key/value head {kv}, "
                      "no W_K)"],
             "no-v": [f"v_j = x_j[{kv * hd}:{(kv + 1) * hd}] (no-v: the value is x_j's slice for key/value head {kv}, "
                      "no W_V)"]}.get(name, [])
    return f"q = x·W_Q[head {h}]" + (f" + b_Q[head {h}]" if a.q_bias else ""), lines


def _weights_formula(a: HeadArithmetic, hd: int) -> tuple[str, str | None]:
    """The table's title, and for a variant other than softmax the line with its formula and constants
    (printed whole above the table: a title would wrap at the table's width)."""
    name = a.variant.partition(":")[0]
    scaled = "" if abs(a.scale - hd ** -0.5) < 1e-9 else f" (this model scales by {a.scale:.4f})"
    capped = f", soft-capped at {a.softcap}" if a.softcap else ""
    window = "" if a.window is None else f"; sliding window: only the {a.window} most recent keys"
    if name == "kernel":
        formula = (f"Gaussian kernel: score_j = −‖q − k_j‖²/2, w_j = softmax(score_j / √d_k + mask) "
                   f"∝ exp(−‖q − k_j‖²/(2√d_k)), d_k = {hd}, √d_k = {hd ** 0.5:.3f}{scaled}{capped}{window}")
    elif name == "sigmoid":
        formula = (f"sigmoid: w_j = σ(q·k_j / √d_k − log n), n = {math.exp(-a.sigmoid_bias):.0f} (context length), "
                   f"d_k = {hd}: each key on its own, Σ_j w_j = {float(a.weights.sum()):.3f} (need not be 1)"
                   f"{scaled}{capped}{window}")
    elif name == "linear":
        phi = {"elu": "elu(t) + 1", "relu": "relu(t)"}[a.variant.partition(":")[2]]
        formula = (f"linear attention: w_j = φ(q)·φ(k_j) / Σ_l φ(q)·φ(k_l), φ(t) = {phi}; no scale, no softmax; "
                   f"Σ_l φ(q)·φ(k_l) = {float(a.scores.sum()):.4g}{window}")
    else:  # softmax, also for the projection variants
        return (f"scores and weights: softmax(q·k_j / √d_k + mask), d_k = {hd}, √d_k = {hd ** 0.5:.3f}"
                + scaled + capped + window), None
    return f"scores and weights ({a.variant})", formula


def print_arithmetic(console: Console, arithmetic: HeadArithmetic, tokens: list[str], *, dims: int | None = 8,
                     n_heads: int, n_kv_heads: int) -> None:
    """The arithmetic of one head, step by step, as the formula of its variant reads."""
    a = arithmetic
    name = a.variant.partition(":")[0]
    group = n_heads // n_kv_heads
    sharing = ""
    if n_kv_heads < n_heads:
        sharers = ", ".join(str(h) for h in range(a.kv_head * group, (a.kv_head + 1) * group))
        sharing = f" — grouped-query attention: query head {a.head} shares key/value head {a.kv_head} " \
                  f"with query heads {sharers}"
    hd = a.head_dim or len(a.v[0])
    variant = "" if name == "softmax" else f" — attention variant {a.variant}"
    console.print(f"layer {a.layer}, head {a.head}, query token {a.query} {tokens[a.query]!r}{sharing}{variant}",
                  highlight=False, markup=False, style="bold")
    console.print(f"x  (normed input of token {a.query}) = {_vector(a.x, dims)}", highlight=False, markup=False)
    q_text, other_lines = _projection_lines(a, hd)
    console.print(f"{q_text} = {_vector(a.q_before_rope, dims)}", highlight=False, markup=False)
    for line in other_lines:
        console.print(line, highlight=False, markup=False)
    steps = []
    if a.qk_norm:
        steps.append("RMS-normalised (QK-norm)")
    if a.uses_rope:
        steps.append(f"rotated by RoPE for position {a.query}")
    if steps:
        console.print(f"q, {' and '.join(steps)} = {_vector(a.q, dims)}", highlight=False, markup=False)
    title, formula = _weights_formula(a, hd)
    if formula is not None:
        console.print(formula, highlight=False, markup=False, soft_wrap=True)
    table = Table(title=title)
    score_column = SCORE_STEP.get(name, "q·k_j")
    scaled_column = {"sigmoid": "× scale − log n", "linear": None}.get(name, "× scale")
    columns = ["j", "key token", "k_j" + ("" if not a.uses_rope else " (after RoPE)"), score_column, scaled_column,
               "weight w_j"]
    for column in columns:
        if column is not None:
            table.add_column(column, justify="left" if column in ("key token", columns[2]) else "right")
    for row, j in enumerate(a.key_tokens):
        cells = [str(j), repr(tokens[j]), _vector(a.k[row], min(dims or 4, 4)), f"{float(a.scores[row]):+.3f}"]
        cells += [] if scaled_column is None else [f"{float(a.masked[row]):+.3f}"]
        table.add_row(*cells, f"{float(a.weights[row]):.4f}")
    console.print(table)
    if len(a.key_tokens) < len(tokens):
        zero = {"sigmoid": "σ(−∞) = 0", "linear": "left out of both sums"}.get(name, "−∞ before softmax")
        outside = "" if a.window is None else f", or {a.window} or more tokens back (outside the window)"
        console.print(f"keys {sorted(set(range(len(tokens))) - set(a.key_tokens))} are masked ({zero}: weight 0)"
                      + (f" — later than the query{outside}" if outside else ""), highlight=False, markup=False)
    console.print("output = Σ_j w_j·v_j = " + _vector(a.output, dims), highlight=False, markup=False)
    for row in a.weights.argsort(descending=True)[:3].tolist():
        j = a.key_tokens[row]
        console.print(f"   largest terms: w_{j} = {float(a.weights[row]):.4f} × v_{j} = {_vector(a.v[row], dims)}",
                      highlight=False, markup=False)
    console.print(f"contribution to the residual stream = output·W_O[head {a.head}]ᵀ = {_vector(a.contribution, dims)}",
                  highlight=False, markup=False)
    worst = max(a.check.values())
    steps = "" if name == "softmax" else f" ({', '.join(a.check)})"
    console.print(f"check: each step recomputed here equals the model's own value{steps} (max |Δ| = {worst:.1e})",
                  highlight=False, markup=False)

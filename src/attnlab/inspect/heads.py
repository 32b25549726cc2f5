"""Head roles: what each attention head does, measured from the attention it computes.

Every score is a weight or a normalised entropy, so it lies in [0, 1]; all come from
``LanguageModel.attention`` (the model's own forward pass). For query *i*, *p(i, j)* is the weight it
gives key *j*.

**Position scores** are measured on one natural English paragraph (``DEFAULT_TEXT``, or your text),
averaged over the queries *i* ≥ 9 (and, for encoders, *i* < T − 9), so that the band below never
reaches the first token and every query has a real choice of keys. The text must have at least 48
tokens (the default has about 80): on shorter ones a head that spreads its weight evenly would put
7/(i + 1) of it in the local band by chance and read as local.

- ``previous``: p(i, i−1), the token just before.
- ``next`` (encoders only, where the future is visible): p(i, i+1).
- ``current``: p(i, i), the query itself.
- ``first``: p(i, 0), the first token, the usual "attention sink" (BOS, ``[CLS]``, or the first word).
- ``local``: Σ p(i, j) over 2 ≤ i − j ≤ 8, the few tokens behind, *excluding* the previous one so that a
  previous-token head does not also count as local (encoders: 2 ≤ |i − j| ≤ 8, both sides).
- ``broad``: H(p(i, ·)) / log n(i), the entropy of the row over the n(i) keys the query may see (i + 1 in a
  decoder, T in an encoder; sliding-window layers are still normalised by all of them): 1 is uniform,
  0 is one key.

**Induction** (Olsson et al., 2022) is measured on ``n_sequences`` sequences of ``half_length`` random
ordinary tokens (letters in their text, no special tokens, distinct within a sequence, seeded) repeated
twice, ``[BOS] r1 … rn r1 … rn`` (BOS only if the tokenizer has one). A query in the second half at
position *i* holds a token whose earlier copy sits at i − n; an induction head looks at the token that
followed that copy, i − n + 1. ``induction`` is p(i, i − n + 1) averaged over the second half. The
definitions are the same for encoders (which may also look ahead); the score then says how much of
the row goes to that one key.

**Role.** A head's role is decided in this order:

1. ``induction`` if its induction score ≥ 0.3. It comes first because it is measured on inputs made to
   trigger it, and induction heads park on the first token when nothing repeats, so on the paragraph
   they would otherwise read as sink heads.
2. Else the position role (previous, next, current, first, local) with the highest score, if ≥ 0.4.
3. Else ``broad`` if the normalised entropy ≥ 0.7: weight spread over the whole context.
4. Else ``mixed``: no single pattern carries the head.
"""

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnlab.errors import InputError
from attnlab.tokenizer import Tokenizer

if TYPE_CHECKING:  # lm.py may one day offer head roles itself: no import cycle at run time
    from attnlab.lm import LanguageModel

DEFAULT_TEXT = (
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. From the top "
    "he could see the fishing boats returning to the harbour, their sails bright against the darkening "
    "sea. He had done this for forty years, and he knew every rock on the coast by name. When the storms "
    "came in winter, he stayed awake all night, listening to the wind and watching for ships in trouble."
)

FIRST_QUERY = 9  # queries before this are skipped: the local band (up to 8 behind) must not reach token 0
MIN_TOKENS = 48  # below this a uniform head puts ≥ 0.3 of its weight in the local band by chance alone
LOCAL_BAND = (2, 8)  # distances i − j counted as "local"
POSITION_ROLES = ("previous", "next", "current", "first", "local")
THRESHOLDS = {"induction": 0.3, **dict.fromkeys(POSITION_ROLES, 0.4), "broad": 0.7}
MIXED = "mixed"
ROLE_COLOURS = {"previous": "#4c72b0", "next": "#64b5cd", "current": "#55a868", "first": "#8c8c8c",
                "local": "#dd8452", "induction": "#c44e52", "broad": "#8172b3", MIXED: "#eeeeee"}


def pattern_scores(probs: torch.Tensor, *, causal: bool) -> dict[str, torch.Tensor]:
    """Position scores and ``broad`` of every head, each (L, H), from probs (L, H, T, T) of one text."""
    n_tokens = probs.shape[-1]
    if n_tokens < MIN_TOKENS:
        raise InputError(f"the text is {n_tokens} tokens; head scores need at least {MIN_TOKENS}: give a longer text")
    queries = torch.arange(FIRST_QUERY, n_tokens - (0 if causal else FIRST_QUERY))
    rows = probs[:, :, queries]  # (L, H, Q, T)
    keys = torch.arange(n_tokens)
    distance = queries[:, None] - keys[None, :]  # (Q, T): i − j
    reach = distance if causal else distance.abs()

    def weight_on(selected: torch.Tensor) -> torch.Tensor:
        """Mean over queries of the weight on the keys where ``selected`` (Q, T) is True."""
        return (rows * selected).sum(-1).mean(-1)

    scores = {"previous": weight_on(distance == 1)}
    if not causal:
        scores["next"] = weight_on(distance == -1)
    scores["current"] = weight_on(distance == 0)
    scores["first"] = weight_on((keys == 0).expand_as(distance))
    scores["local"] = weight_on((reach >= LOCAL_BAND[0]) & (reach <= LOCAL_BAND[1]))
    n_visible = (distance >= 0).sum(-1) if causal else torch.full((len(queries),), n_tokens)  # (Q,)
    entropy = -(rows * rows.clamp_min(1e-30).log()).sum(-1)  # (L, H, Q)
    scores["broad"] = (entropy / n_visible.float().log()).mean(-1).clamp(0.0, 1.0)
    return scores


def induction_scores(probs: torch.Tensor, half_length: int, offset: int) -> torch.Tensor:
    """(L, H): mean over second-half queries i of p(i, i − n + 1), for probs (L, H, T, T) of
    ``offset`` prefix tokens followed by n = ``half_length`` random tokens repeated twice."""
    queries = torch.arange(offset + half_length, offset + 2 * half_length)
    return probs[:, :, queries, queries - half_length + 1].mean(-1)


def repeated_random_sequences(tokenizer: Tokenizer, vocab_size: int, *, n_sequences: int, half_length: int,
                              seed: int) -> list[list[int]]:
    """``[BOS] r1 … rn r1 … rn`` with distinct ordinary tokens r (module docstring), reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    sequences = []
    for _ in range(n_sequences):
        half: list[int] = []
        for token_id in torch.randperm(vocab_size, generator=generator).tolist():
            if _is_ordinary(tokenizer, token_id):
                half.append(token_id)
                if len(half) == half_length:
                    break
        if len(half) < half_length:
            raise InputError(f"the vocabulary has only {len(half)} ordinary tokens (with letters, not special); "
                             f"half_length {half_length} needs that many distinct ones: lower it")
        sequences.append(prefix + half + half)
    return sequences


def _is_ordinary(tokenizer: Tokenizer, token_id: int) -> bool:
    """A token with letters in its text that is not a control token: rules out byte pieces and markup."""
    return not tokenizer.is_special(token_id) and any(c.isalpha() for c in tokenizer.decode([token_id]))


def assign_role(scores: dict[str, float]) -> str:
    """The role of one head from its scores, by the ordered rule of the module docstring."""
    if scores["induction"] >= THRESHOLDS["induction"]:
        return "induction"
    position = {role: scores[role] for role in POSITION_ROLES if role in scores}
    best = max(position, key=position.__getitem__)
    if position[best] >= THRESHOLDS[best]:
        return best
    return "broad" if scores["broad"] >= THRESHOLDS["broad"] else MIXED


@dataclass(frozen=True)
class HeadScores:
    """Scores (layers, heads, roles) of every head, the role given to each, and how they were measured."""

    model: str
    roles: tuple[str, ...]  # the score columns, in order
    scores: torch.Tensor  # (L, H, R)
    head_roles: list[list[str]]  # [layer][head]: a name from ``roles`` or "mixed"
    settings: dict[str, Any]

    def score(self, layer: int, head: int, role: str) -> float:
        return float(self.scores[layer, head, self.roles.index(role)])

    def heads_with(self, role: str) -> list[tuple[int, int]]:
        """(layer, head) of every head given ``role``, in model order."""
        return [(layer, head) for layer, row in enumerate(self.head_roles) for head, name in enumerate(row)
                if name == role]

    def counts(self) -> dict[str, int]:
        """Number of heads per role (roles no head has included, with 0), ``mixed`` last."""
        found = Counter(name for row in self.head_roles for name in row)
        return {name: found[name] for name in (*self.roles, MIXED)}

    def to_json(self, decimals: int = 4) -> dict:
        return {
            "model": self.model,
            "roles": list(self.roles),
            "scores_axes": ["layer", "head", "role"],
            "scores": self.scores.double().round(decimals=decimals).tolist(),
            "head_roles": self.head_roles,
            "counts": self.counts(),
            "thresholds": {role: THRESHOLDS[role] for role in self.roles},
            "settings": self.settings,
        }

    def _ranked_heads(self, top: int | None) -> list[tuple[int, int]]:
        """All heads in model order, or for each role its ``top`` heads with the highest score for it."""
        every = [(layer, head) for layer in range(self.scores.shape[0]) for head in range(self.scores.shape[1])]
        if top is None:
            return every
        chosen = []
        for role in self.roles:
            members = [(layer, head) for layer, head in every if self.head_roles[layer][head] == role]
            chosen += sorted(members, key=lambda lh: -self.score(*lh, role))[:top]
        return chosen

    def table(self, top: int | None = None):
        """A rich Table: layer, head, role, every score to 2 decimals (the role's own in bold).

        ``top``: for each role, only its ``top`` heads with the highest score for that role.
        """
        from rich.table import Table

        title = f"Head roles of {self.model}" + ("" if top is None else f" (the {top} strongest heads of each role)")
        table = Table(title=title)
        for name in ("layer", "head", "role"):
            table.add_column(name, justify="left" if name == "role" else "right")
        for role in self.roles:
            table.add_column(role, justify="right")
        for layer, head in self._ranked_heads(top):
            role = self.head_roles[layer][head]
            cells = [f"[bold]{value:.2f}[/bold]" if name == role else f"{value:.2f}"
                     for name, value in zip(self.roles, self.scores[layer, head].tolist())]
            table.add_row(str(layer), str(head), role, *cells)
        return table

    def plot(self):
        """Figure: layers × heads grid coloured by role, the role's score written in each cell, a legend."""
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        from attnlab.inspect.plots import new_figure

        n_layers, n_heads = self.scores.shape[:2]
        names = [*self.roles, MIXED]
        colours = [ROLE_COLOURS[name] for name in names]
        grid = torch.tensor([[names.index(name) for name in row] for row in self.head_roles])
        fig = new_figure(2.6 + 0.55 * n_heads, 1.4 + 0.3 * n_layers)
        ax = fig.add_subplot()
        ax.imshow(grid.numpy(), cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto",
                  interpolation="nearest")
        for layer in range(n_layers):
            for head in range(n_heads):
                role = self.head_roles[layer][head]
                if role != MIXED:
                    ax.text(head, layer, f"{self.score(layer, head, role):.2f}", ha="center", va="center",
                            fontsize=6, color="white")
        ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=7)
        ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"Head roles of {self.model}\n(cell: the score of the head's role)", fontsize=9)
        counts = self.counts()
        handles = [Patch(color=colour, label=f"{name} ({counts[name]})") for name, colour in zip(names, colours)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
        return fig


def score_heads(lm: "LanguageModel", *, text: str | None = None, seed: int = 0, n_sequences: int = 4,
                half_length: int = 32) -> HeadScores:
    """Score every head of ``lm`` for each role and give it one (module docstring for the method)."""
    if n_sequences < 1 or half_length < 2:
        raise InputError(f"n_sequences must be ≥ 1 and half_length ≥ 2 (got {n_sequences} and {half_length})")
    causal = lm.config.causal
    text = DEFAULT_TEXT if text is None else text
    by_role = pattern_scores(lm.attention(text).probs, causal=causal)

    vocab_size = min(lm.config.vocab_size, lm.tokenizer.vocab_size)
    sequences = repeated_random_sequences(lm.tokenizer, vocab_size, n_sequences=n_sequences,
                                          half_length=half_length, seed=seed)
    offset = len(sequences[0]) - 2 * half_length  # the BOS, if any
    by_role["induction"] = torch.stack([induction_scores(lm.attention(ids).probs, half_length, offset)
                                        for ids in sequences]).mean(0)

    roles = tuple(role for role in (*POSITION_ROLES, "induction", "broad") if role in by_role)
    scores = torch.stack([by_role[role] for role in roles], dim=-1)  # (L, H, R)
    head_roles = [[assign_role(dict(zip(roles, scores[layer, head].tolist()))) for head in range(scores.shape[1])]
                  for layer in range(scores.shape[0])]
    settings = {"text": text, "seed": seed, "n_sequences": n_sequences, "half_length": half_length,
                "first_query": FIRST_QUERY, "local_band": list(LOCAL_BAND), "causal": causal,
                "bos_prefix": offset == 1}
    return HeadScores(model=lm.name, roles=roles, scores=scores, head_roles=head_roles, settings=settings)

"""Opt-in capture of attention internals, addressed by (point, layer).

Capture points recorded by :class:`attnlab.attention.MultiHeadAttention` (B = batch,
H = query heads, H_kv = key/value heads, Tq = queries, Tk = keys, hd = head_dim, d = d_model):

============== ======================= ==========================================================
point          shape                   meaning
============== ======================= ==========================================================
input          (B, Tq, d)              the (normed) residual stream entering attention: x
q              (B, H, Tq, hd)          queries x·W_Q (+ b), after QK-norm and RoPE
k              (B, H_kv, Tk, hd)       keys, after QK-norm and RoPE (cached keys included)
v              (B, H_kv, Tk, hd)       values
scores         (B, H, Tq, Tk)          raw dot products q·k
masked_scores  (B, H, Tq, Tk)          scores·scale (soft-capped if the model does), mask added
probs          (B, H, Tq, Tk)          softmax of masked_scores: the attention pattern
head_output    (B, H, Tq, hd)          Σ_j probs_j · v_j per head
head_contrib   (B, H, Tq, d)           each head's output after its slice of W_O (sum + b_O = output)
============== ======================= ==========================================================

A layer the capture does not ask for runs the fast fused path and records nothing, so capture
costs nothing when off and only the chosen layers' memory when on.
"""

from collections.abc import Iterable

import torch

CAPTURE_POINTS: tuple[str, ...] = (
    "input", "q", "k", "v", "scores", "masked_scores", "probs", "head_output", "head_contrib",
)

QUERY_HEAD_POINTS = frozenset({"q", "scores", "masked_scores", "probs", "head_output", "head_contrib"})


class Capture:
    """Which points of which layers to record, and the recorded tensors (detached)."""

    def __init__(self, points: Iterable[str] = ("probs",), layers: Iterable[int] | None = None,
                 heads: Iterable[int] | None = None) -> None:
        """``layers`` / ``heads`` (query heads) limit what is kept; None keeps all. Points with a
        query-head axis keep only ``heads`` (in the order given); input, k and v are kept whole."""
        self.points = frozenset(points)
        unknown = sorted(self.points - set(CAPTURE_POINTS))
        if unknown:
            raise ValueError(f"unknown capture points {unknown}; valid: {', '.join(CAPTURE_POINTS)}")
        self.layers = None if layers is None else frozenset(layers)
        self.heads = None if heads is None else list(heads)
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}

    def wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def record(self, point: str, layer: int, tensor: torch.Tensor) -> None:
        if point in self.points:
            if self.heads is not None and point in QUERY_HEAD_POINTS:
                tensor = tensor[:, self.heads]
            self.tensors[(point, layer)] = tensor.detach()

    def get(self, point: str, layer: int) -> torch.Tensor:
        key = (point, layer)
        if key not in self.tensors:
            raise KeyError(f"capture point {point!r} of layer {layer} was not recorded")
        return self.tensors[key]

    def stacked(self, point: str) -> torch.Tensor:
        """One point of every recorded layer stacked on a new leading layer axis."""
        layers = sorted(layer for (name, layer) in self.tensors if name == point)
        return torch.stack([self.tensors[(point, layer)] for layer in layers])

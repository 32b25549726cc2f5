"""Attention: the one place where softmax(QKᵀ/√d_k + M)·V is computed for every model.

Reading order: masks → the explicit reference formula → the fused fast path → the multi-head
module that projects q, k, v, applies QK-norm and RoPE, reads/writes the KV cache, and picks a
path. Everything that consumes attention (generation, inspection, training) goes through here.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.kv_cache import KVCache
from attnlab.layers import RMSNorm
from attnlab.positions import apply_rope


def attention_allowed(query_positions: torch.Tensor, key_positions: torch.Tensor, *, causal: bool,
                      sliding_window: int | None = None,
                      key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B|1, 1, Tq, Tk) mask: True where query i may attend to key j.

    causal: j ≤ i (a token never sees the future). sliding window w: i − j < w (only the w most
    recent tokens, itself included). key_padding (B, Tk): False marks padding keys nobody may see.
    """
    allowed = torch.ones(len(query_positions), len(key_positions), dtype=torch.bool,
                         device=query_positions.device)
    distance = query_positions[:, None] - key_positions[None, :]  # (Tq, Tk): i − j
    if causal:
        allowed &= distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
        if not causal:
            allowed &= distance > -sliding_window
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the most negative finite value elsewhere.

    Finite rather than −∞ so that a row with nothing allowed (a padding query) gives a harmless
    uniform softmax instead of NaN.
    """
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


class AttentionMask:
    """What queries may attend to, built once per forward pass and shared by the layers of a kind.

    The boolean and additive tensors are made only when a path needs them: the fast path on a
    fresh causal prefill (``is_plain_causal``) or a single decode step that sees every cached key
    (``sees_everything``) needs no mask tensor at all.
    """

    def __init__(self, query_positions: torch.Tensor, n_keys: int, *, causal: bool,
                 sliding_window: int | None = None, key_padding: torch.Tensor | None = None,
                 last_query_position: int | None = None) -> None:
        self.query_positions = query_positions
        self.n_keys = n_keys
        self.causal = causal
        self.sliding_window = sliding_window
        self.key_padding = key_padding
        n_queries = len(query_positions)
        simple = sliding_window is None and key_padding is None
        self.is_plain_causal = simple and causal and n_queries == n_keys
        if last_query_position is None:  # the model passes it: reading a tensor would stop torch.compile's trace
            last_query_position = int(query_positions[-1])
        self.sees_everything = simple and (not causal or (n_queries == 1 and last_query_position == n_keys - 1))
        self._allowed: torch.Tensor | None = None
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    @property
    def allowed(self) -> torch.Tensor:
        """(B|1, 1, Tq, Tk) bool."""
        if self._allowed is None:
            key_positions = torch.arange(self.n_keys, device=self.query_positions.device)
            self._allowed = attention_allowed(self.query_positions, key_positions, causal=self.causal,
                                              sliding_window=self.sliding_window, key_padding=self.key_padding)
        return self._allowed

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive form (0 / most negative), built once per dtype and reused by every layer."""
        if dtype not in self._additive:
            self._additive[dtype] = additive_mask(self.allowed, dtype)
        return self._additive[dtype]


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c·tanh(s/c): keeps logits in (−c, c) smoothly (Gemma-2's attention soft-capping)."""
    return scores if cap is None else cap * torch.tanh(scores / cap)


def repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query attention: key/value head g serves query heads g·r … g·r + r − 1 (r = H / H_kv)."""
    repeats = n_heads // x.shape[1]
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=1)


def record_mixing(capture: Capture | None, layer: int, **tensors: torch.Tensor) -> None:
    """Record the intermediate tensors of one layer's mixing step (scores, masked_scores, probs,
    head_output) if a capture is listening. Every attention variant records through here."""
    if capture is not None:
        for point, tensor in tensors.items():
            capture.record(point, layer, tensor)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                        scale: float, softcap: float | None = None,
                        capture: Capture | None = None, layer: int = 0) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + M)·V, written out step by step (Vaswani et al., 2017, eq. 1).

    q (B, H, Tq, hd); k (B, H_kv, Tk, hd); v (B, H_kv, Tk, hd_v) → (B, H, Tq, hd_v). Every intermediate
    can be captured.
    """
    k = repeat_kv_heads(k, q.shape[1])
    v = repeat_kv_heads(v, q.shape[1])
    scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk): q_i · k_j
    masked_scores = soft_cap(scores * scale, softcap) + mask.additive(scores.dtype)
    probs = torch.softmax(masked_scores.float(), dim=-1).to(q.dtype)  # each row sums to 1
    output = probs @ v  # (B, H, Tq, hd_v): Σ_j p_ij · v_j
    record_mixing(capture, layer, scores=scores, masked_scores=masked_scores, probs=probs, head_output=output)
    return output


def attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   scale: float) -> torch.Tensor:
    """The same result through torch's fused scaled_dot_product_attention (no T×T tensor kept)."""
    if mask.is_plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if mask.sees_everything:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), scale=scale,
                                          enable_gqa=True)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate W_Q, W_K, W_V, W_O and n_kv_heads ≤ n_heads (MHA/GQA/MQA).

    head_h = softmax(x W_Q^h (x W_K^g)ᵀ / √d_k + M) · x W_V^g, output = concat_h(head_h) · W_O,
    where g is the key/value head that query head h shares.

    The forward pass is three steps, and the attention variants (``variants.py``) are subclasses that
    override one of them: :meth:`project` (x → q, k, v), :meth:`mix` (q, k, v → each head's output),
    or the projections themselves.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d_model = config.d_model
        self.w_q = nn.Linear(d_model, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.w_k = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.w_v = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.w_o = nn.Linear(self.n_heads * self.head_dim, d_model, bias=config.out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None
        self.scale = config.attn_scale if config.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.softcap = config.attn_logit_softcap
        self.key_heads, self.key_dim = self.n_kv_heads, self.head_dim  # what a KV cache stores per key
        self.w_qkv: nn.Module | None = None  # W_Q, W_K, W_V fused at load time for speed (attnlab.fast)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) → q (B, H, T, hd), k (B, H_kv, T, hd), v (B, H_kv, T, hd)."""
        B, T, _ = x.shape
        if self.w_qkv is not None:  # one matmul instead of three, same numbers
            q, k, v = self.w_qkv(x).split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                           self.n_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        return q, k, v

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
            capture: Capture | None) -> torch.Tensor:
        """Each head's output Σ_j w_ij·v_j (B, H, Tq, hd); here w = softmax(q·k·scale + M).

        The explicit path runs when something is recorded (or the model soft-caps); otherwise the
        fused kernel, which never keeps the T×T weights.
        """
        if capture is not None or self.softcap is not None:
            return attention_reference(q, k, v, mask, self.scale, self.softcap, capture, self.layer)
        return attention_fast(q, k, v, mask, self.scale)

    def forward(self, x: torch.Tensor, mask: AttentionMask,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, capture: Capture | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H_kv, Tk, hd): cached keys + new ones

        recording = capture is not None and capture.wants_layer(self.layer)
        if recording:
            for point, tensor in (("input", x), ("q", q), ("k", k), ("v", v)):
                capture.record(point, self.layer, tensor)
        heads = self.mix(q, k, v, mask, capture if recording else None)

        output = self.w_o(heads.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, d)
        if recording and "head_contrib" in capture.points:
            w_o_per_head = self.w_o.weight.unflatten(1, (self.n_heads, self.head_dim))  # (d, H, hd)
            capture.record("head_contrib", self.layer, torch.einsum("bhtk,dhk->bhtd", heads, w_o_per_head))
        return output

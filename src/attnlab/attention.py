"""Attention: the one place where softmax(QKᵀ/√d_k + M)·V is computed for every model.

Reading order: masks → the explicit reference formula → the fused fast path → the chunked
online-softmax path → how a path is picked → the multi-head module that projects q, k, v, applies
QK-norm and RoPE, reads/writes the KV cache, and mixes the values. Everything that consumes
attention (generation, inspection, training) goes through here.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.errors import InputError
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
    # .shape[0], not len(): len() must return an int, which pins a traced (torch.export) length to its example
    allowed = torch.ones(query_positions.shape[0], key_positions.shape[0], dtype=torch.bool,
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
        if last_query_position is None:  # the model passes it: reading a tensor would stop torch.export's trace
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

    @property
    def needs_tensor(self) -> bool:
        """Whether the fused kernel would need the (Tq, Tk) mask tensor (not plain causal, not see-all)."""
        return not (self.is_plain_causal or self.sees_everything)

    def key_range(self, queries: slice) -> tuple[int, int]:
        """Keys [first, end) that the queries ``queries`` may see by position (causal, window).

        Keys outside it are masked for every one of these queries, so a blockwise path skips them.
        """
        positions = self.query_positions[queries]
        first, end = 0, self.n_keys
        if self.causal:
            end = min(end, int(positions.max()) + 1)  # j ≤ i
        if self.sliding_window is not None:
            first = max(first, int(positions.min()) - self.sliding_window + 1)  # i − j < w
            if not self.causal:
                end = min(end, int(positions.max()) + self.sliding_window)  # j − i < w
        return first, max(first, end)

    def allowed_block(self, queries: slice, keys: slice) -> torch.Tensor | None:
        """``allowed[..., queries, keys]`` (B|1, 1, q, k) built for this block alone, or None when the
        block allows every pair (no mask to apply). Never builds the full (Tq, Tk) mask."""
        positions = self.query_positions[queries]
        first_key, last_key = keys.start, keys.stop - 1
        key_padding = None if self.key_padding is None else self.key_padding[:, keys]
        if key_padding is not None and bool(key_padding.all()):
            key_padding = None  # no padding key in this block
        everything = key_padding is None
        if everything and self.causal:
            everything = last_key <= int(positions.min())
        if everything and self.sliding_window is not None:
            everything = int(positions.max()) - first_key < self.sliding_window and (
                self.causal or last_key - int(positions.min()) < self.sliding_window)
        if everything:
            return None
        key_positions = torch.arange(keys.start, keys.stop, device=positions.device)
        return attention_allowed(positions, key_positions, causal=self.causal,
                                 sliding_window=self.sliding_window, key_padding=key_padding)


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
    # softmax in fp32 at least (float() would turn fp64's most negative value into −∞, and a padding row into NaN)
    probs = torch.softmax(masked_scores.to(torch.promote_types(masked_scores.dtype, torch.float32)),
                          dim=-1).to(q.dtype)  # each row sums to 1
    output = probs @ v  # (B, H, Tq, hd_v): Σ_j p_ij · v_j
    record_mixing(capture, layer, scores=scores, masked_scores=masked_scores, probs=probs, head_output=output)
    return output


def attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   scale: float) -> torch.Tensor:
    """The same result through torch's fused scaled_dot_product_attention: no (B, H, Tq, Tk) weights, but a
    mask other than plain causal / see-everything goes in as a (B|1, 1, Tq, Tk) tensor."""
    if mask.is_plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if mask.sees_everything:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), scale=scale,
                                          enable_gqa=True)


QUERY_CHUNK, KEY_CHUNK = 128, 256  # fastest of 64…512 × 128…1024 here at 1k–8k tokens (1 thread, 9/3 heads)


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                      scale: float, softcap: float | None = None, *, query_chunk: int = QUERY_CHUNK,
                      key_chunk: int = KEY_CHUNK) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + M)·V one (query block, key block) at a time: the online softmax
    (Milakov & Gimelshein, 2018) as FlashAttention uses it (Dao et al., 2022, Algorithm 1).

    For a block of queries, with running row max m, denominator ℓ and unnormalised output o
    (m = −∞, ℓ = 0, o = 0 at the start), each key block K_j, V_j updates

        S_j = c·tanh(Q K_jᵀ·scale / c) + M_j      (soft-capped only if c is given)
        m'  = max(m, rowmax(S_j))
        ℓ   = e^(m − m')·ℓ + rowsum(e^(S_j − m'))
        o   = e^(m − m')·o + e^(S_j − m')·V_j
        m   = m'

    and the block's output is o / ℓ, where M_j is 0 for allowed pairs and −∞ for masked ones (their
    weight is exactly 0). Only a (query_chunk × key_chunk) block of weights per head exists at any time,
    never the (Tq, Tk) matrix; the statistics m, ℓ, o are fp32 whatever q's dtype (fp64 stays fp64).

    q (B, H, Tq, hd); k (B, H_kv, Tk, hd); v (B, H_kv, Tk, hd_v) → (B, H, Tq, hd_v). The r = H / H_kv
    query heads that share a key/value head are stacked as rows of one matmul against it (no copy of
    K, V per query head). Key blocks that causality or the sliding window mask entirely are skipped,
    and blocks that allow everything are not masked. A query that may see no key at all (a padding
    query) gets the mean of all values, as the reference's uniform row gives.
    """
    B, H, Tq, hd = q.shape
    H_kv, hd_v = k.shape[1], v.shape[-1]
    if v.shape[1] != H_kv or H % H_kv:
        raise ValueError(f"chunked attention needs k and v with the same heads, dividing q's: got q {H}, "
                         f"k {H_kv}, v {v.shape[1]}")
    r = H // H_kv
    stats = torch.promote_types(q.dtype, torch.float32)  # m, ℓ, o: fp32 for bf16/fp16/fp32 inputs
    lowest = torch.finfo(stats).min  # finite: e^(S − m') is never e^(−∞ + ∞)
    q_groups = q.unflatten(1, (H_kv, r))  # (B, H_kv, r, Tq, hd): query head g·r + i is row group i of kv head g
    keys_t = k.transpose(-2, -1)  # (B, H_kv, hd, Tk)
    output = q.new_empty(B, H_kv, r, Tq, hd_v)  # filled one query block at a time
    for q_start in range(0, Tq, query_chunk):
        queries = slice(q_start, min(q_start + query_chunk, Tq))
        n = queries.stop - queries.start
        q_block = q_groups[:, :, :, queries].reshape(B, H_kv, r * n, hd)  # (B, H_kv, r·n, hd)
        row_max = torch.full((B, H_kv, r * n, 1), -math.inf, dtype=stats, device=q.device)  # m
        row_sum = torch.zeros(B, H_kv, r * n, 1, dtype=stats, device=q.device)  # ℓ
        acc = torch.zeros(B, H_kv, r * n, hd_v, dtype=stats, device=q.device)  # o
        first, end = mask.key_range(queries)
        for k_start in range(first, end, key_chunk):
            keys = slice(k_start, min(k_start + key_chunk, end))
            scores = (q_block @ keys_t[..., keys]).to(stats).mul_(scale)  # (B, H_kv, r·n, kc): q_i·k_j·scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            allowed = mask.allowed_block(queries, keys)  # (B|1, 1, n, kc) or None: all allowed
            if allowed is not None:
                scores.view(B, H_kv, r, n, -1).masked_fill_(~allowed[:, :, None], lowest)
            # m is only a shift that cancels in o / ℓ: no gradient flows through it
            new_max = torch.maximum(row_max, scores.detach().amax(-1, keepdim=True))  # m'
            correction = torch.exp(row_max - new_max)  # e^(m − m'); 0 on the first block
            # e^(S − m') in place (B, H_kv, r·n, kc). The floor: exp runs 40-80× slower where its result is
            # subnormal or 0 (S − m' < −87); a weight below e^−50 ≈ 2e−22 of the row's largest is that small anyway.
            weights = scores.sub_(new_max).clamp_(min=-50.0).exp_()
            if allowed is not None:  # masked keys weigh exactly 0 (a new tensor: exp's backward needs its output)
                weights = weights.view(B, H_kv, r, n, -1).masked_fill(~allowed[:, :, None], 0.0).view(scores.shape)
            row_sum = correction * row_sum + weights.sum(-1, keepdim=True)
            acc = correction * acc + weights.to(v.dtype) @ v[:, :, keys]  # (B, H_kv, r·n, hd_v)
            row_max = new_max
        sees_nothing = row_max <= lowest  # a padding query: no allowed key, so the reference's uniform row
        block_output = acc / torch.where(sees_nothing, 1.0, row_sum)  # ℓ = 0 there: no 0/0, even in backward
        if sees_nothing.any():
            mean_value = v.to(stats).mean(-2, keepdim=True)  # (B, H_kv, 1, hd_v)
            block_output = torch.where(sees_nothing, mean_value, block_output)
        output[:, :, :, queries] = block_output.view(B, H_kv, r, n, hd_v)
    return output.view(B, H, Tq, hd_v)  # (B, H, Tq, hd_v)


ATTENTION_PATHS = ("auto", "explicit", "sdpa", "chunked")
# From 4096² (query, key) pairs on, SDPA's mask tensors (84 MB per batch row there) cost more than the
# chunked loop (measured, 1 thread, 9/3 heads): window 512, chunked 2.8× faster at 4k and 6.5× at 8k;
# key padding, a tie at 4k and 8k without the mask tensors; at 2k SDPA wins for padding (1.3×), ties for the window.
CHUNKED_MIN_PAIRS = 4096 * 4096


def choose_attention_path(mask: AttentionMask, softcap: float | None, n_queries: int, n_keys: int,
                          training: bool) -> str:
    """The "auto" rule when nothing is recorded: "sdpa" (torch's fused kernel), "chunked" or "explicit".

    SDPA wherever it is the fused kernel with no T×T tensor: causal prefill, decode steps, bidirectional
    (measured 1.7–2.4× faster than the chunked path in pure PyTorch at 2k–8k tokens). The chunked path
    where SDPA cannot do the job, soft-capping (4–6× faster than the explicit path at 2k–4k tokens, and
    no T×T tensor), or would need a (Tq, Tk) mask tensor of ≥ CHUNKED_MIN_PAIRS entries. Training keeps
    SDPA and the explicit path: they have a real backward pass, while autograd through the chunked loop
    keeps every block's weights.
    """
    if softcap is not None:
        return "explicit" if training else "chunked"
    if mask.needs_tensor and n_queries * n_keys >= CHUNKED_MIN_PAIRS and not training:
        return "chunked"
    return "sdpa"


def set_attention_path(model: nn.Module, path: str) -> nn.Module:
    """Force every attention layer of ``model`` onto one path: "explicit", "sdpa", "chunked", or "auto"
    (the default: :func:`choose_attention_path`). A capture that records a layer still takes the explicit
    path there (only it has the probabilities). Variants with their own mixing step (``variants.py``)
    keep their own rule. Returns the model."""
    if path not in ATTENTION_PATHS:
        raise InputError(f"unknown attention path {path!r}; choose one of {', '.join(ATTENTION_PATHS)}")
    layers = [module for module in model.modules() if isinstance(module, MultiHeadAttention)]
    if path == "sdpa" and any(layer.softcap is not None for layer in layers):
        raise InputError("this model soft-caps its attention logits, which SDPA cannot do: "
                         "use the chunked or explicit path")
    for layer in layers:
        layer.attention_path = path
    return model


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
        self.attention_path = "auto"  # see set_attention_path

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

        The explicit path runs when something is recorded; otherwise ``attention_path``, where "auto"
        picks the fused kernel or the chunked path (:func:`choose_attention_path`), neither of which
        keeps the T×T weights.
        """
        path = "explicit" if capture is not None else self.attention_path
        if path == "auto":
            path = choose_attention_path(mask, self.softcap, q.shape[2], k.shape[2],
                                         training=torch.is_grad_enabled() and q.requires_grad)
        if path == "explicit":
            return attention_reference(q, k, v, mask, self.scale, self.softcap, capture, self.layer)
        if path == "chunked":
            return attention_chunked(q, k, v, mask, self.scale, self.softcap)
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

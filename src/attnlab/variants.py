"""Attention variants: the attention module with one part changed, to ask what that part does.

A variant is named by a short spec, ``NAME`` or ``NAME:OPTION`` (``NAME(OPTION)`` reads the same),
stored in ``ModelConfig.attention`` and so in every checkpoint:

================== =====================================================================================
spec               what changes (q_i, k_j: query and key of one head; M: the mask; d_k: head_dim)
================== =====================================================================================
softmax            nothing: w_ij = softmax_j(q_i·k_j/√d_k + M)                     (Vaswani et al., 2017)
no-q, no-k, no-v   that projection is the identity on the head's slice of x: q_i = x_i[h·d_k:(h+1)·d_k]
merged-qk[:r]      one bilinear form per head, q_i·k_j → x_i W_QK^h x_jᵀ, W_QK^h learned whole (d×d) or
                   as a rank-r product L^h R^hᵀ; absolute positions only (see :class:`MergedQKAttention`)
linear[:elu|relu]  w_ij = φ(q_i)·φ(k_j) / Σ_l φ(q_i)·φ(k_l), φ = elu+1 (default) or relu, computed as a
                   prefix sum in O(T) memory                                  (Katharopoulos et al., 2020)
kernel             Nadaraya–Watson smoothing with a Gaussian kernel: w_ij ∝ exp(−‖q_i − k_j‖²/(2√d_k))
sigmoid            w_ij = σ(q_i·k_j/√d_k − log n), no normalisation over keys   (Ramapuram et al., 2024)
sliding-window:w   softmax, but query i sees only keys j with i − j < w (every layer local)
================== =====================================================================================

Each variant is a small subclass of :class:`attnlab.attention.MultiHeadAttention` that overrides
the one step it changes — the projections (:meth:`project`) or the mixing (:meth:`mix`) — so the
rest (QK-norm, RoPE, KV cache, capture points, W_O) is shared. The sliding window is a mask, not a
module: it changes which keys the softmax sees, and ``model.py`` builds masks.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.attention import (
    AttentionMask,
    MultiHeadAttention,
    attention_fast,
    attention_reference,
    record_mixing,
    repeat_kv_heads,
    soft_cap,
)
from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.errors import InputError


@dataclass(frozen=True)
class VariantInfo:
    name: str
    summary: str
    option: str = ""  # what NAME:OPTION means; "" = the variant takes none
    default_option: str | None = None
    option_required: bool = False


VARIANTS: dict[str, VariantInfo] = {info.name: info for info in (
    VariantInfo("softmax", "standard attention, softmax(q·k/√d_k)"),
    VariantInfo("no-q", "no W_Q: a head's query is its slice of x"),
    VariantInfo("no-k", "no W_K: a head's key is its slice of x"),
    VariantInfo("no-v", "no W_V: a head's value is its slice of x"),
    VariantInfo("merged-qk", "one learned W_QK per head instead of W_Q·W_Kᵀ", "rank r, or full", "full"),
    VariantInfo("linear", "linear attention φ(q)·φ(k), O(T) prefix sums", "feature map elu or relu", "elu"),
    VariantInfo("kernel", "Nadaraya–Watson smoothing with a Gaussian kernel on q, k"),
    VariantInfo("sigmoid", "σ(q·k/√d_k − log n) per key, not normalised"),
    VariantInfo("sliding-window", "softmax over the w most recent keys only", "window w", None, True),
)}


@dataclass(frozen=True)
class Variant:
    """A parsed spec: ``name`` and its option (None where it takes none)."""

    name: str
    option: str | None = None

    def __str__(self) -> str:
        return self.name if self.option is None else f"{self.name}:{self.option}"

    @property
    def is_softmax(self) -> bool:
        """Whether the mixing is softmax attention (projections or mask may differ)."""
        return self.name in ("softmax", "no-q", "no-k", "no-v", "merged-qk", "sliding-window")

    @property
    def merged_rank(self) -> int | None:
        """merged-qk's rank r; None for the full d×d matrix."""
        return None if self.option == "full" else int(self.option)

    @property
    def window(self) -> int | None:
        return int(self.option) if self.name == "sliding-window" else None


def valid_variants() -> str:
    """One line listing every spec, for error messages and --help."""
    return ", ".join(info.name + (f":<{info.option}>" if info.option else "") for info in VARIANTS.values())


_SPEC = re.compile(r"^([a-z-]+)(?::([^:()]+)|\(([^()]+)\))?$")


def parse_variant(spec: str) -> Variant:
    """'merged-qk:8' or 'merged-qk(8)' → Variant('merged-qk', '8'); InputError listing the valid specs."""
    match = _SPEC.match(spec.strip().lower())
    if match is None or match.group(1) not in VARIANTS:
        raise InputError(f"unknown attention variant {spec!r}; valid: {valid_variants()}")
    info = VARIANTS[match.group(1)]
    option = match.group(2) or match.group(3)
    if option is None:
        if info.option_required:
            raise InputError(f"attention variant {info.name} needs an option: {info.name}:<{info.option}>, "
                             f"e.g. {info.name}:16")
        return Variant(info.name, info.default_option)
    option = option.strip()
    if not info.option:
        raise InputError(f"attention variant {info.name} takes no option, got {spec!r}")
    if info.name == "linear" and option not in FEATURE_MAPS:
        raise InputError(f"linear attention's feature map must be one of {', '.join(FEATURE_MAPS)}, got {option!r}")
    if info.name in ("merged-qk", "sliding-window") and not (info.name == "merged-qk" and option == "full"):
        if not option.isdigit() or int(option) < 1:
            raise InputError(f"{info.name}: the {info.option} must be a positive integer, got {option!r}")
        option = str(int(option))
    return Variant(info.name, option)


def check_compatible(variant: Variant, config: ModelConfig) -> None:
    """InputError saying why ``variant`` cannot run on a model of ``config``'s architecture."""
    name, d = variant.name, config.d_model
    if name == "no-q" and config.n_heads * config.head_dim != d:
        raise InputError(f"no-q needs n_heads × head_dim = d_model (each head's query is its slice of x), "
                         f"got {config.n_heads} × {config.head_dim} ≠ {d}")
    if name in ("no-k", "no-v") and config.n_kv_heads * config.head_dim != d:
        raise InputError(f"{name} needs n_kv_heads × head_dim = d_model (each head's {name[-1]} is its slice of "
                         f"x), got {config.n_kv_heads} × {config.head_dim} ≠ {d}")
    if name == "merged-qk":
        if config.positions == "rope":
            raise InputError("merged-qk cannot run with RoPE: RoPE rotates q and k by their positions, so "
                             "q_i·k_j = x_i W_Q R_(j−i) W_Kᵀ x_jᵀ depends on j − i and no single W_QK exists; "
                             "use learned absolute positions (model.positions = \"learned\")")
        if config.qk_norm:
            raise InputError("merged-qk cannot run with QK-norm: normalising q and k separately is not "
                             "linear, so their product is no bilinear form x W_QK xᵀ")
        if variant.merged_rank is not None and variant.merged_rank > d:
            raise InputError(f"merged-qk rank {variant.merged_rank} exceeds d_model {d} (W_QK is d × d)")
    if name == "linear" and config.attn_logit_softcap is not None:
        raise InputError("linear attention has no logits to soft-cap: unset attn_logit_softcap")


def attention_parameter_change(config: ModelConfig) -> int:
    """Parameters per layer the config's variant adds (+) or removes (−) against softmax attention."""
    variant = parse_variant(config.attention)
    d, hd, H, H_kv = config.d_model, config.head_dim, config.n_heads, config.n_kv_heads
    bias = int(config.qkv_bias)
    q_params, kv_params = H * hd * (d + bias), H_kv * hd * (d + bias)
    if variant.name == "no-q":
        return -q_params
    if variant.name in ("no-k", "no-v"):
        return -kv_params
    if variant.name == "merged-qk":
        rank = variant.merged_rank
        return H * (d * d if rank is None else 2 * d * rank) - q_params - kv_params
    return 0


# ----------------------------------------------------------------------------------------- projections


class IdentityProjectionAttention(MultiHeadAttention):
    """no-q / no-k / no-v: one of W_Q, W_K, W_V replaced by the identity on the head's slice of x.

    Head h's query (no-q) is x_i[h·d_k:(h+1)·d_k] itself, so score_ij = x_i^(h) · W_K^h x_j: the
    bilinear form W_QK = I^(h) W_Kᵀ keeps rank d_k, only its row space is fixed in advance. The layer
    loses d·d_k parameters per head (and the FLOPs of that matmul); the question is what it costs.
    """

    def __init__(self, config: ModelConfig, layer: int, removed: str) -> None:
        super().__init__(config, layer)
        self.removed = removed
        setattr(self, f"w_{removed}", nn.Identity())  # x.view(B, T, heads, hd) then slices x per head


class MergedQKAttention(MultiHeadAttention):
    """merged-qk: score_ij = x_i W_QK^h x_jᵀ with W_QK^h learned directly instead of as W_Q^h W_K^hᵀ.

    Full rank: W_QK^h is d×d, the query is x_i W_QK^h (d wide) and the key is x_j itself — one key of
    d numbers shared by every head (the KV cache stores x). Rank r: W_QK^h = L^h R^hᵀ (L, R d×r), the
    query x L^h and key x R^h — standard attention with r-wide, unshared keys. With r = d_k this has
    exactly the parameters of W_Q, W_K; the full matrix has H·d² instead of 2·H·d·d_k.

    Exact only with absolute positions: RoPE puts a position-dependent rotation between the two
    projections (x_i W_Q R_(j−i) W_Kᵀ x_jᵀ), which no fixed W_QK can express. Q/K biases are dropped
    (a bilinear form has none).
    """

    def __init__(self, config: ModelConfig, layer: int, rank: int | None) -> None:
        super().__init__(config, layer)
        d = config.d_model
        self.rank = rank
        del self.w_q, self.w_k  # replaced by W_QK (nn.Module removes the submodules)
        if rank is None:
            # Init so that x W_QK xᵀ has the variance q·k has under N(0, σ²) W_Q, W_K: σ²·√d_k.
            self.w_qk = nn.Parameter(torch.randn(self.n_heads, d, d) * (0.02 ** 2 * math.sqrt(self.head_dim)))
            self.key_heads, self.key_dim = 1, d
        else:
            self.w_qk_left = nn.Parameter(torch.randn(self.n_heads, d, rank) * 0.02)
            self.w_qk_right = nn.Parameter(torch.randn(self.n_heads, d, rank) * 0.02)
            self.key_heads, self.key_dim = self.n_heads, rank

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        v = self.w_v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        if self.rank is None:
            q = torch.einsum("btd,hde->bhte", x, self.w_qk)  # (B, H, T, d): x_i W_QK^h
            return q, x[:, None], v  # keys (B, 1, T, d): x_j itself
        q = torch.einsum("btd,hdr->bhtr", x, self.w_qk_left)  # (B, H, T, r)
        k = torch.einsum("btd,hdr->bhtr", x, self.w_qk_right)  # (B, H, T, r)
        return q, k, v

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
            capture: Capture | None) -> torch.Tensor:
        # Keys and values have different head counts here: give the fused kernel values per query head.
        if capture is None and self.softcap is None:
            return attention_fast(q, repeat_kv_heads(k, self.n_heads), repeat_kv_heads(v, self.n_heads), mask,
                                  self.scale)
        return attention_reference(q, k, v, mask, self.scale, self.softcap, capture, self.layer)


# ---------------------------------------------------------------------------------------------- mixing


class KernelAttention(MultiHeadAttention):
    """Nadaraya–Watson kernel smoothing: output_i = Σ_j K(q_i, k_j) v_j / Σ_j K(q_i, k_j).

    Attention *is* a kernel smoother (Tsai et al., 2019): softmax attention uses the exponential
    kernel K(q, k) = exp(q·k/√d_k). This variant uses the Gaussian (RBF) kernel with bandwidth
    σ² = √d_k instead, K(q, k) = exp(−‖q − k‖²/(2√d_k)): a key is weighed by its *distance* from the
    query, not by their alignment. Since ‖q − k‖² = ‖q‖² − 2q·k + ‖k‖² and the ‖q‖² factor cancels in
    the normalisation, w_ij = softmax_j((q_i·k_j − ‖k_j‖²/2)/√d_k): softmax attention with a penalty
    on long keys. That identity gives the fast path ([q, 1]·[k, −‖k‖²/2] through the fused kernel);
    the explicit path records the scores as −‖q_i − k_j‖²/2.
    """

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
            capture: Capture | None) -> torch.Tensor:
        if capture is None and self.softcap is None:
            ones = torch.ones_like(q[..., :1])
            half_norm = -0.5 * (k * k).sum(-1, keepdim=True)
            return attention_fast(torch.cat([q, ones], -1), torch.cat([k, half_norm], -1), v, mask, self.scale)
        k, v = repeat_kv_heads(k, self.n_heads), repeat_kv_heads(v, self.n_heads)
        squared_distance = ((q * q).sum(-1, keepdim=True) - 2 * q @ k.transpose(-2, -1)
                            + (k * k).sum(-1)[..., None, :])  # (B, H, Tq, Tk): ‖q_i − k_j‖²
        scores = -0.5 * squared_distance
        masked_scores = soft_cap(scores * self.scale, self.softcap) + mask.additive(scores.dtype)
        probs = torch.softmax(masked_scores.float(), dim=-1).to(q.dtype)
        output = probs @ v
        record_mixing(capture, self.layer, scores=scores, masked_scores=masked_scores, probs=probs,
                      head_output=output)
        return output


class SigmoidAttention(MultiHeadAttention):
    """w_ij = σ(q_i·k_j/√d_k + b): each key is weighed on its own, with no competition between keys.

    Rows need not sum to 1. The bias b = −log n keeps the total weight near 1 at initialisation
    (Ramapuram et al., 2024, "Theory, analysis, and best practices for sigmoid self-attention"); n is
    the model's context length, fixed, so that a token's weights do not change with how many tokens
    happen to precede it (training windows and generation then agree).
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        self.bias = -math.log(config.context_length)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
            capture: Capture | None) -> torch.Tensor:
        k, v = repeat_kv_heads(k, self.n_heads), repeat_kv_heads(v, self.n_heads)
        scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
        masked_scores = soft_cap(scores * self.scale, self.softcap) + self.bias + mask.additive(scores.dtype)
        probs = torch.sigmoid(masked_scores)  # masked keys: σ(most negative) = 0
        output = probs @ v
        record_mixing(capture, self.layer, scores=scores, masked_scores=masked_scores, probs=probs,
                      head_output=output)
        return output


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": lambda x: F.elu(x) + 1,  # positive everywhere, ≈ 1 + x near 0 (Katharopoulos et al.)
    "relu": F.relu,
}
LINEAR_EPS = 1e-6  # guards the normaliser Σ φ(q)·φ(k), which relu features can make 0


class LinearAttention(MultiHeadAttention):
    """w_ij = φ(q_i)·φ(k_j) / Σ_l φ(q_i)·φ(k_l) (Katharopoulos et al., 2020, "Transformers are RNNs").

    exp(q·k) is replaced by a kernel that factorises, so Σ_j φ(k_j) v_jᵀ can be summed once and shared
    by every query: output_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i with S_i = Σ_(j≤i) φ(k_j) v_jᵀ and
    z_i = Σ_(j≤i) φ(k_j). Causal prefixes are computed chunk by chunk (:func:`causal_linear_attention`),
    never as a T×T matrix: memory O(T). The explicit form runs only when the weights are recorded or
    the mask is unusual (padding). No scale or softmax: φ absorbs them.
    """

    chunk_size = 64

    def __init__(self, config: ModelConfig, layer: int, feature_map: str) -> None:
        super().__init__(config, layer)
        self.feature_map_name = feature_map
        self.feature_map = FEATURE_MAPS[feature_map]

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
            capture: Capture | None) -> torch.Tensor:
        phi_q = self.feature_map(q)  # (B, H, Tq, hd)
        phi_k = repeat_kv_heads(self.feature_map(k), self.n_heads)  # (B, H, Tk, hd)
        v = repeat_kv_heads(v, self.n_heads)
        if capture is None and mask.is_plain_causal:
            return causal_linear_attention(phi_q, phi_k, v, self.chunk_size)
        if capture is None and mask.sees_everything:  # encoder, or one decode step: every key counts
            state = phi_k.transpose(-2, -1) @ v  # (B, H, hd, hd_v): Σ_j φ(k_j) v_jᵀ
            normaliser = phi_k.sum(-2)[..., None]  # (B, H, hd, 1): Σ_j φ(k_j)
            return (phi_q @ state) / (phi_q @ normaliser + LINEAR_EPS)
        scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Tq, Tk): φ(q_i)·φ(k_j)
        kept = scores * mask.allowed
        probs = kept / (kept.sum(-1, keepdim=True) + LINEAR_EPS)
        output = probs @ v
        record_mixing(capture, self.layer, scores=scores, probs=probs, head_output=output)
        return output


def causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                            chunk_size: int) -> torch.Tensor:
    """output_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + ε) for i = 0 … T−1, in chunks of C tokens.

    Within a chunk the C×C causal weights are explicit; the keys of earlier chunks enter through their
    running sums S (hd × hd_v) and z (hd), one per chunk boundary. Memory is O(T·C + (T/C)·hd·hd_v):
    linear in T. (A plain cumsum over T of φ(k_j) v_jᵀ is the same arithmetic but keeps T·hd·hd_v.)
    """
    B, H, T, f = phi_q.shape
    pad = (-T) % chunk_size
    if pad:  # padded keys get φ = 0, so they add nothing to any sum
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    n = phi_q.shape[2] // chunk_size
    q_c = phi_q.view(B, H, n, chunk_size, f)
    k_c = phi_k.view(B, H, n, chunk_size, f)
    v_c = v.view(B, H, n, chunk_size, v.shape[-1])
    chunk_state = k_c.transpose(-2, -1) @ v_c  # (B, H, n, f, hd_v): Σ over the chunk of φ(k_j) v_jᵀ
    chunk_norm = k_c.sum(-2)  # (B, H, n, f)
    state_before = chunk_state.cumsum(2) - chunk_state  # S over all earlier chunks
    norm_before = (chunk_norm.cumsum(2) - chunk_norm)[..., None]  # (B, H, n, f, 1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=phi_q.device).tril()
    within = (q_c @ k_c.transpose(-2, -1)) * causal  # (B, H, n, C, C): φ(q_i)·φ(k_j), j ≤ i in the chunk
    numerator = q_c @ state_before + within @ v_c  # (B, H, n, C, hd_v)
    denominator = q_c @ norm_before + within.sum(-1, keepdim=True)
    output = (numerator / (denominator + LINEAR_EPS)).view(B, H, n * chunk_size, -1)
    return output[:, :, :T]


# --------------------------------------------------------------------------------------------- factory


def module_variant(module: MultiHeadAttention) -> Variant:
    """The variant a module computes, read from the module itself (its class and options), not from a
    config: after ``attnlab swap`` a layer may differ from ``config.attention``. Masks are not modules,
    so a sliding window reads as ``softmax`` here (the model's ``layer_kinds`` say which layers are local)."""
    if isinstance(module, IdentityProjectionAttention):
        return Variant(f"no-{module.removed}")
    if isinstance(module, MergedQKAttention):
        return Variant("merged-qk", "full" if module.rank is None else str(module.rank))
    if isinstance(module, LinearAttention):
        return Variant("linear", module.feature_map_name)
    if isinstance(module, KernelAttention):
        return Variant("kernel")
    if isinstance(module, SigmoidAttention):
        return Variant("sigmoid")
    return Variant("softmax")


def make_attention(config: ModelConfig, layer: int) -> MultiHeadAttention:
    """The attention module of ``layer`` for ``config.attention``."""
    variant = parse_variant(config.attention)
    name = variant.name
    if name in ("no-q", "no-k", "no-v"):
        return IdentityProjectionAttention(config, layer, removed=name[-1])
    if name == "merged-qk":
        return MergedQKAttention(config, layer, variant.merged_rank)
    if name == "linear":
        return LinearAttention(config, layer, variant.option)
    if name == "kernel":
        return KernelAttention(config, layer)
    if name == "sigmoid":
        return SigmoidAttention(config, layer)
    return MultiHeadAttention(config, layer)  # softmax and sliding-window (a mask, built in model.py)

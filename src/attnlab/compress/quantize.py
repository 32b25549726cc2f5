"""Weight-only quantisation: int8 per output channel, int4 in groups along the input, and bf16.

Decoding one token multiplies a single activation row by every weight matrix, so a step costs the
time it takes to stream the weights from memory. Storing them in 8 or 4 bits streams 4× or 8× fewer
bytes than fp32; the activations stay in floating point (weight-only quantisation, as in gpt-fast
and llama.cpp). Each module here replaces an ``nn.Linear`` (or the token embedding) and computes
y = x·Ŵᵀ + b with Ŵ the dequantised weight — through torch's packed CPU kernels, which dequantise
on the fly and want bf16 activations (they are ~25× slower with fp32 ones).

int8:  Ŵ[n, :] = s_n · q[n, :],                        q ∈ [−127, 127], s_n = max|W[n, :]| / 127
int4:  Ŵ[n, g·G:(g+1)·G] = s_ng · (q − 8) + z_ng,        q ∈ [0, 15], per group of G inputs,
       with s = (max − min) / 15 and z = min + 8·s (the range of each group maps onto 0…15).
GGUF's Q4_1 blocks (value = d·q + m over 32 inputs) are this int4 form with s = d, z = m + 8·d, so
weights dequantised from Q4_1 re-quantise to the same q (up to bf16 rounding of s and z).

Few rows (decoding) and many rows (a prompt, an evaluation window) want different int4 code: torch's
kernel dequantises the matrix again for every 4 rows it multiplies, which is the fastest way to
multiply one row but makes a 512-row prompt re-dequantise each matrix 128 times. From
``INT4_DENSE_ROWS`` rows on, Int4Linear dequantises its matrix once and multiplies densely, in bf16 or fp32,
whichever multiplies faster on this CPU (:func:`dense_matmul_dtype`).
"""

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32  # GGUF Q4_1's block size: requantising a Q4_1 model reproduces its blocks
INT4_INNER_K_TILES = 2  # packing layout of torch's CPU int4 kernel (must divide K / 16)
# From this many rows on, dequantise once and multiply densely rather than through the int4 kernel: SmolLM2's
# matrices at 512 rows take 0.8-3.5 ms instead of 1.6-6.9 ms (AMD EPYC, bf16); at 128 rows the kernel is faster.
INT4_DENSE_ROWS = 256


@functools.cache
def dense_matmul_dtype() -> torch.dtype:
    """bf16 or fp32, whichever multiplies a prompt-sized product faster here, timed once per process (~30 ms).

    Why measure: which one wins depends on the CPU, not on a flag torch reports. On an AMD EPYC (Zen 4) bf16
    GEMMs ran ~2× faster than fp32; on an Intel Xeon with the same AVX-512 BF16 flag and no AMX they ran 2×
    slower (SmolLM2's W_gate|W_up at 512 rows: 12.2 ms bf16, 6.0 ms fp32), which made int4 prompts half as fast.
    """
    rows, weight = torch.randn(INT4_DENSE_ROWS, 576), torch.randn(1536, 576)
    seconds: dict[torch.dtype, list[float]] = {torch.bfloat16: [], torch.float32: []}
    with torch.inference_mode():
        for repeat in range(4):  # alternating, the first round a warm-up
            for dtype in (torch.bfloat16, torch.float32) if repeat % 2 == 0 else (torch.float32, torch.bfloat16):
                x, w = rows.to(dtype), weight.to(dtype)
                start = time.perf_counter()
                F.linear(x, w)
                if repeat:
                    seconds[dtype].append(time.perf_counter() - start)
    return min(seconds, key=lambda dtype: sorted(seconds[dtype])[1])  # the median of three


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → q (N, K) int8, scales (N,) fp32 with W ≈ scales[:, None] · q (symmetric, per row)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scales


def int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float → q (N, K) int32 in [0, 15], scales and zeros (N, K / G) with Ŵ = s·(q − 8) + z."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scales, low + 8 * scales


def int4_supported(n: int, k: int, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Whether torch's packed int4 CPU kernel takes an (N, K) matrix: K in whole groups and tiles."""
    return k % group_size == 0 and k % (16 * INT4_INNER_K_TILES) == 0 and n % 16 == 0


def _frozen(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A bias kept in fp32 (it is added to the fp32 output), not trainable."""
    return None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)


class Int8Linear(nn.Module):
    """y = (x · qᵀ) ⊙ s + b: a linear layer with int8 weights and one fp32→bf16 scale per output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scales = int8_per_channel(weight.detach())
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantised_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Ŵ[rows] in fp32: what an embedding lookup into this matrix returns."""
        return self.weight_int8[rows].float() * self.scales[rows, None].float()


class Int4Linear(nn.Module):
    """y = x · Ŵᵀ + b with Ŵ = s·(q − 8) + z in groups of G inputs.

    q is stored twice, 4 bits each: in the layout of torch's packed int4 CPU kernel, which multiplies a few
    rows (decoding), and as plain nibbles, from which many rows (a prompt) get Ŵ once and one dense
    matmul (see the module docstring). The second copy costs half a byte per weight; ``dense_copy=False``
    leaves it out (a matrix that only ever sees a few rows), and every product goes through the kernel.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = INT4_GROUP_SIZE, *, dense_copy: bool = True) -> None:
        super().__init__()
        n, k = weight.shape
        if not int4_supported(n, k, group_size):
            raise ValueError(f"int4 needs K divisible by {group_size} and 32, N by 16; got ({n}, {k})")
        q, scales, zeros = int4_groups(weight.detach(), group_size)
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
        # (K / G, N, 2): the kernel's layout for each group's (scale, zero)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous())
        # (N, K / G, G / 2) bytes: byte j of a group holds its inputs j (low nibble) and G/2 + j (high nibble)
        groups = q.reshape(n, k // group_size, group_size).to(torch.uint8)
        half = group_size // 2
        nibbles = (groups[..., :half] | groups[..., half:] << 4).contiguous() if dense_copy else None
        self.register_buffer("weight_nibbles", nibbles)
        self.bias = _frozen(bias)

    def dequantised(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Ŵ (N, K) from the nibbles: computed in fp32 (for bf16, rounded once, as the kernel computes it).

        (In bf16, s·q and z − 8·s would be rounded apart and then nearly cancel for small weights: 3× the
        error of the kernel's output, and no faster.)
        """
        nibbles = self.weight_nibbles
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)  # (N, K / G, G) in 0…15
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K / G) each
        weight = q.float().mul_(scales[..., None]).add_((zeros - 8 * scales)[..., None])  # s·q + (z − 8·s)
        return weight.to(dtype).reshape(self.out_features, self.in_features)

    def multiply_packed(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) bf16 → rows · Ŵᵀ (M, N) bf16 through torch's int4 kernel (fastest for few rows)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_int4, self.group_size,
                                                          self.scales_and_zeros)

    def multiply_dense(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) → rows · Ŵᵀ (M, N), Ŵ dequantised once (fastest for many rows), in
        :func:`dense_matmul_dtype`."""
        dtype = dense_matmul_dtype()
        return F.linear(rows.to(dtype), self.dequantised(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.weight_nibbles is not None and rows.shape[0] >= INT4_DENSE_ROWS:
            y = self.multiply_dense(rows)
        else:
            y = self.multiply_packed(rows.to(torch.bfloat16))
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Bf16Linear(nn.Module):
    """y = x · Wᵀ + b with W stored in bf16: half the bytes of fp32; the input is cast only for the matmul,
    so the residual stream, norms and attention stay fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)
        self.bias = _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class QuantisedEmbedding(nn.Module):
    """A token embedding whose rows are read from a quantised matrix (shared with a tied LM head)."""

    def __init__(self, table: "Int8Linear | Bf16Linear | ShortlistHead") -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.table, Bf16Linear):
            return self.table.weight[ids].float()
        if isinstance(self.table, ShortlistHead):
            return self.table.rows(ids)
        return self.table.dequantised_rows(ids)


def int8_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → q (N, K) int8, scales (N, K / G) fp32 with W ≈ s·q per group (GGUF Q8_0's form)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    scales = groups.abs().amax(dim=-1).clamp(min=1e-12) / 127
    q = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales


class ShortlistHead(nn.Module):
    """The LM head (and its tied embedding) as int8 rows in groups of 32 — GGUF Q8_0's own form, so the
    rows of a Q8_0 model come back exactly — with an int4 copy for a fast first pass.

    logits = x·Ŵᵀ in two passes: the int4 copy scores every token (half the bytes of int8), its top
    ``shortlist`` tokens are re-scored exactly from the int8 rows, and those exact scores replace the
    approximate ones. Greedy decoding and top-k ≤ shortlist sampling see exact logits; the tail of the
    distribution keeps int4-accurate ones. Why: an int4 head alone flips near-tied greedy choices.
    """

    def __init__(self, weight: torch.Tensor, shortlist: int = 32, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        q, scales = int8_groups(weight.detach(), group_size)
        self.group_size, self.shortlist = group_size, shortlist
        self.register_buffer("rows_int8", q)
        self.register_buffer("row_scales", scales)
        # Generation multiplies the head by one row per step (the last position's): no dense copy (−½ byte/weight)
        self.first_pass = Int4Linear(weight, dense_copy=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Ŵ[ids] (…, K) in fp32: the embedding lookup, and the rows the second pass re-scores with."""
        q = self.rows_int8[ids].float().unflatten(-1, (-1, self.group_size))  # (…, K / G, G)
        return (q * self.row_scales[ids][..., None]).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.first_pass(x)  # (…, V): every token, int4-accurate
        candidates = logits.topk(min(self.shortlist, logits.shape[-1]), dim=-1).indices  # (…, k)
        exact = torch.einsum("...d,...kd->...k", x.float(), self.rows(candidates))
        return logits.scatter(-1, candidates, exact)

"""Positions: rotary embeddings (RoPE) and learned absolute position embeddings."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021): rotate each pair of q/k features by an angle proportional to position.

    Pair i of a head rotates by θ_i·p with θ_i = base^(−2i/d). We use the "half-split" pairing
    (feature i with feature i + d/2), as Hugging Face checkpoints expect; GGUF files converted by
    llama.cpp store Q/K rows interleaved and the loader un-permutes them.

    Because q_m·k_n then depends only on m − n, the attention score sees *relative* position.
    That is also why W_Q·W_Kᵀ cannot be merged ahead of time: R(m)ᵀR(n) sits between them.
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        inverse_frequencies = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inverse_frequencies", inverse_frequencies, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables for integer ``positions`` (T,) → two (T, head_dim) tensors in fp32."""
        angles = positions.float()[:, None] * self.inverse_frequencies[None, :]  # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (−x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin for x (B, heads, T, hd) and tables (T, hd)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)

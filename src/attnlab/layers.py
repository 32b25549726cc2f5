"""Norms, MLPs and activations: the non-attention parts of a transformer block."""

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x²) + ε) · w.

    With ``unit_offset`` the scale is (1 + w), Gemma's form, whose weights are stored centred on 0.
    Computed in fp32 whatever the input dtype: the mean of squares overflows bf16 easily.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
        return (normed * scale).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al., 2016): (x − mean) / sqrt(var + ε) · w + b (b optional: nanoGPT drops it)."""

    def __init__(self, dim: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm the config asks for, over ``dim`` features (d_model unless given)."""
    dim = config.d_model if dim is None else dim
    if config.norm == "layernorm":
        return LayerNorm(dim, config.norm_eps, config.norm_bias)
    return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """GELU (erf), GELU with the tanh approximation (GPT-2's "gelu_new", Gemma), SiLU, ReLU."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}")


class GeluMLP(nn.Module):
    """The original transformer MLP: W_out · act(W_in · x) (GPT-2, BERT)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.w_in = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.w_out = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activation(self.activation, self.w_in(x)))


class GatedMLP(nn.Module):
    """Gated MLP (Shazeer, 2020): W_down · (act(W_gate · x) ⊙ W_up · x); SwiGLU with SiLU, GeGLU with GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.w_gate = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.w_up = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.w_down = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.w_gate_up: nn.Module | None = None  # W_gate and W_up fused at load time for speed (attnlab.fast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate_up is not None:  # one matmul instead of two, same numbers
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        return self.w_down(activation(self.activation, gate) * up)


def make_mlp(config: ModelConfig) -> nn.Module:
    return GatedMLP(config) if config.mlp == "glu" else GeluMLP(config)

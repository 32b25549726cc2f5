"""Norms, MLPs, RoPE and the KV cache against their formulas."""

import torch

from attnlab.config import ModelConfig
from attnlab.kv_cache import KVCache
from attnlab.layers import GatedMLP, GeluMLP, LayerNorm, RMSNorm
from attnlab.positions import RotaryEmbedding, apply_rope


def test_rmsnorm_and_gemma_unit_offset():
    x = torch.randn(3, 8)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * torch.linspace(0.5, 2, 8)
    assert torch.allclose(norm(x), expected, atol=1e-6)
    gemma = RMSNorm(8, eps=1e-6, unit_offset=True)
    with torch.no_grad():
        gemma.weight.copy_(torch.linspace(0.5, 2, 8) - 1)
    assert torch.allclose(gemma(x), expected, atol=1e-6)


def test_layernorm():
    x = torch.randn(3, 8)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(LayerNorm(8, 1e-5)(x), expected, atol=1e-5)


def test_mlps():
    config = ModelConfig(family="llama", vocab_size=5, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1,
                         head_dim=4, d_ff=6, context_length=8)
    x = torch.randn(2, 4)
    glu = GatedMLP(config)
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    expected = (silu(x @ glu.w_gate.weight.T) * (x @ glu.w_up.weight.T)) @ glu.w_down.weight.T
    assert torch.allclose(glu(x), expected, atol=1e-6)
    config.activation, config.mlp_bias = "gelu", True
    mlp = GeluMLP(config)
    hidden = x @ mlp.w_in.weight.T + mlp.w_in.bias
    expected = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5)) @ mlp.w_out.weight.T + mlp.w_out.bias
    assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_rope_rotates_pairs_and_scores_depend_on_relative_position():
    rope = RotaryEmbedding(head_dim=8, base=100.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        cos_m, sin_m = rope.cos_sin(torch.tensor([m]))
        cos_n, sin_n = rope.cos_sin(torch.tensor([n]))
        return float((apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum())

    assert abs(score(5, 2) - score(13, 10)) < 1e-4  # only m − n matters
    cos, sin = rope.cos_sin(torch.tensor([3]))
    rotated = apply_rope(q, cos, sin)
    angle = torch.tensor(3 * 100.0 ** (-2 * 1 / 8))  # pair 1 = features (1, 5)
    x1, x2 = q[0, 0, 0, 1], q[0, 0, 0, 5]
    assert torch.allclose(rotated[0, 0, 0, 1], x1 * torch.cos(angle) - x2 * torch.sin(angle))
    assert torch.allclose(rotated.norm(), q.norm(), atol=1e-5)  # a rotation keeps lengths


def test_kv_cache_writes_in_place_and_returns_the_prefix():
    cache = KVCache(n_layers=2, batch_size=1, n_kv_heads=1, capacity=4, head_dim=2)
    k = torch.ones(1, 1, 3, 2)
    keys, values = cache.update(0, k, 2 * k)
    assert keys.shape == (1, 1, 3, 2) and cache.keys.data_ptr() == keys.data_ptr()
    cache.advance(3)
    keys, _ = cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert keys.shape[2] == 4
    cache.advance(1)
    try:
        cache.update(0, k, k)
    except ValueError as error:
        assert "KV cache full" in str(error)
    else:
        raise AssertionError("overflow not detected")

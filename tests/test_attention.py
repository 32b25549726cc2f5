"""The attention building blocks against their written-out definitions."""

import math

import pytest
import torch

from attnlab.attention import (
    AttentionMask,
    MultiHeadAttention,
    attention_allowed,
    attention_fast,
    attention_reference,
    repeat_kv_heads,
)
from attnlab.capture import Capture
from attnlab.config import ModelConfig


def _qkv(heads=6, kv_heads=2, tq=7, tk=7, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, tq, hd, generator=g), torch.randn(2, kv_heads, tk, hd, generator=g),
            torch.randn(2, kv_heads, tk, hd, generator=g))


def naive_attention(q, k, v, allowed, scale, softcap=None):
    """Loops over batch, head, query: out_i = Σ_j softmax_j(q_i·k_j·scale) v_j over allowed j."""
    B, H, Tq, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                scores = torch.tensor([float(q[b, h, i] @ k[b, h // group, j]) * scale for j in range(k.shape[2])])
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                keep = allowed[min(b, allowed.shape[0] - 1), 0, i]
                weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), 0)
                out[b, h, i] = (weights[:, None] * v[b, h // group]).sum(0)
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_and_fast_paths_equal_the_naive_definition(causal, window):
    q, k, v = _qkv()
    positions = torch.arange(7)
    mask = AttentionMask(positions, 7, causal=causal, sliding_window=window)
    expected = naive_attention(q, k, v, mask.allowed, 1 / math.sqrt(8))
    reference = attention_reference(q, k, v, mask, 1 / math.sqrt(8))
    fast = attention_fast(q, k, v, mask, 1 / math.sqrt(8))
    assert torch.allclose(reference, expected, atol=1e-5)
    assert torch.allclose(fast, expected, atol=1e-5)


def test_softcap_follows_its_definition():
    q, k, v = _qkv()
    mask = AttentionMask(torch.arange(7), 7, causal=True)
    expected = naive_attention(q * 3, k * 3, v, mask.allowed, 0.5, softcap=2.0)
    assert torch.allclose(attention_reference(q * 3, k * 3, v, mask, 0.5, softcap=2.0), expected, atol=1e-5)


def test_masks():
    causal = attention_allowed(torch.arange(4), torch.arange(4), causal=True)[0, 0]
    assert causal.tolist() == [[True, False, False, False], [True, True, False, False],
                               [True, True, True, False], [True, True, True, True]]
    window = attention_allowed(torch.arange(4), torch.arange(4), causal=True, sliding_window=2)[0, 0]
    assert window.tolist()[3] == [False, False, True, True]  # the 2 most recent keys, itself included
    padding = torch.tensor([[1, 1, 0, 0]])
    padded = attention_allowed(torch.arange(4), torch.arange(4), causal=False, key_padding=padding)
    assert padded[0, 0].tolist() == [[True, True, False, False]] * 4
    decode = attention_allowed(torch.tensor([9]), torch.arange(10), causal=True, sliding_window=3)
    assert decode[0, 0, 0].nonzero().flatten().tolist() == [7, 8, 9]


def test_padding_query_rows_do_not_produce_nan():
    q, k, v = _qkv(tq=4, tk=4)
    mask = AttentionMask(torch.arange(4), 4, causal=True, key_padding=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert torch.isfinite(attention_reference(q, k, v, mask, 0.3)).all()
    assert torch.isfinite(attention_fast(q, k, v, mask, 0.3)).all()


def test_grouped_query_heads_share_kv_in_order():
    kv = torch.arange(3.0).view(1, 3, 1, 1)
    assert repeat_kv_heads(kv, 9).flatten().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_capture_records_every_point_with_documented_shapes():
    config = ModelConfig(family="llama", vocab_size=10, d_model=24, n_layers=1, n_heads=6, n_kv_heads=2,
                         head_dim=4, d_ff=8, context_length=16)
    attention = MultiHeadAttention(config, layer=0)
    x = torch.randn(1, 5, 24)
    capture = Capture(points=("input", "q", "k", "v", "scores", "masked_scores", "probs", "head_output",
                              "head_contrib"))
    output = attention(x, AttentionMask(torch.arange(5), 5, causal=True), capture=capture)
    shapes = {point: tuple(capture.get(point, 0).shape) for point, _ in capture.tensors}
    assert shapes == {"input": (1, 5, 24), "q": (1, 6, 5, 4), "k": (1, 2, 5, 4), "v": (1, 2, 5, 4),
                      "scores": (1, 6, 5, 5), "masked_scores": (1, 6, 5, 5), "probs": (1, 6, 5, 5),
                      "head_output": (1, 6, 5, 4), "head_contrib": (1, 6, 5, 24)}
    # Per-head contributions add up to the attention output (W_O has no bias here).
    assert torch.allclose(capture.get("head_contrib", 0).sum(1), output, atol=1e-5)
    assert torch.allclose(capture.get("probs", 0).sum(-1), torch.ones(1, 6, 5))
    # Without capture the fast path gives the same output.
    assert torch.allclose(attention(x, AttentionMask(torch.arange(5), 5, causal=True)), output, atol=1e-5)


def test_capture_only_chosen_layers():
    capture = Capture(layers=[1])
    assert capture.wants_layer(1) and not capture.wants_layer(0)
    with pytest.raises(ValueError, match="unknown capture points"):
        Capture(points=("attn",))

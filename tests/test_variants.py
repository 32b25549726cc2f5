"""Every attention variant against its written-out definition, and the paths of one variant against each other."""

import dataclasses
import math

import pytest
import torch

from attnlab.attention import AttentionMask
from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.errors import AttnlabError, InputError
from attnlab.model import Transformer
from attnlab.variants import VARIANTS, causal_linear_attention, make_attention, parse_variant

D, HEADS, HD, T = 24, 4, 6, 11


def _config(attention: str = "softmax", **overrides) -> ModelConfig:
    fields = dict(family="gpt2", vocab_size=50, d_model=D, n_layers=2, n_heads=HEADS, n_kv_heads=HEADS, head_dim=HD,
                  d_ff=32, context_length=40, norm="layernorm", mlp="gelu", activation="gelu", positions="learned",
                  qkv_bias=True, out_bias=True, attention=attention)
    return ModelConfig(**(fields | overrides))


def _module(attention: str, **overrides):
    torch.manual_seed(0)
    module = make_attention(_config(attention, **overrides), 0)
    with torch.no_grad():  # biases start at 0 and W_QK small: make every parameter count
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return module.eval()


def _head_slice(x, h):
    return x[h * HD:(h + 1) * HD]


def _linear(module, name, x, h):
    """Head h's projection of one token x (d,) by W_name, or x's slice where the variant removed W_name."""
    layer = getattr(module, f"w_{name}")
    if isinstance(layer, torch.nn.Identity):
        return _head_slice(x, h)
    weight = layer.weight[h * HD:(h + 1) * HD]
    return weight @ x + (0 if layer.bias is None else layer.bias[h * HD:(h + 1) * HD])


def naive_weights(module, spec: str, x: torch.Tensor, h: int, i: int, keys: list[int]) -> torch.Tensor:
    """w_ij for query i over ``keys``, from the formula in each variant's docstring, one number at a time."""
    variant = parse_variant(spec)
    if variant.name == "merged-qk":
        if variant.merged_rank is None:
            w_qk = module.w_qk[h]
        else:
            w_qk = module.w_qk_left[h] @ module.w_qk_right[h].T
        scores = torch.stack([x[i] @ w_qk @ x[j] for j in keys]) / math.sqrt(HD)
        return torch.softmax(scores, 0)
    q = _linear(module, "q", x[i], h)
    k = [_linear(module, "k", x[j], h) for j in keys]
    if variant.name == "linear":
        phi = {"elu": lambda t: torch.where(t > 0, t + 1, torch.exp(t)), "relu": lambda t: t.clamp(min=0)}
        phi = phi[variant.option]
        kernel = torch.stack([phi(q) @ phi(kj) for kj in k])
        return kernel / (kernel.sum() + 1e-6)
    if variant.name == "kernel":
        kernel = torch.stack([torch.exp(-((q - kj) ** 2).sum() / (2 * math.sqrt(HD))) for kj in k])
        return kernel / kernel.sum()
    scores = torch.stack([q @ kj for kj in k]) / math.sqrt(HD)
    if variant.name == "sigmoid":
        return torch.sigmoid(scores - math.log(module_context(module)))
    return torch.softmax(scores, 0)


def module_context(module) -> int:
    return round(math.exp(-module.bias))


def naive_forward(module, spec: str, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """output_i = W_O · concat_h(Σ_j w_ij v_j^h) + b_O with loops over heads, queries and keys."""
    window = parse_variant(spec).window
    out = torch.zeros(x.shape[0], D)
    for i in range(x.shape[0]):
        keys = [j for j in range(x.shape[0]) if (not causal or j <= i) and (window is None or abs(i - j) < window)]
        heads = []
        for h in range(HEADS):
            weights = naive_weights(module, spec, x, h, i, keys)
            heads.append(sum(w * _linear(module, "v", x[j], h) for w, j in zip(weights, keys)))
        out[i] = module.w_o.weight @ torch.cat(heads) + module.w_o.bias
    return out


SPECS = ["softmax", "no-q", "no-k", "no-v", "merged-qk", "merged-qk:3", "linear", "linear:relu", "kernel",
         "sigmoid", "sliding-window:4"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("recorded", [False, True], ids=["fast", "explicit"])
def test_each_variant_equals_its_written_out_definition(spec, recorded):
    module = _module(spec)
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    window = parse_variant(spec).window
    mask = AttentionMask(torch.arange(T), T, causal=True, sliding_window=window)
    capture = Capture(points=("probs",)) if recorded else None
    with torch.no_grad():
        got = module(x, mask, capture=capture)[0]
        expected = naive_forward(module, spec, x[0])
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()
    if recorded:  # the recorded weights are the ones of the definition
        probs = capture.get("probs", 0)[0]
        keys = [j for j in range(T) if j <= 7 and (window is None or 7 - j < window)]
        with torch.no_grad():
            assert torch.allclose(probs[2, 7, keys], naive_weights(module, spec, x[0], 2, 7, keys), atol=1e-5)
        assert float(probs[2, 7, 8:].abs().max()) == 0.0  # causal: no weight on the future


@pytest.mark.parametrize("spec", ["softmax", "no-k", "merged-qk", "merged-qk:3", "linear", "kernel", "sigmoid"])
def test_bidirectional_variants_equal_their_definition(spec):
    module = _module(spec, causal=False)
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = module(x, AttentionMask(torch.arange(T), T, causal=False))[0]
        expected = naive_forward(module, spec, x[0], causal=False)
    assert torch.allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("length", [1, 5, 64, 130])
def test_chunked_causal_linear_attention_equals_the_quadratic_form(length):
    g = torch.Generator().manual_seed(length)
    phi_q, phi_k = torch.rand(2, 3, length, 8, generator=g), torch.rand(2, 3, length, 8, generator=g)
    v = torch.randn(2, 3, length, 5, generator=g)
    weights = (phi_q @ phi_k.transpose(-2, -1)).tril()
    expected = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    for chunk in (1, 16, 64):
        assert torch.allclose(causal_linear_attention(phi_q, phi_k, v, chunk), expected, atol=1e-5)


def test_linear_attention_memory_grows_linearly():
    """No T×T tensor: at T = 4096 the quadratic form would need 4096² floats per head (64 MB here)."""
    phi = torch.rand(1, 1, 4096, 8)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        causal_linear_attention(phi, phi, phi, 64)
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    assert peak < 4096 * 4096 * 4 / 8


@pytest.mark.parametrize("spec", SPECS)
def test_decoding_with_the_kv_cache_equals_the_full_forward_pass(spec):
    config = _config(spec)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, 50, (1, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(1, 14)
        steps = [model(ids[:, :9], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 14)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("spec", ["softmax", "linear", "kernel", "sigmoid", "merged-qk"])
def test_padding_keys_get_no_weight(spec):
    config = _config(spec, causal=False)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone = model(ids)
        with_padding = model(padded, attention_mask=mask)
    assert torch.allclose(with_padding[:, :6], alone, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_parameter_count_of_the_config_equals_the_built_model(spec):
    config = _config(spec)
    model = Transformer(config)
    assert config.n_parameters() == sum(p.numel() for p in model.parameters())


def test_removed_projections_are_gone_and_merged_qk_keys_on_x():
    assert isinstance(_module("no-v").w_v, torch.nn.Identity)
    merged = _module("merged-qk")
    assert not hasattr(merged, "w_q") and merged.w_qk.shape == (HEADS, D, D)
    assert (merged.key_heads, merged.key_dim) == (1, D)
    assert _module("merged-qk:3").w_qk_left.shape == (HEADS, D, 3)


def test_spec_parsing_accepts_both_forms_and_lists_valid_variants():
    assert str(parse_variant("merged-qk(8)")) == str(parse_variant("merged-qk:8")) == "merged-qk:8"
    assert str(parse_variant("linear")) == "linear:elu"
    assert parse_variant("sliding-window:16").window == 16
    with pytest.raises(InputError, match="unknown attention variant 'cosine'; valid: softmax, no-q"):
        parse_variant("cosine")
    for bad, message in [("sliding-window", "needs an option"), ("merged-qk:0", "positive integer"),
                         ("linear:tanh", "feature map"), ("kernel:3", "takes no option")]:
        with pytest.raises(InputError, match=message):
            parse_variant(bad)
    assert set(VARIANTS) == {"softmax", "no-q", "no-k", "no-v", "merged-qk", "linear", "kernel", "sigmoid",
                             "sliding-window"}


def test_incompatible_variants_say_why():
    with pytest.raises(AttnlabError, match="RoPE rotates q and k"):
        _config("merged-qk", positions="rope")
    with pytest.raises(AttnlabError, match="QK-norm"):
        _config("merged-qk", qk_norm=True)
    with pytest.raises(AttnlabError, match="n_kv_heads × head_dim = d_model"):
        _config("no-k", n_kv_heads=2)
    with pytest.raises(AttnlabError, match="n_heads × head_dim = d_model"):
        _config("no-q", head_dim=4)
    with pytest.raises(AttnlabError, match="exceeds d_model"):
        _config(f"merged-qk:{D + 1}")


def test_sliding_window_variant_masks_every_layer_but_keeps_rope_kinds():
    config = _config("sliding-window:3")
    model = Transformer(config)
    assert [kinds[1] for kinds in model.layer_kinds] == ["local", "local"] and model.local_window == 3
    plain = dataclasses.replace(config, attention="softmax")
    assert Transformer(plain).layer_kinds == [("global", "global")] * 2

"""The chunked online-softmax path against the explicit reference, the path rule, and its memory."""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnlab.attention as attention_module
from attnlab.attention import (
    CHUNKED_MIN_PAIRS,
    AttentionMask,
    attention_chunked,
    attention_reference,
    choose_attention_path,
    set_attention_path,
)
from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.model import Transformer

SCALE = 1 / math.sqrt(8)


def _qkv(batch=2, heads=6, kv_heads=2, tq=23, tk=23, hd=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, hd, generator=g) * 2  # × 2: peaked rows, where a wrong max shows
    k = torch.randn(batch, kv_heads, tk, hd, generator=g) * 2
    v = torch.randn(batch, kv_heads, tk, hd, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


LEFT_PADDING = torch.tensor([[0] * 6 + [1] * 17, [1] * 23])  # row 0: 6 padding tokens, so padding queries
RIGHT_PADDING = torch.tensor([[1] * 23, [1] * 15 + [0] * 8])

MASKS = {  # name: (causal, sliding window, key padding)
    "causal": (True, None, None),
    "bidirectional": (False, None, None),
    "causal-window": (True, 5, None),
    "bidirectional-window": (False, 4, None),
    "causal-left-padding": (True, None, LEFT_PADDING),
    "causal-right-padding": (True, None, RIGHT_PADDING),
    "bidirectional-padding": (False, None, RIGHT_PADDING),
    "window-and-padding": (True, 6, LEFT_PADDING),
}


def _mask(name, n_queries=23, n_keys=23):
    causal, window, padding = MASKS[name]
    positions = torch.arange(n_keys - n_queries, n_keys)  # decode: the queries are the last n_queries tokens
    return AttentionMask(positions, n_keys, causal=causal, sliding_window=window, key_padding=padding)


@pytest.mark.parametrize("chunks", [(4, 3), (7, 5), (256, 1024), (1, 1)])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_chunked_equals_reference_for_every_mask(name, chunks):
    q, k, v = _qkv()
    mask = _mask(name)
    expected = attention_reference(q, k, v, mask, SCALE)
    chunked = attention_chunked(q, k, v, mask, SCALE, query_chunk=chunks[0], key_chunk=chunks[1])
    assert chunked.shape == expected.shape
    assert (chunked - expected).abs().max().item() <= 1e-5  # padding queries too: both give the uniform row


@pytest.mark.parametrize("name", ["causal", "causal-left-padding"])
def test_chunked_peaked_rows(name):
    """Scores hundreds apart: most weights underflow (e^(S − m) < e^−87), which the exp floor must not change."""
    q, k, v = _qkv()
    q = q * 40
    mask = _mask(name)
    exact = attention_reference(q.double(), k.double(), v.double(), mask, SCALE)
    reference_error = (attention_reference(q, k, v, mask, SCALE) - exact).abs().max().item()
    chunked_error = (attention_chunked(q, k, v, mask, SCALE, query_chunk=4, key_chunk=3) - exact).abs().max().item()
    assert chunked_error <= max(2 * reference_error, 1e-5)  # scores ~300: fp32 rounds them by ~1e-5


@pytest.mark.parametrize("heads", [(6, 2), (6, 1), (6, 6), (9, 3)])
def test_chunked_grouped_query_heads(heads):
    q, k, v = _qkv(heads=heads[0], kv_heads=heads[1])
    mask = _mask("causal-window")
    expected = attention_reference(q, k, v, mask, SCALE)
    assert (attention_chunked(q, k, v, mask, SCALE, query_chunk=5, key_chunk=4) - expected).abs().max() <= 1e-5


def test_chunked_refuses_keys_and_values_with_different_heads():
    q, k, v = _qkv(heads=6, kv_heads=2)
    with pytest.raises(ValueError, match="same heads"):
        attention_chunked(q, k[:, :1], v, _mask("causal"), SCALE)  # merged-qk's shape: one key head


@pytest.mark.parametrize("name", ["causal", "causal-window", "causal-left-padding", "window-and-padding"])
@pytest.mark.parametrize("n_queries", [1, 5])
def test_chunked_decode_after_a_cached_prefix(name, n_queries):
    """Tq ≠ Tk: the queries are the last tokens, their positions start after the cached keys."""
    q, k, v = _qkv(tq=n_queries)
    mask = _mask(name, n_queries=n_queries)
    expected = attention_reference(q, k, v, mask, SCALE)
    for chunks in ((2, 3), (256, 1024)):
        chunked = attention_chunked(q, k, v, mask, SCALE, query_chunk=chunks[0], key_chunk=chunks[1])
        assert (chunked - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["causal", "bidirectional-window", "causal-left-padding"])
def test_chunked_soft_capping(name):
    q, k, v = _qkv()
    q = q * 4  # scores well beyond the cap, so that capping changes the answer
    mask = _mask(name)
    expected = attention_reference(q, k, v, mask, SCALE, softcap=3.0)
    assert (attention_reference(q, k, v, mask, SCALE) - expected).abs().max() > 0.1
    assert (attention_chunked(q, k, v, mask, SCALE, 3.0, query_chunk=4, key_chunk=6) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["causal", "causal-left-padding", "bidirectional-window"])
def test_chunked_bfloat16_inputs(name):
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = _mask(name)
    exact = attention_reference(q.double(), k.double(), v.double(), mask, SCALE)
    reference = attention_reference(q, k, v, mask, SCALE)
    chunked = attention_chunked(q, k, v, mask, SCALE, query_chunk=4, key_chunk=5)
    assert chunked.dtype == torch.bfloat16
    # No worse than the explicit path in bf16 (its error is ~1e-2 against fp64 here).
    chunked_error = (chunked.double() - exact).abs().max().item()
    assert chunked_error <= max(2 * (reference.double() - exact).abs().max().item(), 2e-2)


def test_float64_stays_float64_and_padding_rows_stay_finite():
    """The statistics are at least fp32: fp64 inputs keep fp64 (the reference once cast fp64's most
    negative value to fp32's −∞ and gave padding rows NaN)."""
    q, k, v = _qkv(dtype=torch.float64)
    mask = _mask("window-and-padding")
    expected = attention_reference(q, k, v, mask, SCALE)
    chunked = attention_chunked(q, k, v, mask, SCALE, query_chunk=4, key_chunk=5)
    assert torch.isfinite(expected).all() and chunked.dtype == torch.float64
    assert (chunked - expected).abs().max().item() <= 1e-12


def test_chunked_padding_queries_give_the_reference_uniform_row_and_no_nan():
    q, k, v = _qkv()
    mask = _mask("causal-left-padding")
    chunked = attention_chunked(q, k, v, mask, SCALE, query_chunk=4, key_chunk=4)
    assert torch.isfinite(chunked).all()
    mean_value = v[0].mean(1)  # (H_kv, hd): every key weighted alike, padding keys included
    assert torch.allclose(chunked[0, :, :6], mean_value.repeat_interleave(3, 0)[:, None].expand(6, 6, 8), atol=1e-5)


def test_chunked_gradients_equal_the_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(tq=13, tk=13))
    mask = AttentionMask(torch.arange(13), 13, causal=True, sliding_window=6, key_padding=LEFT_PADDING[:, 10:])
    weights = torch.randn(2, 6, 13, 8)
    expected = torch.autograd.grad((attention_reference(q, k, v, mask, SCALE, 2.0) * weights).sum(), (q, k, v))
    ours = torch.autograd.grad((attention_chunked(q, k, v, mask, SCALE, 2.0, query_chunk=4, key_chunk=3)
                                * weights).sum(), (q, k, v))
    for a, b in zip(ours, expected):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_blocks_equal_the_full_mask(name):
    for n_queries in (23, 5, 1):
        mask = _mask(name, n_queries=n_queries)
        full = mask.allowed
        for q_start in range(0, n_queries, 4):
            queries = slice(q_start, min(q_start + 4, n_queries))
            first, end = mask.key_range(queries)
            # no allowed key lies outside the range a blockwise path visits
            assert not full[..., queries, :first].any() and not full[..., queries, end:].any()
            for k_start in range(first, end, 3):
                keys = slice(k_start, min(k_start + 3, end))
                block = mask.allowed_block(queries, keys)
                expected = full[..., queries, keys].expand(2, 1, -1, -1)
                if block is None:
                    assert expected.all()
                else:
                    assert torch.equal(block.expand(2, 1, -1, -1), expected)


def test_causal_and_window_key_ranges_skip_masked_blocks():
    mask = AttentionMask(torch.arange(1000), 1000, causal=True, sliding_window=100)
    assert mask.key_range(slice(500, 600)) == (401, 600)
    assert AttentionMask(torch.arange(1000), 1000, causal=True).key_range(slice(0, 256)) == (0, 256)


# ------------------------------------------------------------------------------------------ path choice


def test_auto_rule():
    plain = AttentionMask(torch.arange(8), 8, causal=True)
    assert choose_attention_path(plain, None, 8, 8, training=False) == "sdpa"
    assert choose_attention_path(plain, 30.0, 8, 8, training=False) == "chunked"  # SDPA cannot soft-cap
    assert choose_attention_path(plain, 30.0, 8, 8, training=True) == "explicit"
    side = 4096
    window = AttentionMask(torch.arange(side), side, causal=True, sliding_window=512)
    assert choose_attention_path(window, None, side, side, training=False) == "chunked"
    assert choose_attention_path(window, None, side, side, training=True) == "sdpa"
    assert choose_attention_path(window, None, 1, side, training=False) == "sdpa"  # a decode step: tiny mask
    long_plain = AttentionMask(torch.arange(side), side, causal=True)
    assert choose_attention_path(long_plain, None, side, side, training=False) == "sdpa"
    assert side * side >= CHUNKED_MIN_PAIRS > 2048 * 2048


def _tiny_config(**overrides):
    base = dict(family="llama", vocab_size=50, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=4,
                d_ff=32, context_length=64)
    return ModelConfig(**(base | overrides))


def test_set_attention_path_routes_mix(monkeypatch):
    calls = []
    for name in ("attention_reference", "attention_fast", "attention_chunked"):
        original = getattr(attention_module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(attention_module, name, spy)
    torch.manual_seed(0)
    model = Transformer(_tiny_config()).eval()
    ids = torch.randint(0, 50, (1, 9))
    expected = {"explicit": "attention_reference", "sdpa": "attention_fast", "chunked": "attention_chunked",
                "auto": "attention_fast"}
    with torch.no_grad():
        for path, function in expected.items():
            calls.clear()
            assert set_attention_path(model, path) is model
            model(ids)
            assert calls == [function, function]  # both layers
    with pytest.raises(InputError, match="unknown attention path 'flash'"):
        set_attention_path(model, "flash")
    softcapped = Transformer(_tiny_config(attn_logit_softcap=5.0))
    with pytest.raises(InputError, match="SDPA cannot"):
        set_attention_path(softcapped, "sdpa")
    assert {block.attention.attention_path for block in softcapped.blocks} == {"auto"}  # nothing half-set


@pytest.fixture
def small_chunks(monkeypatch):
    """mix() calls the chunked path with blocks smaller than these tiny sequences, so blocks really split."""
    monkeypatch.setattr(attention_module, "attention_chunked",
                        functools.partial(attention_chunked, query_chunk=3, key_chunk=4))


def _logits_every_way(model, ids, attention_mask):
    """Logits of a padded batch, then of a KV-cached prefix + 1-token + 5-token decode."""
    outputs = [model(ids, attention_mask=attention_mask)]
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1])
    steps = [model(ids[:, :8], kv_cache=cache, attention_mask=attention_mask[:, :8])]
    steps.append(model(ids[:, 8:9], kv_cache=cache, attention_mask=attention_mask[:, :9]))
    steps.append(model(ids[:, 9:14], kv_cache=cache, attention_mask=attention_mask[:, :14]))
    return outputs + steps


@pytest.mark.parametrize("family", ["llama", "gemma3", "bert"])
@torch.no_grad()
def test_whole_tiny_model_forced_to_chunked_gives_the_default_logits(family, tmp_path, small_chunks):
    pytest.importorskip("transformers")
    from tiny_models import VOCAB, tiny_hf_model

    from attnlab.weights import build_model
    from attnlab.weights.huggingface import load_hf_folder

    tiny_hf_model(family, tmp_path)
    model = build_model(*load_hf_folder(tmp_path), str(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # left padding: padding queries that may see no key
    if not model.config.causal:
        attention_mask = attention_mask.flip(1)  # an encoder is padded on the right
    default = _logits_every_way(model, ids, attention_mask)
    set_attention_path(model, "chunked")
    chunked = _logits_every_way(model, ids, attention_mask)
    set_attention_path(model, "explicit")
    explicit = _logits_every_way(model, ids, attention_mask)
    for ours, theirs, reference in zip(chunked, default, explicit):
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert (ours - reference).abs().max().item() <= 1e-4


@torch.no_grad()
def test_soft_capping_model_runs_chunked_by_default_and_matches_explicit(small_chunks):
    torch.manual_seed(0)
    model = Transformer(_tiny_config(attn_logit_softcap=0.5, sliding_window=5,
                                     layer_types=["local", "global"])).eval()
    ids = torch.randint(0, 50, (2, 14))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    default = _logits_every_way(model, ids, attention_mask)  # auto: the chunked path (soft-capping)
    set_attention_path(model, "explicit")
    explicit = _logits_every_way(model, ids, attention_mask)
    for ours, reference in zip(default, explicit):
        assert (ours - reference).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- memory

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from attnlab.attention import AttentionMask, attention_chunked, attention_fast, attention_reference
    torch.set_num_threads(1)
    T, path = int(sys.argv[1]), sys.argv[2]
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    def inputs(T):
        q, k, v = torch.randn(1, 2, T, 16), torch.randn(1, 1, T, 16), torch.randn(1, 1, T, 16)
        padding = torch.ones(1, T, dtype=torch.long)
        padding[0, :7] = 0
        return q, k, v, AttentionMask(torch.arange(T), T, causal=True, sliding_window=T // 2, key_padding=padding)
    function = {"chunked": attention_chunked, "sdpa": attention_fast, "explicit": attention_reference}[path]
    with torch.inference_mode():
        function(*inputs(300), 0.25)  # warm-up: the first call of each op maps in library code
        q, k, v, mask = inputs(T)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
        before = status("VmRSS")
        function(q, k, v, mask, 0.25)
        print(json.dumps({"extra_bytes": status("VmHWM") - before}))
""")


def _extra_peak_bytes(path: str, length: int) -> int:
    """Peak RSS the call adds, in a fresh process; glibc mmaps every allocation ≥ 64 KiB, so each one is
    fresh memory and each free returns it: the peak is what the call had alive at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(length), path], env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_chunked_path_never_materialises_t_by_t():
    """T = 4096, a mask with a window and padding: one T×T bool mask would be 16.8 MB, the T×T scores of
    one head 67 MB. The chunked path (a few MB: blocks of 256 × 256 and their masks) stays under T² bytes, so even a
    single T×T bool tensor fails it; the explicit path (positive control: the measurement can fail) and SDPA
    with its additive (T, T) mask do not."""
    length = 4096
    chunked = _extra_peak_bytes("chunked", length)
    assert chunked < length * length, f"chunked path peaked at {chunked / 2**20:.1f} MB"
    assert _extra_peak_bytes("explicit", length) > 2 * length * length * 4  # scores + probs of 2 heads
    assert _extra_peak_bytes("sdpa", length) > length * length  # the additive (T, T) mask

"""Inference modes (attnlab.fast, compress/quantize.py): quantised matrices, fusion, caching, compiled decode."""

import os
import warnings

import pytest
import torch

from attnlab import fast
from attnlab.compress import quantize
from attnlab.compress.quantize import (
    INT4_DENSE_ROWS,
    Bf16Linear,
    Int4Linear,
    Int8Linear,
    ShortlistHead,
    int4_groups,
    int4_supported,
)
from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.generate import generate_batch_token_ids, generate_token_ids, model_decode_step
from attnlab.model import Transformer


def tiny_llama(**overrides) -> Transformer:
    """A random llama-style model whose matrices the int4 kernel takes (every K a multiple of 32)."""
    torch.manual_seed(0)
    config = ModelConfig(**({"family": "llama", "vocab_size": 96, "d_model": 64, "n_layers": 2, "n_heads": 4,
                             "n_kv_heads": 2, "head_dim": 16, "d_ff": 128, "context_length": 64} | overrides))
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def test_int8_linear_is_the_dequantised_matmul():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 64), torch.randn(48), torch.randn(3, 5, 64)
    layer = Int8Linear(weight, bias)
    dequantised = layer.weight_int8.float() * layer.scales.float()[:, None]
    assert (dequantised - weight).abs().max() <= weight.abs().max() / 127  # half a step, plus bf16 scale rounding
    expected = x @ dequantised.T + bias
    assert (layer(x) - expected).norm() / expected.norm() < 1e-2  # only bf16 rounding of x and the scales
    assert layer(x).dtype == torch.float32 and layer(x).shape == (3, 5, 48)


def test_int4_linear_reproduces_q4_1_blocks_exactly():
    """Weights of the form d·q + m per 32 inputs (what GGUF Q4_1 stores) come back as the same grid."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 96))
    q[:, ::32] = 0  # every block uses its whole range, as Q4_1's quantiser makes it
    q[:, 1::32] = 15
    d = torch.rand(64, 3).mul(0.1).add(0.01).to(torch.bfloat16).float()
    m = torch.randn(64, 3).mul(0.1).to(torch.bfloat16).float()
    weight = (q.reshape(64, 3, 32) * d[..., None] + m[..., None]).reshape(64, 96)
    got_q, scales, zeros = int4_groups(weight, 32)
    assert torch.equal(got_q, q.to(torch.int32))
    layer = Int4Linear(weight)
    identity = torch.eye(96)
    recovered = layer(identity).T  # row n of Ŵ, through the packed kernel
    assert torch.allclose(recovered, weight, atol=2e-2 * weight.abs().max())


def test_dense_matmul_dtype_is_measured_once_per_process():
    assert quantize.dense_matmul_dtype() in (torch.bfloat16, torch.float32)
    assert quantize.dense_matmul_dtype.cache_info().currsize == 1  # functools.cache: timed at the first call only


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32])
def test_int4_many_rows_dequantise_once_and_agree_with_the_kernel(monkeypatch, dense_dtype):
    """A prompt's worth of rows goes through Ŵ dequantised once (one dense matmul, in bf16 or fp32: whichever
    dense_matmul_dtype measured faster), fewer through the packed kernel; both compute x·Ŵᵀ for the same
    Ŵ = s·(q − 8) + z, to bf16 rounding."""
    monkeypatch.setattr(quantize, "dense_matmul_dtype", lambda: dense_dtype)
    torch.manual_seed(0)
    weight, bias = torch.randn(80, 96), torch.randn(80)
    layer = Int4Linear(weight, bias)
    q, scales, zeros = int4_groups(weight, 32)
    scales, zeros = scales.to(torch.bfloat16).float(), zeros.to(torch.bfloat16).float()  # as stored
    exact = ((q.reshape(80, 3, 32) - 8) * scales[..., None] + zeros[..., None]).reshape(80, 96)
    assert layer.weight_nibbles.shape == (80, 3, 16) and layer.weight_nibbles.dtype == torch.uint8  # ½ byte each
    assert torch.allclose(layer.dequantised().float(), exact, rtol=2 ** -8, atol=0)  # one bf16 rounding
    assert torch.allclose(layer.dequantised(torch.float32), exact, rtol=1e-6, atol=1e-6)

    x = torch.randn(INT4_DENSE_ROWS, 96)
    expected = x.to(torch.bfloat16).float() @ exact.T + bias
    used = []

    def recorded(path):
        original = getattr(Int4Linear, path)
        return lambda self, rows: used.append(path) or original(self, rows)

    for path in ("multiply_packed", "multiply_dense"):
        monkeypatch.setattr(Int4Linear, path, recorded(path))
    many, few = layer(x), layer(x[:INT4_DENSE_ROWS - 1])
    assert used == ["multiply_dense", "multiply_packed"]
    for got, want in ((many, expected), (few, expected[:INT4_DENSE_ROWS - 1])):
        assert got.dtype == torch.float32
        assert (got - want).norm() / want.norm() < 5e-3  # bf16 rounding of Ŵ (dense) or of the output
    assert (many[:INT4_DENSE_ROWS - 1] - few).norm() / few.norm() < 5e-3

    used.clear()
    kernel_only = Int4Linear(weight, bias, dense_copy=False)  # the LM head's first pass: no nibbles kept
    assert kernel_only.weight_nibbles is None
    assert torch.equal(kernel_only(x), layer.multiply_packed(x.to(torch.bfloat16)).float() + bias)
    assert used == ["multiply_packed", "multiply_packed"]


def test_int4_shape_rule_and_refusal():
    assert int4_supported(576, 576) and int4_supported(192, 1536)
    assert not int4_supported(48, 48) and not int4_supported(8, 64)
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear(torch.randn(48, 48))


def test_bf16_linear_keeps_fp32_activations():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64), torch.randn(2, 64)
    layer = Bf16Linear(weight)
    assert layer.weight.dtype == torch.bfloat16 and layer(x).dtype == torch.float32
    expected = x @ weight.T
    assert (layer(x) - expected).norm() / expected.norm() < 1e-2


def test_fusing_projections_changes_no_number():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 11))
    expected = model(ids)
    fast.fuse_projections(model)
    attention, mlp = model.blocks[0].attention, model.blocks[0].mlp
    assert attention.w_qkv is not None and not hasattr(attention, "w_q")
    assert mlp.w_gate_up is not None and not hasattr(mlp, "w_gate")
    assert torch.allclose(model(ids), expected, atol=1e-5)


@pytest.mark.parametrize("mode, tolerance", [("bf16", 0.02), ("int8", 0.03), ("int4", 0.15)])
def test_each_mode_stays_close_to_fp32(mode, tolerance):
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 20))
    expected = model(ids)
    fast.prepare(model, mode)
    got = model(ids)
    relative = (got - expected).norm() / expected.norm()
    assert relative < tolerance, f"{mode}: relative logit error {relative:.3f}"
    kinds = {type(module).__name__ for module in model.modules()}
    assert {"bf16": "Bf16Linear", "int8": "Int8Linear", "int4": "Int4Linear"}[mode] in kinds
    assert "Linear" not in kinds  # every matrix was replaced


def test_int4_falls_back_to_int8_for_shapes_its_kernel_refuses():
    model = tiny_llama(d_model=48, n_heads=3, n_kv_heads=1, head_dim=16, d_ff=96)
    fast.prepare(model, "int4")
    assert isinstance(model.blocks[0].attention.w_qkv, Int8Linear)  # K = 48 is no whole number of 32-groups
    assert isinstance(model.blocks[0].mlp.w_down, Int4Linear)  # K = 96 is
    assert model(torch.randint(0, 96, (1, 4))).isfinite().all()


def test_untied_head_is_quantised_too():
    model = tiny_llama(tie_embeddings=False)
    ids = torch.randint(0, 96, (1, 9))
    expected = model(ids)
    fast.prepare(model, "int8")
    assert isinstance(model.quantised_head, Int8Linear) and not hasattr(model, "lm_head")
    assert (model(ids) - expected).norm() / expected.norm() < 0.03


def test_prepared_model_round_trips_through_its_cache_file(tmp_path):
    model = fast.prepare(tiny_llama(), "int4")
    path = tmp_path / "prepared.pt"
    fast.save_prepared(model, path)
    loaded = fast.load_prepared(path)
    assert loaded.quantised_head is loaded.token_embedding.table  # the tied head stays one tensor
    ids = torch.randint(0, 96, (1, 13))
    assert torch.equal(loaded(ids), model(ids))


def test_mode_resolution(monkeypatch):
    small = tiny_llama().config
    assert fast.resolve_mode("auto", small) == "fp32"  # 20M parameters or fewer: nothing to gain
    big = ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                      head_dim=64, d_ff=1536, context_length=8192)
    assert fast.resolve_mode("auto", big) == fast.supported_modes()[-1]
    encoder = ModelConfig(family="bert", vocab_size=30522, d_model=576, n_layers=30, n_heads=9, n_kv_heads=9,
                          head_dim=64, d_ff=1536, context_length=512, causal=False, lm_head=False)
    assert fast.resolve_mode("auto", encoder) == "fp32"
    with pytest.raises(InputError, match="unknown mode 'int3'"):
        fast.resolve_mode("int3", small)
    monkeypatch.setattr(fast, "_cpu_has_bf16", lambda: False)
    assert "bf16" not in fast.supported_modes()
    with pytest.raises(InputError, match="mode bf16 cannot run here: this CPU has no bf16"):
        fast.resolve_mode("bf16", small)


def test_compiled_decode_step_matches_eager_and_is_built_once(tmp_path, monkeypatch):
    """The AOTInductor package decodes the same tokens as the eager model, and a second start reuses it."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    model = fast.prepare(tiny_llama(), "int4")
    prompt = [3, 14, 15, 92, 65]
    expected = list(generate_token_ids(model, prompt, max_new_tokens=12))
    (tmp_path / "compiled").mkdir()
    for age, name in enumerate(("tiny-single-old-build.pt2", "tiny-single-older-build.pt2", "tiny-batch-old.pt2",
                                "other-single-old-build.pt2")):
        (tmp_path / "compiled" / name).write_bytes(b"a package of an earlier attnlab")
        os.utime(tmp_path / "compiled" / name, (1000 - age, 1000 - age))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = fast.compiled_decode_step(model, "tiny", quiet=True)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # torch's notices stay inside the build
    assert list(generate_token_ids(model, prompt, max_new_tokens=12, decode_step=step)) == expected
    # the new build and the most recent earlier one of the same key and kind are kept; other keys and the batch
    # package (another kind) are not touched
    kept = {path.name for path in (tmp_path / "compiled").glob("*.pt2")}
    assert len(kept) == 4 and {"tiny-single-old-build.pt2", "tiny-batch-old.pt2", "other-single-old-build.pt2"} < kept

    def no_rebuild(*args):
        raise AssertionError("the cached package was rebuilt")

    monkeypatch.setattr(fast, "_build_package", no_rebuild)
    again = fast.compiled_decode_step(model, "tiny", quiet=True)
    longer = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # another cache length and capacity
    assert (list(generate_token_ids(model, longer, max_new_tokens=20, decode_step=again))
            == list(generate_token_ids(model, longer, max_new_tokens=20)))


def test_compiled_batch_step_decodes_padded_batches_of_any_size_as_eager(tmp_path, monkeypatch):
    """Batches run a second package, built at the first batch (not at load), generic over the batch size;
    padded rows and unpadded batches decode what the eager model decodes, and the package is reused."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    model = fast.prepare(tiny_llama(), "int4")
    built = []
    build = fast._build_package
    monkeypatch.setattr(fast, "_build_package", lambda *args, **kwargs: built.append(kwargs) or build(*args, **kwargs))
    step = fast.compiled_decode_step(model, "tiny", quiet=True)
    assert built == [{"batched": False}]
    padded = [[3, 14, 15, 92, 65], [2, 7], [18, 28, 18, 28, 45, 90, 45, 23]]
    unpadded = [[5, 6, 7], [8, 9, 10], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with monkeypatch.context() as capped:  # a batch larger than the package takes decodes eagerly, builds nothing
        capped.setattr(fast, "MAX_COMPILED_BATCH", 2)
        assert (generate_batch_token_ids(model, padded, max_new_tokens=5, decode_step=step)
                == generate_batch_token_ids(model, padded, max_new_tokens=5))
        assert built == [{"batched": False}]
    for prompts in (padded, unpadded, padded[:2]):
        assert (generate_batch_token_ids(model, prompts, max_new_tokens=15, decode_step=step)
                == generate_batch_token_ids(model, prompts, max_new_tokens=15))
    assert built == [{"batched": False}, {"batched": True}]
    packages = sorted(path.name.split("-")[1] for path in (tmp_path / "compiled").glob("*.pt2"))
    assert packages == ["batch", "single"]
    again = fast.compiled_decode_step(model, "tiny", quiet=True)
    assert (generate_batch_token_ids(model, padded, max_new_tokens=5, decode_step=again)
            == generate_batch_token_ids(model, padded, max_new_tokens=5))
    assert len(built) == 2  # both packages reused


@pytest.mark.parametrize("batch_size", [1, 3])
def test_disagreement_with_eager_catches_a_wrong_step(batch_size):
    """The check a freshly built package must pass before it is used (or it is deleted)."""
    model = fast.prepare(tiny_llama(), "int4")
    assert fast._disagreement_with_eager(model, model_decode_step(model), batch_size) == 0.0

    def wrong(ids, kv_cache, key_mask, positions):
        kv_cache.advance(1)
        return torch.zeros(ids.shape[0], model.config.vocab_size)

    def ignores_the_padding(ids, kv_cache, key_mask, positions):
        return model_decode_step(model)(ids, kv_cache, None, None)

    assert fast._disagreement_with_eager(model, wrong, batch_size) > fast.MAX_COMPILED_DISAGREEMENT
    if batch_size > 1:
        assert fast._disagreement_with_eager(model, ignores_the_padding, batch_size) > fast.MAX_COMPILED_DISAGREEMENT


def test_shortlist_head_gives_exact_logits_for_its_candidates():
    """Rows of Q8_0's form (s·q per 32 inputs) come back exactly, and the top tokens carry exact logits."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (208, 64)).float()
    q[:, 0], q[:, 32] = 127, -127  # every group uses its whole range, as Q8_0's quantiser makes it
    scales = torch.rand(208, 2) * 0.01 + 0.001
    weight = (q.reshape(208, 2, 32) * scales[..., None]).reshape(208, 64)
    head = ShortlistHead(weight, shortlist=8)
    ids = torch.tensor([[0, 5, 207]])
    assert torch.allclose(head.rows(ids), weight[ids], rtol=1e-6, atol=0)
    x = torch.randn(3, 64)
    exact = x @ weight.T
    got = head(x)
    top = exact.topk(3, dim=-1)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert torch.allclose(got.gather(-1, top.indices), top.values, rtol=1e-5, atol=1e-5)
    assert (got - exact).norm() / exact.norm() < 0.1  # the rest: int4-accurate

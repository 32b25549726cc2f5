"""The GGUF loader on tiny files written like llama.cpp writes them, against transformers and gguf."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from gguf_writer import write_llama_gguf
from tiny_models import tiny_hf_model

import attnlab
from attnlab.errors import WeightsFormatError
from attnlab.weights.gguf import load_gguf, unpermute_rope_rows

pytest.importorskip("transformers")

# Quant types whose tiny test weights gguf can write (it has no Python K-quant encoder; Q4_K and
# Q6_K are checked on the real Gemma-3 file, Q4_1 and Q8_0 on the real SmolLM2 file).
WRITABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-gguf")
    # head_dim 64 and d 256: rows must be multiples of the 32-value quant blocks.
    return tiny_hf_model("llama", folder, vocab_size=256, hidden_size=256, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("quant", WRITABLE)
def test_gguf_dequantises_each_type_like_gguf_and_matches_transformers(tiny_llama, tmp_path, quant):
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tiny_llama, tmp_path / f"tiny-{quant}.gguf", quant)
    config, state = load_gguf(path)
    assert (config.n_heads, config.n_kv_heads, config.head_dim) == (4, 2, 64)
    original = tiny_llama.model.layers[0].mlp.up_proj.weight.detach().numpy()
    kind = gguf.GGMLQuantizationType[quant]
    expected = original if quant == "F32" else dequantize(quantize(original, kind), kind)
    assert np.allclose(state["blocks.0.mlp.w_up.weight"].numpy(), expected, atol=1e-6)

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    lm = attnlab.load(path, use_cache=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (lm.logits(ids) - reference(ids).logits).abs().max().item() <= 1e-3


def test_unpermute_inverts_llama_cpp_permutation():
    from gguf_writer import llama_cpp_permute

    weight = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8
    restored = unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(weight, 2).copy()), 2)
    assert torch.equal(restored, torch.from_numpy(weight))


def test_truncated_and_corrupt_gguf_raise_clear_errors(tiny_llama, tmp_path):
    path = write_llama_gguf(tiny_llama, tmp_path / "full.gguf")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match="truncated or corrupt"):
        attnlab.load(truncated, use_cache=False)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(WeightsFormatError, match="not a valid GGUF"):
        attnlab.load(garbage, use_cache=False)


def test_unknown_quant_type_is_named(tiny_llama, tmp_path):
    path = tmp_path / "i8.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.int8), raw_dtype=gguf.GGMLQuantizationType.I8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    from attnlab.weights.gguf import dequantised

    with pytest.raises(WeightsFormatError, match="quant type I8"):
        dequantised(reader.tensors[0], path)


def test_unknown_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsFormatError, match="unknown architecture 'mamba'"):
        attnlab.load(path, use_cache=False)

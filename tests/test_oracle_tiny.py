"""Oracle tests: tiny random models of every family, built by transformers, loaded by attnlab.

Same weights ⇒ same logits (max |Δ| ≤ 1e-3), same attention probabilities (≤ 1e-4), the same 32
greedy tokens, and KV-cached decoding equal to recomputing from scratch.
"""

import pytest
import torch
from tiny_models import VOCAB, tiny_hf_model

from attnlab.capture import Capture
from attnlab.generate import generate_token_ids
from attnlab.weights import build_model
from attnlab.weights.huggingface import load_hf_folder

pytest.importorskip("transformers")

CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2-untied": ("gpt2", {"tie_word_embeddings": False}),
    "llama-gqa": ("llama", {}),
    "llama-mqa-tied-hd24": ("llama", {"num_key_value_heads": 1, "head_dim": 24, "tie_word_embeddings": True}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 6, "attention_bias": True, "mlp_bias": True}),
    "qwen3": ("qwen3", {}),
    "qwen3-untied-gqa": ("qwen3", {"num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}),
    "gemma3": ("gemma3", {}),
    "gemma3-softcap-mqa": ("gemma3", {"num_key_value_heads": 1, "final_logit_softcapping": 3.0}),
    "bert": ("bert", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    reference = tiny_hf_model(family, folder, **overrides)
    config, state = load_hf_folder(folder)
    return reference, build_model(config, state, str(folder))


def _ids(batch: int = 2, length: int = 14) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_logits_and_attention_probabilities_match(pair):
    reference, model = pair
    ids = _ids()
    expected = reference(ids, output_attentions=True)
    capture = Capture(points=("probs",))
    ours = model(ids, capture=capture)
    expected_out = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
    assert (ours - expected_out).abs().max().item() <= 1e-3
    assert (model(ids) - expected_out).abs().max().item() <= 1e-3  # the fast path, no capture
    probs = capture.stacked("probs")  # (layers, B, H, T, T)
    assert (probs - torch.stack(expected.attentions)).abs().max().item() <= 1e-4


@torch.no_grad()
def test_padding_mask_matches(pair):
    reference, model = pair
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding on the second row
    expected = reference(ids, attention_mask=mask)
    expected_out = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
    ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - expected_out[real]).abs().max().item() <= 1e-3


@torch.no_grad()
def test_greedy_tokens_identical_for_32_steps(pair):
    reference, model = pair
    if not model.config.lm_head:
        pytest.skip("encoder: no generation")
    prompt = _ids(1, 6)
    expected = reference.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    ours = list(generate_token_ids(model, prompt[0].tolist(), max_new_tokens=32))
    assert ours == expected


@torch.no_grad()
def test_kv_cached_decode_equals_full_recomputation(pair):
    _, model = pair
    if not model.config.causal:
        pytest.skip("encoder: no incremental decoding")
    from attnlab.kv_cache import KVCache

    config = model.config
    ids = _ids(1, 20)
    full = model(ids)
    cache = KVCache(config.n_layers, 1, config.n_kv_heads, 20, config.head_dim)
    steps = [model(ids[:, :8], kv_cache=cache)]
    steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(8, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_attention_map_equals_transformers_eager_attentions(pair):
    """lm.attention (the inspection API) shows exactly the probabilities transformers computes."""
    from attnlab.lm import LanguageModel
    from attnlab.tokenizer import CharTokenizer

    reference, model = pair
    lm = LanguageModel(model, CharTokenizer([chr(0x3041 + i) for i in range(VOCAB)]), "tiny")
    ids = _ids(batch=1)
    expected = torch.stack(reference(ids, output_attentions=True).attentions)[:, 0]  # (layers, H, T, T)
    amap = lm.attention(ids[0].tolist())
    assert amap.probs.shape == expected.shape
    assert (amap.probs - expected).abs().max().item() <= 1e-4
    some = lm.attention(ids[0].tolist(), layers=[1], heads=[2, 0])
    assert torch.allclose(some.probs[0], amap.probs[1, [2, 0]], atol=1e-5)  # layer 0 ran the fused path here

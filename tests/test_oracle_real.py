"""Oracle tests on the real embedded models: attnlab vs transformers with the same weights (fp32)."""

import pytest
import torch

import attnlab
from attnlab.capture import Capture
from attnlab.generate import generate_token_ids
from attnlab.kv_cache import KVCache

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PARIS_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." + <|im_end|>


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                     dtype=torch.float32, attn_implementation="eager").eval()
    return reference, attnlab.load("smollm2-135m-instruct")


@torch.no_grad()
def test_smollm2_logits_and_attention_match_transformers(smollm2):
    reference, lm = smollm2
    ids = torch.tensor([lm.prompt_ids("The cat sat on the mat because it was tired.", chat=True)])
    expected = reference(ids, output_attentions=True)
    capture = Capture(points=("probs",))
    logits = lm.model(ids, capture=capture)
    assert (logits - expected.logits).abs().max().item() <= 1e-3
    assert (lm.logits(ids) - expected.logits).abs().max().item() <= 1e-3
    assert (capture.stacked("probs") - torch.stack(expected.attentions)).abs().max().item() <= 1e-4


@torch.no_grad()
def test_smollm2_attention_map_equals_transformers(smollm2):
    reference, lm = smollm2
    amap = lm.attention("The cat sat on the mat because it was tired.")
    expected = torch.stack(reference(torch.tensor([amap.token_ids]), output_attentions=True).attentions)[:, 0]
    assert amap.tokens[7] == " it" and amap.probs.shape == (30, 9, 11, 11)
    assert (amap.probs - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_smollm2_greedy_tokens_match_for_32_steps_and_answer_paris(smollm2):
    reference, lm = smollm2
    ids = lm.prompt_ids("What is the capital of France?", chat=True)
    assert len(ids) == 37
    ours = list(generate_token_ids(lm.model, ids, max_new_tokens=32, stop_ids=lm.tokenizer.stop_ids))
    assert ours == PARIS_IDS  # stops at <|im_end|>
    story = lm.prompt_ids("Once upon a time")
    expected = reference.generate(torch.tensor([story]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=2)[0, len(story):].tolist()
    assert list(generate_token_ids(lm.model, story, max_new_tokens=32)) == expected
    assert "Paris" in lm.generate("What is the capital of France?", chat=True)


@torch.no_grad()
def test_smollm2_kv_cached_decode_equals_full_recomputation(smollm2):
    _, lm = smollm2
    config = lm.config
    ids = torch.tensor([lm.prompt_ids("The quick brown fox jumps over the lazy dog, and then")])
    full = lm.model(ids)
    cache = KVCache(config.n_layers, 1, config.n_kv_heads, ids.shape[1], config.head_dim)
    parts = [lm.model(ids[:, :5], kv_cache=cache)] + [lm.model(ids[:, t:t + 1], kv_cache=cache)
                                                       for t in range(5, ids.shape[1])]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-3


@torch.no_grad()
def test_minilm_hidden_states_and_attention_match_transformers():
    from transformers import AutoModel

    from attnlab.errors import ModelNotFoundError
    from attnlab.weights.registry import resolve_named_model

    try:
        folder = resolve_named_model("minilm-l6")
    except ModelNotFoundError as error:
        pytest.skip(str(error))
    reference = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    lm = attnlab.load("minilm-l6")
    ids = torch.tensor([lm.tokenizer.encode("The cat sat on the mat because it was tired.")])
    expected = reference(ids, output_attentions=True)
    capture = Capture()
    hidden = lm.model(ids, capture=capture)
    assert (hidden - expected.last_hidden_state).abs().max().item() <= 1e-3
    amap = lm.attention("The cat sat on the mat because it was tired.")  # the inspection API, bidirectional
    assert amap.tokens[0] == "[CLS]" and not amap.causal
    assert (amap.probs - torch.stack(expected.attentions)[:, 0]).abs().max().item() <= 1e-4
    assert (capture.stacked("probs") - torch.stack(expected.attentions)).abs().max().item() <= 1e-4
    cats, stocks = lm.embed(["A cat sleeps on the mat.", "A kitten naps on a rug."]), lm.embed(["Stock prices fell."])
    assert float(cats[0] @ cats[1]) > float(cats[0] @ stocks[0]) + 0.3


@pytest.mark.slow
@torch.no_grad()
def test_gemma3_logits_and_attention_match_transformers():
    from transformers import AutoModelForCausalLM

    from attnlab.errors import ModelNotFoundError
    from attnlab.weights.registry import resolve_named_model

    try:
        path = resolve_named_model("gemma3-270m")
    except ModelNotFoundError as error:
        pytest.skip(str(error))
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    lm = attnlab.load("gemma3-270m")
    ids = torch.tensor([lm.tokenizer.encode("The cat sat on the mat because it was tired.")])
    expected = reference(ids, output_attentions=True)
    capture = Capture()
    assert (lm.model(ids, capture=capture) - expected.logits).abs().max().item() <= 1e-3
    assert (capture.stacked("probs") - torch.stack(expected.attentions)).abs().max().item() <= 1e-4
    prompt = lm.tokenizer.encode("The capital of France is")
    expected_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert list(generate_token_ids(lm.model, prompt, max_new_tokens=32)) == expected_tokens.tolist()

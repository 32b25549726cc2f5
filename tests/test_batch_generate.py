"""Batch generation: several prompts decoded together, left-padded, each row computing what it would alone."""

import pytest
import torch
from tiny_models import VOCAB, tiny_hf_model

import attnlab
from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.generate import (
    SamplingConfig,
    generate_batch_steps,
    generate_batch_token_ids,
    generate_token_ids,
    left_pad,
)
from attnlab.lm import LanguageModel
from attnlab.model import Transformer
from attnlab.tokenizer import CharTokenizer
from attnlab.weights import build_model
from attnlab.weights.huggingface import load_hf_folder

LENGTHS = (1, 5, 17)  # one prompt shorter than the others by 16 padding slots, one by 12, one not padded


def _prompts(lengths=LENGTHS, vocab: int = VOCAB, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3"])  # RoPE + GQA, learned positions, sliding window
def tiny(request, tmp_path_factory) -> Transformer:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp(request.param)
    tiny_hf_model(request.param, folder)
    config, state = load_hf_folder(folder)
    return build_model(config, state, str(folder))


def test_batched_greedy_tokens_equal_each_prompt_alone(tiny):
    prompts = _prompts()
    alone = [list(generate_token_ids(tiny, prompt, max_new_tokens=24)) for prompt in prompts]
    assert generate_batch_token_ids(tiny, prompts, max_new_tokens=24) == alone
    assert generate_batch_token_ids(tiny, prompts[::-1], max_new_tokens=24) == alone[::-1]
    assert len({tuple(tokens) for tokens in alone}) == 3  # the rows differ: a mixed-up row would show


@torch.no_grad()
def test_batched_logits_equal_a_full_recomputation_at_every_step(tiny):
    prompts = _prompts()
    sequences = [list(prompt) for prompt in prompts]
    steps = 0
    for step in generate_batch_steps(tiny, prompts, max_new_tokens=12):
        for row, token in enumerate(step.tokens):
            expected = tiny(torch.tensor([sequences[row]]))[0, -1]  # no cache, no padding, no batch
            assert (step.logits[row] - expected).abs().max().item() <= 1e-5, (row, steps)
            sequences[row].append(token)
        steps += 1
    assert steps == 12


@torch.no_grad()
def test_a_left_padded_forward_equals_each_row_alone_at_every_position(tiny):
    prompts = _prompts()
    ids, key_mask, positions = left_pad(prompts, max(LENGTHS), torch.device("cpu"))
    assert key_mask[0].tolist() == [False] * 16 + [True] and positions[1].tolist() == [0] * 12 + [0, 1, 2, 3, 4]
    logits = tiny(ids, attention_mask=key_mask, position_ids=positions)
    for row, prompt in enumerate(prompts):
        alone = tiny(torch.tensor([prompt]))[0]
        assert (logits[row, -len(prompt):] - alone).abs().max().item() <= 1e-5


def test_rows_stop_independently_and_the_loop_ends_with_the_last_row(tiny):
    prompts = _prompts()
    free = [list(generate_token_ids(tiny, prompt, max_new_tokens=20)) for prompt in prompts]
    stop = frozenset({free[1][3]})  # row 1 stops at its 4th token at the latest
    alone = [list(generate_token_ids(tiny, prompt, max_new_tokens=20, stop_ids=stop)) for prompt in prompts]
    batch = generate_batch_token_ids(tiny, prompts, max_new_tokens=20, stop_ids=stop)
    assert batch == alone
    assert batch[1][-1] in stop and len(batch[1]) <= 4 and max(map(len, batch)) > len(batch[1])
    every_row_stops = frozenset(tokens[2] for tokens in free)
    alone = [list(generate_token_ids(tiny, prompt, max_new_tokens=20, stop_ids=every_row_stops)) for prompt in prompts]
    steps = list(generate_batch_steps(tiny, prompts, max_new_tokens=20, stop_ids=every_row_stops))
    assert len(steps) == max(map(len, alone)) <= 3  # ends when the last row stops, not at max_new_tokens
    for row, tokens in enumerate(alone):
        assert [step.tokens[row] for step in steps] == tokens + [None] * (len(steps) - len(tokens))


def test_a_batch_of_one_is_the_single_prompt_path(tiny):
    prompt = _prompts()[1]
    assert generate_batch_token_ids(tiny, [prompt], max_new_tokens=10) == [
        list(generate_token_ids(tiny, prompt, max_new_tokens=10))]


def test_sampling_row_i_is_that_prompt_alone_with_seed_plus_i(tiny):
    first, second, _ = _prompts()
    prompts = [first, second, first]  # the same prompt twice: seeds 7 and 9 give it two different samples
    sampling = SamplingConfig(temperature=1.0, seed=7)
    batch = generate_batch_token_ids(tiny, prompts, max_new_tokens=16, sampling=sampling)
    for row, prompt in enumerate(prompts):
        alone = SamplingConfig(temperature=1.0, seed=7 + row)
        assert batch[row] == list(generate_token_ids(tiny, prompt, max_new_tokens=16, sampling=alone))
    assert batch == generate_batch_token_ids(tiny, prompts, max_new_tokens=16, sampling=sampling)
    assert batch[0] != batch[2]


def _small_model(positions: str, context: int = 64) -> Transformer:
    torch.manual_seed(0)
    if positions == "learned":
        config = ModelConfig(family="gpt2", vocab_size=20, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                             head_dim=8, d_ff=32, context_length=context, norm="layernorm", mlp="gelu",
                             positions="learned")
    else:
        config = ModelConfig(family="llama", vocab_size=20, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                             head_dim=8, d_ff=32, context_length=context)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.token_embedding.weight.mul_(20)  # a random model with some preference between tokens
    return model


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_past_the_context_each_row_slides_exactly_when_it_would_alone(positions):
    """Context 16, prompts of 1, 5 and 12 tokens, 40 new tokens: each row's window fills the context at
    another step; every step's tokens and logits are those of the prompt run alone."""
    model = _small_model(positions, context=16)
    prompts = _prompts((1, 5, 12), vocab=20)
    batch_steps = list(generate_batch_steps(model, prompts, max_new_tokens=40))
    assert len(batch_steps) == 40
    for row, prompt in enumerate(prompts):
        alone = list(generate_batch_steps(model, [prompt], max_new_tokens=40))
        assert [step.tokens[row] for step in batch_steps] == [step.tokens[0] for step in alone]
        difference = max((b.logits[row] - a.logits[0]).abs().max().item() for b, a in zip(batch_steps, alone))
        scale = max(a.logits[0].abs().max().item() for a in alone)  # ~300 here: fp32 spacing there is 3e-5
        assert difference <= 1e-6 * scale


@pytest.mark.parametrize(("prompts", "message"), [
    ([], "no prompts"),
    ([[]], "the prompt is empty"),
    ([[1, 2], []], "prompt 2 of 2 is empty"),
    ([1, 2, 3], "list of token-id lists"),
    ([[1], [5] * 65], "prompt 2 of 2 is 65 tokens, longer than the model's context of 64"),
    ([[3, 20]], "token id 20, outside the vocabulary [0, 20)"),
])
def test_bad_batches_are_one_line_input_errors(prompts, message):
    model = _small_model("rope")
    with pytest.raises(InputError) as error:
        generate_batch_token_ids(model, prompts, max_new_tokens=3)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match="max-new-tokens"):
        generate_batch_token_ids(model, [[1], [2]], max_new_tokens=-1)
    assert generate_batch_token_ids(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]


def test_language_model_generate_batch_equals_generate_with_stop_strings_per_row():
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .")
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=2,
                         n_kv_heads=1, head_dim=8, d_ff=32, context_length=64)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.token_embedding.weight.mul_(10)
    lm = LanguageModel(model, tokenizer, "tiny")
    prompts = ["the cat", "a", "hello world said the dog"]
    free = [lm.generate(prompt, max_new_tokens=20) for prompt in prompts]
    stop = [free[0][4:6]]  # cuts row 0's text; may or may not occur in the others
    assert lm.generate_batch(prompts, max_new_tokens=20, stop=stop) == [
        lm.generate(prompt, max_new_tokens=20, stop=stop) for prompt in prompts]
    assert len(lm.generate_batch(prompts, max_new_tokens=20, stop=stop)[0]) == free[0].find(stop[0]) <= 4
    assert lm.generate_batch(prompts, max_new_tokens=20, temperature=0.9, seed=3)[2] == lm.generate(
        prompts[2], max_new_tokens=20, temperature=0.9, seed=5)
    with pytest.raises(InputError, match="^prompt 2 of 3: the prompt is empty"):
        lm.generate_batch(["ab", "  ", "cd"], max_new_tokens=2)
    with pytest.raises(InputError, match="list of prompts"):
        lm.generate_batch("ab", max_new_tokens=2)
    with pytest.raises(InputError, match="no prompts"):
        lm.generate_batch([], max_new_tokens=2)


def test_smollm2_three_prompts_in_one_batch_equal_each_alone(smollm2_path):
    lm = attnlab.load("smollm2-135m-instruct")
    prompts = [lm.prompt_ids("Once upon a time"),
               lm.prompt_ids("The three most important inventions of the nineteenth century were"),
               lm.prompt_ids("What is the capital of France?", chat=True)]
    assert len({len(prompt) for prompt in prompts}) == 3
    stop_ids = lm.tokenizer.stop_ids
    alone = [list(generate_token_ids(lm.model, prompt, max_new_tokens=16, stop_ids=stop_ids)) for prompt in prompts]
    assert generate_batch_token_ids(lm.model, prompts, max_new_tokens=16, stop_ids=stop_ids) == alone
    assert alone[2] == [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." and <|im_end|>
    assert all(len(tokens) == 16 for tokens in alone[:2])


def test_batch_throughput_rows_measure_the_same_work_at_every_size():
    from attnlab.throughput import batch_throughput

    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .")
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2,
                         n_kv_heads=1, head_dim=8, d_ff=32, context_length=64)
    lm = LanguageModel(Transformer(config).eval(), tokenizer, "tiny")
    rows = batch_throughput(lm, [4, 1, 2], new_tokens=5, repeats=2, prompts=["the cat", "a", "dogs run"])
    assert [row["batch_size"] for row in rows] == [1, 2, 4]
    assert all(row["sequences"] == 4 and row["same_tokens_as_baseline"] and row["sequences_same_as_baseline"] == 4
               for row in rows)  # 3 prompts cycled to 4
    assert rows[0]["ratio"] == 1.0 and rows[0]["baseline_batch_size"] == 1
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(4 * 5 / row["seconds"], rel=0.01)
        assert row["per_sequence_tokens_per_s"] == pytest.approx(row["tokens_per_s"] / row["batch_size"], rel=0.01)
    with pytest.raises(InputError, match="batch sizes"):
        batch_throughput(lm, [0, 2], new_tokens=5, repeats=1)


@pytest.mark.parametrize(("spec", "positions"), [("sigmoid", "rope"), ("linear:elu", "rope"), ("kernel", "rope"),
                                                  ("merged-qk:4", "learned"), ("no-q", "rope"),
                                                  ("sliding-window:3", "rope")])
def test_every_attention_variant_batches_as_each_prompt_alone(spec, positions):
    """Each variant masks the padding its own way (sigmoid: σ(−big) = 0; linear: the weights × mask);
    context 32 with 12 + 30 tokens also slides the longest row."""
    torch.manual_seed(0)
    family = dict(family="gpt2", positions="learned", norm="layernorm", mlp="gelu") if positions == "learned" else {
        "family": "llama"}
    config = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32,
                         context_length=32, attention=spec, **family)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.token_embedding.weight.mul_(20)
    prompts = _prompts((1, 5, 12), vocab=20)
    alone = [list(generate_token_ids(model, prompt, max_new_tokens=30)) for prompt in prompts]
    assert generate_batch_token_ids(model, prompts, max_new_tokens=30) == alone

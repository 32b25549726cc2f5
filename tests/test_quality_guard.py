"""The quality guard of the inference modes, on the real SmolLM2-135M-Instruct (issue 6, item 5).

Greedy fidelity is measured teacher-forced: the fp32 model generates 64 greedy tokens per prompt; each mode
then reads prompt + those tokens in one pass, and at every step we ask whether its argmax is fp32's token.
(Free-running generations diverge for good after one flip, which says little about the other 63 steps.)
"""

import pytest
import torch

import attnlab
from attnlab import fast
from attnlab.data.corpora import read_corpus
from attnlab.evaluate import perplexity
from attnlab.generate import generate_token_ids

STEPS = 64
PROMPTS = [("What is the capital of France?", True), ("Write a haiku about the sea.", True),
           ("The history of the printing press began", False)]
# per-step agreement with fp32 each mode must keep, and the perplexity change it may cost
MIN_AGREEMENT = {"bf16": 0.95, "int8": 0.95, "int4": 0.95}
MAX_PERPLEXITY_CHANGE = {"bf16": 0.01, "int8": 0.03, "int4": 0.10}


@pytest.fixture(scope="module")
def reference(smollm2_path):
    lm = attnlab.load("smollm2-135m-instruct")
    sequences = []
    for prompt, chat in PROMPTS:
        ids = lm.prompt_ids(prompt, chat=chat)
        sequences.append((ids, list(generate_token_ids(lm.model, ids, max_new_tokens=STEPS))))
    text = read_corpus("sotu")
    return lm, sequences, perplexity(lm, text, context=512, max_tokens=2048), text


def teacher_forced_agreement(lm, sequences) -> float:
    """Fraction of steps at which ``lm``'s greedy token, given fp32's prefix, is fp32's token."""
    agree = total = 0
    with torch.inference_mode():
        for prompt, generated in sequences:
            ids = torch.tensor([prompt + generated[:-1]])
            predicted = lm.model(ids)[0, len(prompt) - 1:].argmax(-1).tolist()
            agree += sum(p == g for p, g in zip(predicted, generated))
            total += len(generated)
    return agree / total


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_mode_keeps_greedy_tokens_and_perplexity(reference, mode):
    if fast.mode_unavailable(mode):
        pytest.skip(fast.mode_unavailable(mode))
    fp32, sequences, fp32_perplexity, text = reference
    lm = attnlab.load("smollm2-135m-instruct", mode=mode, compile=False)
    assert lm.mode == mode
    agreement = teacher_forced_agreement(lm, sequences)
    change = perplexity(lm, text, context=512, max_tokens=2048).perplexity / fp32_perplexity.perplexity - 1
    print(f"{mode}: greedy agreement {agreement:.1%}, perplexity {change:+.2%}")
    assert agreement >= MIN_AGREEMENT[mode], f"{mode}: {agreement:.1%} of greedy steps agree with fp32"
    assert abs(change) <= MAX_PERPLEXITY_CHANGE[mode], f"{mode}: perplexity {change:+.2%} against fp32"


def test_fp32_mode_is_the_reference_itself(reference):
    fp32, sequences, _, _ = reference
    assert fp32.mode == "fp32" and teacher_forced_agreement(fp32, sequences) == 1.0


def test_default_generation_path_keeps_fp32s_greedy_tokens(reference):
    """The path `attnlab generate` takes (auto mode, compiled decode step), teacher-forced one step at a time on
    fp32's tokens: issue 6's bar is 99 % of steps. The compiled step is not bit-identical to the eager model
    (inductor fuses bf16 casts away), so both are held to fp32, and to each other within the bound the package
    check uses."""
    _, sequences, _, _ = reference
    lm = attnlab.load("smollm2-135m-instruct", mode="auto")
    if lm.mode == "fp32":
        pytest.skip("no quantised mode runs on this machine, so nothing is compiled by default")
    assert lm.decode_step is not None  # compiled (built here on a fresh machine, ~2 min, else cached)
    agree = total = 0
    largest_gap = 0.0
    with torch.inference_mode():
        for prompt, generated in sequences:
            compiled_cache = lm.model.new_kv_cache(1, len(prompt) + len(generated))
            eager_cache = lm.model.new_kv_cache(1, len(prompt) + len(generated))
            logits = lm.model(torch.tensor([prompt]), kv_cache=compiled_cache, last_position_only=True)[:, -1]
            lm.model(torch.tensor([prompt]), kv_cache=eager_cache, last_position_only=True)
            for token in generated[:-1]:  # logits predict this token; then it is fed in
                agree += int(logits.argmax(-1).item() == token)
                total += 1
                step = torch.tensor([[token]])
                logits = lm.decode_step(step, compiled_cache)
                eager = lm.model(step, kv_cache=eager_cache, last_position_only=True)[:, -1]
                top = eager.topk(10, dim=-1).indices  # the shortlisted tokens, exact in both (see ShortlistHead)
                gap = (logits.gather(-1, top) - eager.gather(-1, top)).abs().max() / eager.abs().max()
                largest_gap = max(largest_gap, gap.item())
            agree += int(logits.argmax(-1).item() == generated[-1])
            total += 1
    print(f"default path ({lm.mode}, compiled): {agree / total:.1%} of {total} steps = fp32; "
          f"top-10 logits compiled − eager: up to {largest_gap:.2%} of the largest")
    assert agree / total >= 0.99
    assert largest_gap < fast.MAX_COMPILED_DISAGREEMENT

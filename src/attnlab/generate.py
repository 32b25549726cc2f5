"""Sampling and the KV-cached decode loop (after gpt-fast: prefill once, then one token per step).

The prompt is run once to fill the cache; each new token then costs one forward pass over a single
position. Text is streamed as it becomes printable: partial UTF-8 characters and anything that
could still turn into a stop string are held back until resolved.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from attnlab.errors import InputError
from attnlab.kv_cache import KVCache
from attnlab.model import Transformer

# ids (B, 1) of the newest tokens, the cache → next-token logits (B, vocab)
DecodeStep = Callable[[torch.Tensor, KVCache], torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax); otherwise sample from softmax(logits / T) after top-k / top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise InputError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top-k must be ≥ 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")


def sample_next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """Pick the next token id from one row of logits (vocab,)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        kth_largest = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        # Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches p.
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[mass_before >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_token_ids(model: Transformer, prompt_ids: Sequence[int], *, max_new_tokens: int,
                       sampling: SamplingConfig = SamplingConfig(),
                       stop_ids: frozenset[int] = frozenset(),
                       decode_step: DecodeStep | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; stops after a stop id (yielded) or max_new_tokens.

    decode_step(ids (1, 1), cache) → logits (1, vocab) runs each single-token step (a compiled one, from
    ``attnlab.fast``); by default the model itself.

    Generation may run past the model's context: when it is full, decoding continues on its most
    recent half (positions restart, as they must for a model trained on windows of that length).
    """
    config = model.config
    if not config.lm_head:
        raise InputError(f"a {config.family} encoder has no language-model head: it cannot generate text")
    if not prompt_ids:
        raise InputError("the prompt is empty: give at least one token of text")
    if max_new_tokens < 0:
        raise InputError(f"max-new-tokens must be ≥ 0, got {max_new_tokens}")
    if len(prompt_ids) > config.context_length:
        raise InputError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of "
                         f"{config.context_length}; shorten it")
    if max_new_tokens == 0:
        return
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    device = model.device
    capacity = min(len(prompt_ids) + max_new_tokens, config.context_length)
    sequence = list(prompt_ids)

    def prefill(window: list[int]) -> tuple[KVCache, torch.Tensor]:
        cache = model.new_kv_cache(1, capacity, dtype=model.dtype, device=device)
        ids = torch.tensor([window], device=device)
        return cache, model(ids, kv_cache=cache, last_position_only=True)[0, -1]

    cache, logits = prefill(sequence)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, sampling, generator)
        yield token
        if token in stop_ids or step == max_new_tokens - 1:
            return
        sequence.append(token)
        if cache.length == config.context_length:
            # The context is full (a small trained model's 64 tokens, say): keep going on the most
            # recent half of it, recomputed once, rather than stop (nanoGPT crops the same way).
            cache, logits = prefill(sequence[-(config.context_length // 2):])
            continue
        ids = torch.tensor([[token]], device=device)
        if decode_step is None:
            logits = model(ids, kv_cache=cache, last_position_only=True)[0, -1]  # one decode step
        else:
            logits = decode_step(ids, cache)[0]


def stream_text(token_ids: Iterator[int], decode, stop_ids: frozenset[int],
                stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Turn a stream of ids into a stream of text pieces; cut at the first stop string.

    ``decode(ids) -> str`` decodes the whole generated sequence each time, which keeps multi-token
    characters and tokenizer spacing rules right; the pieces yielded join to the final text.
    """
    generated: list[int] = []
    emitted = 0
    text = ""
    for token in token_ids:
        if token in stop_ids:
            break
        generated.append(token)
        text = decode(generated)
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            safe = len(text.rstrip("\ufffd"))
        for stop in stop_strings:  # hold back a tail that may be the start of a stop string
            for length in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:length]):
                    safe -= length
                    break
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]

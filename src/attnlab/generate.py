"""Sampling and the KV-cached decode loop (after gpt-fast: prefill once, then one token per step).

The prompt is run once to fill the cache; each new token then costs one forward pass over a single
position. Several prompts decode together as one left-padded batch (one loop: a single prompt is a
batch of one), so each step's weight reads serve every row. Text is streamed as it becomes
printable: partial UTF-8 characters and anything that could still turn into a stop string are
held back until resolved.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.kv_cache import KVCache
from attnlab.model import Transformer


class DecodeStep(Protocol):
    """ids (B, 1) of the newest tokens, the cache, the key mask over the filled slots and the new one
    (B, length + 1) and each row's position (B, 1) (both None unless the batch is padded) → next-token logits
    (B, vocab); the step writes the new keys and values into the cache and advances it."""

    def __call__(self, ids: torch.Tensor, kv_cache: KVCache, key_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor: ...


def model_decode_step(model: Transformer) -> DecodeStep:
    """The single-token step through the model itself (eager PyTorch): the default, and the reference a
    compiled step (``attnlab.fast``) is checked against."""

    def step(ids: torch.Tensor, kv_cache: KVCache, key_mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        return model(ids, attention_mask=key_mask, position_ids=positions, kv_cache=kv_cache,
                     last_position_only=True)[:, -1]

    return step


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


PAD_ID = 0  # fed at padding slots and to finished rows: any id works, no real token attends to them


@dataclass(frozen=True)
class BatchStep:
    """One decode step of a batch: each row's new token (None where the row had already finished)
    and the logits (B, vocab) the tokens were chosen from (a finished row's logits mean nothing)."""

    tokens: list[int | None]
    logits: torch.Tensor


def check_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """The prompts as lists of ints, or an InputError naming the first bad one (one line)."""
    if not config.lm_head:
        raise InputError(f"a {config.family} encoder has no language-model head: it cannot generate text")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise InputError("no prompts: give at least one prompt of token ids")
    checked = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, int):
            raise InputError("prompts must be a list of token-id lists, one per prompt (got a list of ints)")
        name = "the prompt" if len(prompts) == 1 else f"prompt {row + 1} of {len(prompts)}"
        ids = [int(token) for token in prompt]
        if not ids:
            raise InputError(f"{name} is empty: give at least one token of text")
        if len(ids) > config.context_length:
            raise InputError(f"{name} is {len(ids)} tokens, longer than the model's context of "
                             f"{config.context_length}; shorten it")
        bad = [token for token in ids if not 0 <= token < config.vocab_size]
        if bad:
            raise InputError(f"{name} holds token id {bad[0]}, outside the vocabulary [0, {config.vocab_size})")
        checked.append(ids)
    if max_new_tokens < 0:
        raise InputError(f"max-new-tokens must be ≥ 0, got {max_new_tokens}")
    return checked


def left_pad(windows: Sequence[Sequence[int]], capacity: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Right-align token windows of different lengths in one block.

    Returns ids (B, T) with PAD_ID before each shorter row; the key mask (B, capacity), False on
    padding slots and True on every later slot (the tokens still to come); and each token's position
    in its own row (B, T), padding clamped to 0. The last two are None when no row is padded.
    """
    length = max(len(window) for window in windows)
    ids = torch.full((len(windows), length), PAD_ID, dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, length - len(window):] = torch.tensor(window, dtype=torch.long)
    if all(len(window) == length for window in windows):
        return ids.to(device), None, None
    key_mask = torch.ones(len(windows), capacity, dtype=torch.bool)
    for row, window in enumerate(windows):
        key_mask[row, :length - len(window)] = False
    positions = (key_mask[:, :length].cumsum(1) - 1).clamp(min=0)  # (B, T): first real token at 0
    return ids.to(device), key_mask.to(device), positions.to(device)


@torch.inference_mode()
def generate_batch_steps(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         sampling: SamplingConfig = SamplingConfig(),
                         stop_ids: frozenset[int] = frozenset(),
                         decode_step: DecodeStep | None = None) -> Iterator[BatchStep]:
    """The decode loop: yield one BatchStep per new token, for several prompts at once.

    decode_step runs the single-token steps (``DecodeStep``; a compiled one from ``attnlab.fast``); by default
    the model itself.

    Prompts of different lengths are left-padded to a common length: the attention mask hides the
    padding keys and each row's positions start at 0 on its first real token, so each row computes
    what it would alone. A row finishes at a stop id (yielded) or after max_new_tokens; finished rows
    are still fed (their last token) but yield None, and the loop ends when every row has finished.
    With sampling, row i draws from its own generator seeded ``seed + i``: it gives what that prompt
    alone gives with seed + i.

    Generation may run past the model's context: when it is full, a row whose window fills it continues
    on the most recent half (positions restart, as they must for a model trained on windows of that
    length) and the cache is rebuilt from every row's window, exactly when that row alone would.
    """
    config = model.config
    sequences = check_prompts(config, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return
    n_rows, context = len(sequences), config.context_length
    dtype, device = model.dtype, model.device
    generators = [None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed + row)
                  for row in range(n_rows)]
    decode_step = decode_step or model_decode_step(model)
    window_starts = [0] * n_rows  # sequences[row][window_starts[row]:] is what row's cache holds
    finished = [False] * n_rows
    capacity = min(max(len(sequence) for sequence in sequences) + max_new_tokens, context)

    def prefill() -> tuple[KVCache, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        windows = [sequence[-1:] if done else sequence[start:]  # a finished row only has to fill its row
                   for sequence, start, done in zip(sequences, window_starts, finished)]
        ids, key_mask, positions = left_pad(windows, capacity, device)
        cache = model.new_kv_cache(n_rows, capacity, dtype=dtype, device=device)
        logits = model(ids, attention_mask=None if key_mask is None else key_mask[:, :ids.shape[1]],
                       position_ids=positions, kv_cache=cache, last_position_only=True)[:, -1]  # (B, vocab)
        return cache, key_mask, None if positions is None else positions[:, -1:] + 1, logits

    cache, key_mask, next_positions, logits = prefill()
    for step in range(max_new_tokens):
        tokens = [None if done else sample_next_token(logits[row], sampling, generators[row])
                  for row, done in enumerate(finished)]
        yield BatchStep(tokens, logits)
        if step == max_new_tokens - 1:
            return
        for row, token in enumerate(tokens):
            if token in stop_ids:
                finished[row] = True
            elif token is not None:
                sequences[row].append(token)
        if all(finished):
            return
        if cache.length == context:
            # The context is full (a small trained model's 64 tokens, say): a row whose window fills it
            # keeps going on its most recent half, recomputed once, rather than stop (nanoGPT crops the
            # same way); the other rows are recomputed whole, to the same values.
            for row, sequence in enumerate(sequences):
                if len(sequence) - window_starts[row] > context:
                    window_starts[row] = len(sequence) - context // 2
            cache, key_mask, next_positions, logits = prefill()
            continue
        fed = torch.tensor([[sequence[-1]] for sequence in sequences], device=device)  # (B, 1)
        logits = decode_step(fed, cache, None if key_mask is None else key_mask[:, :cache.length + 1], next_positions)
        if next_positions is not None:
            next_positions = next_positions + 1


def generate_batch_token_ids(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                             sampling: SamplingConfig = SamplingConfig(),
                             stop_ids: frozenset[int] = frozenset(),
                             decode_step: DecodeStep | None = None) -> list[list[int]]:
    """The new token ids of each prompt, decoded together (see :func:`generate_batch_steps`).

    Row i equals ``list(generate_token_ids(model, prompts[i], ...))`` (its stop id included), with
    seed + i when sampling.
    """
    generated: list[list[int]] = [[] for _ in prompts]
    for step in generate_batch_steps(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                     stop_ids=stop_ids, decode_step=decode_step):
        for row, token in enumerate(step.tokens):
            if token is not None:
                generated[row].append(token)
    return generated


def generate_token_ids(model: Transformer, prompt_ids: Sequence[int], *, max_new_tokens: int,
                       sampling: SamplingConfig = SamplingConfig(),
                       stop_ids: frozenset[int] = frozenset(),
                       decode_step: DecodeStep | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; stops after a stop id (yielded) or max_new_tokens.

    A batch of one prompt (no padding: the same forward passes as a loop written for one prompt).
    Generation may run past the model's context: when it is full, decoding continues on its most
    recent half (positions restart, as they must for a model trained on windows of that length).
    """
    for step in generate_batch_steps(model, [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling,
                                     stop_ids=stop_ids, decode_step=decode_step):
        yield step.tokens[0]


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

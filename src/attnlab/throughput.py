"""Generation throughput against batch size: the same prompts decoded 1, 2, 4, 8… at a time.

Decoding one token reads every weight matrix once for a matrix–vector product; a batch of B rows
turns it into a matrix–matrix product that reads the weights once for all B, so total tokens/s
grows with B until compute, not memory, is the limit — while each sequence gets its tokens a little
slower. :func:`batch_throughput` measures both, for ``bench/batch.py`` and any table that wants
the rows.
"""

import statistics
import time
from collections.abc import Sequence

from attnlab.errors import InputError
from attnlab.generate import generate_batch_token_ids

# Eight prompts of 4 to 18 tokens (SmolLM2's tokenizer): a batch of them is left-padded, as real ones are.
DEFAULT_PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "Here is a short recipe for pancakes:",
    "The three most important inventions of the nineteenth century were",
    "def fibonacci(n):",
    "In a quiet village at the edge of the forest, an old clockmaker spent his evenings",
    "Photosynthesis is the process by which plants",
    "The lighthouse keeper climbed the spiral stairs every evening to light the lamp, and the fishermen",
)


def batch_throughput(lm, batch_sizes: Sequence[int] = (1, 2, 4, 8), new_tokens: int = 48, repeats: int = 3,
                     prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[dict]:
    """Greedy generation tokens/s of ``lm`` (a LanguageModel) at each batch size, one dict per size.

    The work is the same at every size: the prompts (repeated to the largest batch size if there are
    fewer) decoded in consecutive batches of that size, ``new_tokens`` each with no stop id (every
    row runs to the end), timed whole, prefill included, through the product's loop with ``lm``'s own
    decode step (in the quantised modes a compiled one, with a package of its own for batches of 2 or more).
    Each repeat runs every size once, in alternating order (1 2 4 8, then 8 4 2 1, …) so that a machine's
    drift touches all sizes alike; figures are medians over repeats. After one untimed warm-up per size (which
    builds the batch package, the first time).

    Keys: batch_size, sequences, new_tokens, seconds, tokens_per_s (all generated tokens / wall time),
    per_sequence_tokens_per_s (tokens_per_s / batch_size: the speed one sequence sees), ratio (tokens/s
    over the smallest batch size's, measured in the same repeat), baseline_batch_size, and
    same_tokens_as_baseline (whether every sequence got the same greedy tokens as at the baseline size) and
    sequences_same_as_baseline (how many did: in fp32 all; in the bf16-activation modes a padded batch's
    attention sums in another order, and a near-tie can flip a greedy choice, which then changes the rest).
    """
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise InputError(f"batch sizes must be ≥ 1, got {list(batch_sizes)}")
    if new_tokens < 1 or repeats < 1:
        raise InputError(f"new tokens and repeats must be ≥ 1, got {new_tokens} and {repeats}")
    if not prompts:
        raise InputError("no prompts to generate from")
    encoded = [lm.prompt_ids(prompt) for prompt in prompts]
    workload = [encoded[i % len(encoded)] for i in range(max(len(encoded), sizes[-1]))]

    def run(size: int, tokens: int) -> tuple[float, list[list[int]]]:
        outputs: list[list[int]] = []
        start = time.perf_counter()
        for first in range(0, len(workload), size):
            outputs += generate_batch_token_ids(lm.model, workload[first:first + size], max_new_tokens=tokens,
                                                decode_step=lm.decode_step)
        return time.perf_counter() - start, outputs

    for size in sizes:  # warm-up: allocator, kernels, the first pass over the weights
        generate_batch_token_ids(lm.model, workload[:size], max_new_tokens=2, decode_step=lm.decode_step)
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    outputs: dict[int, list[list[int]]] = {}
    for repeat in range(repeats):
        for size in sizes if repeat % 2 == 0 else sizes[::-1]:
            elapsed, generated = run(size, new_tokens)
            seconds[size].append(elapsed)
            outputs.setdefault(size, generated)
    baseline = sizes[0]
    n_tokens = sum(len(tokens) for tokens in outputs[baseline])
    rows = []
    for size in sizes:
        median = statistics.median(seconds[size])
        ratio = statistics.median(base / own for base, own in zip(seconds[baseline], seconds[size]))
        rows.append({"batch_size": size, "sequences": len(workload), "new_tokens": new_tokens, "seconds": median,
                     "tokens_per_s": n_tokens / median, "per_sequence_tokens_per_s": n_tokens / median / size,
                     "ratio": ratio, "baseline_batch_size": baseline,
                     "same_tokens_as_baseline": outputs[size] == outputs[baseline],
                     "sequences_same_as_baseline": sum(own == base for own, base in zip(outputs[size],
                                                                                         outputs[baseline]))})
    return rows

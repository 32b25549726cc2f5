"""Does the capture machinery cost anything when it is off? Decode tokens/s, in one process, one run.

Compared, on the same loaded model and the same prompt (greedy, KV cache, 2 threads):

* ``product``   -- attnlab's own decode path: ``MultiHeadAttention.forward`` with its capture checks,
                  called with ``capture=None`` (what ``generate`` does).
* ``baseline``  -- the same forward with every capture line removed (defined below, for this
                  benchmark only): projections, RoPE, KV cache, fused attention, W_O, nothing else.

The two alternate round by round (A B, B A, …) so that a busy machine slows both alike; the rate
is 1 / the median time between consecutive tokens over all rounds, which a few disturbed steps do
not move. The bar (issue 3): capture off stays within 3% of the baseline.

    .venv/bin/python bench/capture_overhead.py
"""

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import attnlab
from attnlab.attention import MultiHeadAttention, attention_fast
from attnlab.generate import generate_token_ids
from attnlab.positions import apply_rope

PROMPT = "What is the capital of France?"


def forward_without_capture(self, x, mask, rope=None, kv_cache=None, capture=None):
    """MultiHeadAttention.forward minus the capture branch: the cost floor of the fast path."""
    B, T, _ = x.shape
    q = self.w_q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.w_k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.w_v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    if self.q_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_cache is not None:
        k, v = kv_cache.update(self.layer, k, v)
    heads = attention_fast(q, k, v, mask, self.scale)
    return self.w_o(heads.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def decode_step_times(model, prompt_ids: list[int], new_tokens: int) -> list[float]:
    """Seconds between consecutive generated tokens (the prefill, before the first token, left out).

    Per-step times, not one total: a burst of load from another process spoils a few steps, and the
    median over hundreds of steps shrugs it off.
    """
    stamps = [time.perf_counter() for _ in generate_token_ids(model, prompt_ids, max_new_tokens=new_tokens)]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = attnlab.load(args.model)
    ids = lm.prompt_ids(PROMPT, chat=lm.tokenizer.chat_template is not None)
    product_forward = MultiHeadAttention.forward
    variants = {"product (capture off)": product_forward, "baseline (no capture code)": forward_without_capture}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    decode_step_times(lm.model, ids, 8)  # warm-up
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            MultiHeadAttention.forward = variants[name]
            try:
                steps[name] += decode_step_times(lm.model, ids, args.new_tokens)
            finally:
                MultiHeadAttention.forward = product_forward
    rates = {name: 1 / statistics.median(times) for name, times in steps.items()}
    ratio = rates["product (capture off)"] / rates["baseline (no capture code)"]
    table = Table(title=f"{args.model}: decode tokens/s (1 / median step time), {args.rounds} alternating rounds")
    table.add_column("variant")
    table.add_column("decode tok/s", justify="right")
    table.add_column("steps timed", justify="right")
    for name, times in steps.items():
        table.add_row(name, f"{rates[name]:.1f}", str(len(times)))
    console = Console()
    console.print(table)
    verdict = "within" if ratio >= 0.97 else "NOT within"
    console.print(f"product / baseline = {ratio:.3f} ({verdict} the 3% bar)")


if __name__ == "__main__":
    main()

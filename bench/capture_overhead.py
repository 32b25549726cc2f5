"""Does the capture machinery cost anything when it is off? Decode tokens/s, in one process, one run.

Compared, on the same loaded model and the same prompt (greedy, KV cache, 2 threads):

* ``product``   -- attnlab's own decode path: ``MultiHeadAttention.forward`` with its capture checks,
                  called with ``capture=None`` (what ``generate`` does).
* ``baseline``  -- the same forward with every capture line removed (defined below, for this
                  benchmark only): projections, RoPE, KV cache, fused attention, W_O, nothing else.

The two alternate round by round (A B, B A, …) so that a busy machine slows both alike; the table
shows medians and the ratio. The bar (issue 3): capture off stays within 3% of the baseline.

    .venv/bin/python bench/capture_overhead.py --rounds 6
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


def decode_rate(model, prompt_ids: list[int], new_tokens: int) -> float:
    """Decode tokens/s: (N − 1) tokens over (time for N tokens − time for 1 token)."""
    def timed(n: int) -> float:
        start = time.perf_counter()
        list(generate_token_ids(model, prompt_ids, max_new_tokens=n))
        return time.perf_counter() - start

    return (new_tokens - 1) / (timed(new_tokens) - timed(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = attnlab.load(args.model)
    ids = lm.prompt_ids(PROMPT, chat=lm.tokenizer.chat_template is not None)
    product_forward = MultiHeadAttention.forward
    variants = {"product (capture off)": product_forward, "baseline (no capture code)": forward_without_capture}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    decode_rate(lm.model, ids, 8)  # warm-up
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            MultiHeadAttention.forward = variants[name]
            try:
                rates[name].append(decode_rate(lm.model, ids, args.new_tokens))
            finally:
                MultiHeadAttention.forward = product_forward
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["product (capture off)"] / medians["baseline (no capture code)"]
    table = Table(title=f"{args.model}: decode tokens/s, median of {args.rounds} alternating rounds")
    table.add_column("variant")
    table.add_column("decode tok/s", justify="right")
    table.add_column("all rounds", justify="right")
    for name, values in rates.items():
        table.add_row(name, f"{medians[name]:.1f}", " ".join(f"{v:.1f}" for v in values))
    console = Console()
    console.print(table)
    verdict = "within" if ratio >= 0.97 else "NOT within"
    console.print(f"product / baseline = {ratio:.3f} ({verdict} the 3% bar)")


if __name__ == "__main__":
    main()

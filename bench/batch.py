"""Batch generation benchmark: total and per-sequence tokens/s against batch size, in one run.

The same eight prompts (4 to 18 tokens, so batches are left-padded) are decoded greedily at each
batch size, in consecutive batches of that size, ``--new-tokens`` each (no end-of-text stop), timed
whole with prefill; repeats alternate the order of the sizes and the table shows medians. The ratio
is total tokens/s over batch 1's, measured within the same repeat. The work itself is
``attnlab.throughput.batch_throughput``; this script loads the model, sets the threads and prints.

``--against-eager`` (in a mode whose decode step is compiled) then times the same work decoded by the
eager model too, in rounds alternating with the compiled step's, and prints their ratio per size.

    .venv/bin/python bench/batch.py                                 # smollm2, fp32, 2 threads, sizes 1 2 4 8
    .venv/bin/python bench/batch.py --batch-sizes 1 2 4 8 16 --repeats 5 --json batch.json
    .venv/bin/python bench/batch.py --mode int4 --against-eager     # the compiled batch step's gain
"""

import argparse
import copy
import json
import os
import platform
import statistics

import torch
from rich.console import Console
from rich.table import Table

import attnlab
from attnlab.throughput import batch_throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="fp32", help="inference mode (default fp32; the quantised ones compile)")
    parser.add_argument("--against-eager", action="store_true",
                        help="also time the eager model's batches, alternating with the compiled step's")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lm = attnlab.load(args.model, mode=args.mode)
    if args.against_eager and lm.decode_step is None:
        parser.error(f"--against-eager needs a compiled decode step; mode {lm.mode} decodes eagerly")
    load_before = os.getloadavg()[0]
    rows = batch_throughput(lm, args.batch_sizes, args.new_tokens, args.repeats)
    against_eager = compiled_against_eager(lm, args.batch_sizes, args.new_tokens, args.repeats) \
        if args.against_eager else None
    load_after = os.getloadavg()[0]

    table = Table(title=f"{lm.name}, {lm.mode}, {torch.get_num_threads()} threads, "
                        f"{rows[0]['sequences']} sequences × {args.new_tokens} greedy tokens, median of {args.repeats}")
    baseline = rows[0]["baseline_batch_size"]
    for column in ("batch size", "seconds", "total tokens/s", "per-sequence tokens/s", f"total vs batch {baseline}",
                   "same tokens"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["batch_size"]), f"{row['seconds']:.2f}", f"{row['tokens_per_s']:.1f}",
                      f"{row['per_sequence_tokens_per_s']:.1f}", f"{row['ratio']:.2f}×",
                      "yes" if row["same_tokens_as_baseline"] else "NO")
    console = Console()
    console.print(table)
    if against_eager is not None:
        versus = Table(title=f"{lm.name} {lm.mode}: compiled vs eager decode step, same work, alternating rounds, "
                             f"median of {args.repeats}")
        for column in ("batch size", "compiled tokens/s", "eager tokens/s", "compiled vs eager"):
            versus.add_column(column, justify="right")
        for row in against_eager:
            versus.add_row(str(row["batch_size"]), f"{row['compiled_tokens_per_s']:.1f}",
                           f"{row['eager_tokens_per_s']:.1f}", f"{row['ratio']:.2f}×")
        console.print(versus)
    console.print(f"load average {load_before:.1f} before, {load_after:.1f} after "
                  f"({os.cpu_count()} CPUs; torch {torch.__version__}, {platform.processor() or platform.machine()})")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model": lm.name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "load_average": [load_before, load_after], "rows": rows, "against_eager": against_eager},
                      file, indent=2)


def compiled_against_eager(lm, batch_sizes: list[int], new_tokens: int, repeats: int) -> list[dict]:
    """Per batch size: tokens/s of ``lm``'s compiled decode step and of the eager model on the same work, from
    ``repeats`` rounds of each, alternating (compiled first, then eager first, …); medians, and the median of the
    per-round ratios."""
    eager = copy.copy(lm)
    eager.decode_step = None
    rounds: dict[str, list[list[dict]]] = {"compiled": [], "eager": []}
    for repeat in range(repeats):
        for name in ("compiled", "eager") if repeat % 2 == 0 else ("eager", "compiled"):
            rounds[name].append(batch_throughput(lm if name == "compiled" else eager, batch_sizes, new_tokens, 1))
    rows = []
    for index, size in enumerate(sorted(set(batch_sizes))):
        compiled = [round_rows[index] for round_rows in rounds["compiled"]]
        eagerly = [round_rows[index] for round_rows in rounds["eager"]]
        rows.append({"batch_size": size, "sequences": compiled[0]["sequences"],
                     "compiled_tokens_per_s": statistics.median(row["tokens_per_s"] for row in compiled),
                     "eager_tokens_per_s": statistics.median(row["tokens_per_s"] for row in eagerly),
                     "ratio": statistics.median(e["seconds"] / c["seconds"] for c, e in zip(compiled, eagerly))})
    return rows


if __name__ == "__main__":
    main()

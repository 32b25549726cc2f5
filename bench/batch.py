"""Batch generation benchmark: total and per-sequence tokens/s against batch size, in one run.

The same eight prompts (4 to 18 tokens, so batches are left-padded) are decoded greedily at each
batch size, in consecutive batches of that size, ``--new-tokens`` each (no end-of-text stop), timed
whole with prefill; repeats alternate the order of the sizes and the table shows medians. The ratio
is total tokens/s over batch 1's, measured within the same repeat. The work itself is
``attnlab.throughput.batch_throughput``; this script loads the model, sets the threads and prints.

    .venv/bin/python bench/batch.py                                 # smollm2, fp32, 2 threads, sizes 1 2 4 8
    .venv/bin/python bench/batch.py --batch-sizes 1 2 4 8 16 --repeats 5 --json batch.json
"""

import argparse
import json
import os
import platform

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
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lm = attnlab.load(args.model)
    load_before = os.getloadavg()[0]
    rows = batch_throughput(lm, args.batch_sizes, args.new_tokens, args.repeats)
    load_after = os.getloadavg()[0]

    table = Table(title=f"{lm.name}, {next(lm.model.parameters()).dtype}, {torch.get_num_threads()} threads, "
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
    console.print(f"load average {load_before:.1f} before, {load_after:.1f} after "
                  f"({os.cpu_count()} CPUs; torch {torch.__version__}, {platform.processor() or platform.machine()})")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model": lm.name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "load_average": [load_before, load_after], "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()

"""int4 matmuls against the number of rows: torch's packed kernel or dequantise-once + dense, one run.

``Int4Linear`` multiplies few rows (decoding) with torch's packed int4 kernel and many rows (a prompt, an
evaluation window) by dequantising its matrix once and calling one dense matmul (bf16 or fp32, whichever
``dense_matmul_dtype`` timed faster on this CPU), from ``INT4_DENSE_ROWS`` rows on. This script measures
both paths on the int4 model's own matrices (one of each shape: fused Q/K/V, W_O, fused gate/up, W_down;
the LM head's first pass keeps no dense copy, as generation multiplies it by one row per step) for rows
1 … 1024, in alternating order, ``--repeats`` rounds, medians; the last columns say which path is faster,
which the threshold picked and whether the two agree (max |Δ| relative to the largest output).

    .venv/bin/python bench/int4_rows.py                       # smollm2, 2 threads, 5 rounds
    .venv/bin/python bench/int4_rows.py --rows 64 128 256 512 --repeats 9
"""

import argparse
import os
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import attnlab
from attnlab.compress.quantize import INT4_DENSE_ROWS, Int4Linear, dense_matmul_dtype


def seconds_per_call(function, rows: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function(rows)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lm = attnlab.load(args.model, mode="int4")
    layers: dict[tuple[int, int], Int4Linear] = {}
    for module in lm.model.modules():
        if isinstance(module, Int4Linear) and module.weight_nibbles is not None:
            layers.setdefault((module.out_features, module.in_features), module)
    if not layers:
        raise SystemExit(f"bench/int4_rows.py: {args.model} has no int4 matrices on this machine (mode {lm.mode})")

    table = Table(title=f"{lm.name} int4 matrices: ms per call, median of {args.repeats}, "
                        f"{torch.get_num_threads()} threads (dense from {INT4_DENSE_ROWS} rows)")
    dense = f"dequantise + dense {str(dense_matmul_dtype()).removeprefix('torch.')}"
    for column in ("N × K", "rows", "packed kernel", dense, "faster", "used", "max |Δ|"):
        table.add_column(column, justify="right")
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for (n, k), layer in layers.items():
            for m in args.rows:
                rows = torch.randn(m, k).to(torch.bfloat16)
                packed, dense = layer.multiply_packed(rows), layer.multiply_dense(rows)  # warm-up and check
                gap = ((packed.float() - dense.float()).abs().max() / packed.float().abs().max()).item()
                calls = max(1, min(50, int(2e8 // (m * n * k))))
                times: dict[str, list[float]] = {"packed": [], "dense": []}
                for repeat in range(args.repeats):
                    order = ("packed", "dense") if repeat % 2 == 0 else ("dense", "packed")
                    for path in order:
                        function = layer.multiply_packed if path == "packed" else layer.multiply_dense
                        times[path].append(seconds_per_call(function, rows, calls))
                packed_ms, dense_ms = (statistics.median(times[path]) * 1e3 for path in ("packed", "dense"))
                table.add_row(f"{n} × {k}", str(m), f"{packed_ms:.3f}", f"{dense_ms:.3f}",
                              "packed" if packed_ms <= dense_ms else "dense",
                              "dense" if m >= INT4_DENSE_ROWS else "packed", f"{gap:.1e}")
            table.add_section()
    console = Console()
    console.print(table)
    console.print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs, "
                  f"torch {torch.__version__}); only ratios within one run mean much on a shared machine")


if __name__ == "__main__":
    main()

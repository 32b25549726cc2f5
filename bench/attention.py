"""Attention that scales: time and peak memory against sequence length, three paths, one run.

The three ways attnlab computes softmax(Q·Kᵀ/√d + M)·V (``attnlab.attention``):

* ``explicit``  -- ``attention_reference``: the formula step by step, (B, H, T, T) scores and weights.
                   The baseline every ratio is taken against.
* ``sdpa``      -- ``attention_fast``: torch's fused ``scaled_dot_product_attention`` (``is_causal``).
* ``chunked``   -- ``attention_chunked``: the online softmax in pure PyTorch, blocks of 128 queries ×
                   256 keys (its defaults), key blocks above the diagonal skipped.

Shapes are SmolLM2-135M's attention: batch 1, 9 query heads sharing 3 key/value heads, head_dim 64,
causal, fp32, under ``torch.inference_mode()``, for T = 128, 256, … ``--max-length`` (default 16384).
``--window W`` adds a sliding window of W tokens (Gemma-3's local layers): SDPA then takes a (T, T) mask
tensor, built inside the timed call (a model builds it once per forward for all its local layers), and the
chunked path skips the key blocks outside the window.

What is measured:

* time (ms)            -- wall time of one call. For each T one subprocess times all three paths in
                          alternating order (A B C, then C B A, …) after a warm-up call of each at a short
                          length, ``--repeats`` rounds; the table shows medians. The outputs are compared:
                          max |Δ| against SDPA is printed (a path that computed something else would make its
                          timing meaningless).
* peak memory (MB)     -- what one call adds to the resident set at its peak, output included: each
                          (path, T) in a fresh subprocess, which allocates q, k, v, makes a warm-up call at a
                          short length (the first call of each op maps library code), then resets the
                          kernel's peak-RSS mark (``/proc/self/clear_refs``, VmHWM), reads VmRSS, makes the
                          call and reports VmHWM − VmRSS. glibc is told to mmap every allocation ≥ 64 KiB
                          (``MALLOC_MMAP_THRESHOLD_``), so each large tensor is fresh memory and each free
                          returns it: the peak is what was alive at once, not what an allocator kept. Where
                          clear_refs is missing the script falls back to ru_maxrss − VmRSS (a lower bound) and
                          says so.

A configuration whose estimated need exceeds ``--memory-budget-gb`` (capped at 70 % of MemAvailable) is
skipped with its estimate: the explicit path keeps ~3 (B, H, T, T) fp32 tensors and a (T, T) bool and fp32
mask, ≈ (12·H + 5)·T² bytes, 30 GB at 16k. Only ratios measured within one run mean much on a shared
machine; the script reports how many CPUs other processes kept busy while it timed.

Threads: ``--threads 1`` by default. This project's machine has 2 cores shared with other sessions; with
2 threads every parallel op of the chunked loop waits for a thread the scheduler has parked, which slows it
3-10× at random and measures the neighbours rather than the algorithm. Pass ``--threads 2`` on a quiet machine.

    .venv/bin/python bench/attention.py                              # 128 … 16384, 3 repeats (~6 min)
    .venv/bin/python bench/attention.py --max-length 4096 --repeats 5 --json attention.json --png attention.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_MARKER = "ATTNLAB_BENCH "
METHODS = ("explicit", "sdpa", "chunked")
N_HEADS, N_KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
WARM_UP_LENGTH = 256


# --------------------------------------------------------------------------------------------- worker side


def make_inputs(length: int, window: int | None) -> tuple[Any, Any, Any, Any]:
    """q (1, 9, T, 64), k and v (1, 3, T, 64), seeded; a causal mask over T positions (and a window)."""
    import torch

    from attnlab.attention import AttentionMask

    generator = torch.Generator().manual_seed(length)
    q = torch.randn(1, N_HEADS, length, HEAD_DIM, generator=generator)
    k = torch.randn(1, N_KV_HEADS, length, HEAD_DIM, generator=generator)
    v = torch.randn(1, N_KV_HEADS, length, HEAD_DIM, generator=generator)
    return q, k, v, AttentionMask(torch.arange(length), length, causal=True, sliding_window=window)


def attention_function(method: str) -> Any:
    from attnlab import attention

    return {"explicit": attention.attention_reference, "sdpa": attention.attention_fast,
            "chunked": attention.attention_chunked}[method]


def call(method: str, inputs: tuple[Any, Any, Any, Any]) -> Any:
    q, k, v, mask = inputs
    return attention_function(method)(q, k, v, mask, 1 / math.sqrt(HEAD_DIM))


def reply(message: dict[str, Any]) -> None:
    print(RESULT_MARKER + json.dumps(message), flush=True)


def proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_worker(method: str, length: int, window: int | None) -> None:
    """One call in this fresh process; report the extra resident memory at its peak."""
    import torch

    with torch.inference_mode():
        call(method, make_inputs(WARM_UP_LENGTH, window))
        inputs = make_inputs(length, window)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak-RSS mark, to VmRSS
            how = "VmHWM after clear_refs"
        except OSError:
            how = "ru_maxrss (lower bound)"
        before = proc_status_bytes("VmRSS")
        call(method, inputs)
        if how.startswith("VmHWM"):
            peak = proc_status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reply({"extra_bytes": max(peak - before, 0), "how": how})


def time_worker(methods: Sequence[str], length: int, repeats: int, window: int | None) -> None:
    """Warm-up, then ``repeats`` rounds of one call per method, the order reversed every round."""
    import torch

    with torch.inference_mode():
        for method in methods:
            call(method, make_inputs(WARM_UP_LENGTH, window))
        inputs = make_inputs(length, window)
        seconds: dict[str, list[float]] = {method: [] for method in methods}
        outputs: dict[str, Any] = {}
        order = list(methods)
        for _ in range(repeats):
            for method in order:
                start = time.perf_counter()
                outputs[method] = call(method, inputs)
                seconds[method].append(time.perf_counter() - start)
            order.reverse()
        baseline = outputs.get("sdpa")
        differences = {method: float((output - baseline).abs().max()) for method, output in outputs.items()
                       if baseline is not None and method != "sdpa"}
    reply({"seconds": seconds, "max_abs_diff_vs_sdpa": differences})


# --------------------------------------------------------------------------------------------- parent side


class BenchError(Exception):
    """A worker failed or the machine cannot run the benchmark; the message says which."""


def run_worker(args: argparse.Namespace, *worker_args: str) -> dict[str, Any]:
    """Run this script as a worker subprocess and return its marked JSON answer. Only the memory workers
    mmap every large allocation: timing runs with the allocator the product gets."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads)}
    if "memory" in worker_args:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    window = ["--window", str(args.window)] if args.window else []
    command = [sys.executable, __file__, "--threads", str(args.threads), *window, *worker_args]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    raise BenchError(f"worker {' '.join(worker_args)} failed (exit {result.returncode}): {' / '.join(tail)}")


def estimated_need_bytes(method: str, length: int, window: int | None) -> int:
    """A generous estimate of a call's peak, to skip what would not fit."""
    masks = 5 * length * length  # the (T, T) bool and fp32 masks
    if method == "explicit":
        return 12 * N_HEADS * length * length + masks  # 3 (1, H, T, T) fp32
    scratch = 64 * 2**20 + 4 * N_HEADS * length * HEAD_DIM * 4  # blocks / kernel scratch, output
    return scratch + (masks if method == "sdpa" and window else 0)


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait), from /proc/stat."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def lengths(args: argparse.Namespace) -> list[int]:
    result, length = [], args.min_length
    while length <= args.max_length:
        result.append(length)
        length *= 2
    return result


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    available = available_bytes()
    budget = int(args.memory_budget_gb * 2**30)
    if available is not None:
        budget = min(budget, int(0.7 * available))
    results: dict[str, Any] = {"lengths": {}, "budget_bytes": budget}
    busy_before, ours_before, start = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    for length in lengths(args):
        row: dict[str, Any] = {"skipped": {}, "memory_bytes": {}, "seconds": {}, "runs": {}}
        runnable = []
        for method in METHODS:
            need = estimated_need_bytes(method, length, args.window)
            if need > budget:
                row["skipped"][method] = need
            else:
                runnable.append(method)
        print(f"bench: T = {length}: timing {', '.join(runnable)}", file=sys.stderr, flush=True)
        timed = run_worker(args, "--worker", "time", "--length", str(length), "--methods", ",".join(runnable),
                           "--repeats", str(args.repeats))
        for method in runnable:
            row["runs"][method] = timed["seconds"][method]
            row["seconds"][method] = statistics.median(timed["seconds"][method])
            memory = run_worker(args, "--worker", "memory", "--length", str(length), "--methods", method)
            row["memory_bytes"][method] = memory["extra_bytes"]
            results["memory_method"] = memory["how"]
        row["max_abs_diff_vs_sdpa"] = timed["max_abs_diff_vs_sdpa"]
        results["lengths"][str(length)] = row
    busy_after, wall = cpu_busy_seconds(), time.perf_counter() - start
    others = None
    if busy_before is not None and busy_after is not None:
        others = max((busy_after - busy_before) - (children_cpu_seconds() - ours_before), 0.0) / wall
    results["other_cpus"], results["wall_s"] = others, wall
    return results


def mask_words(window: int | None) -> str:
    return f"causal, window {window}" if window else "causal"


def ratio(value: float, baseline: float | None) -> str:
    if not baseline:
        return ""
    share = value / baseline
    return f" ({share:.2f}×)" if share >= 0.095 else f" ({share:.1g}×)"


def render(results: dict[str, Any], args: argparse.Namespace, machine: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    shapes = f"B 1, {N_HEADS} heads / {N_KV_HEADS} kv heads, head_dim {HEAD_DIM}, {mask_words(args.window)}, fp32"
    for title, key, unit, scale in (("time per call, median of {repeats}", "seconds", "ms", 1e3),
                                    ("peak extra memory per call", "memory_bytes", "MB", 1 / 2**20)):
        table = Table(title=f"attention {title.format(repeats=args.repeats)}: {shapes}",
                      caption="(ratio) = path / explicit, measured in this run")
        table.add_column("T", justify="right")
        for method in METHODS:
            table.add_column(f"{method} ({unit})", justify="right")
        if key == "seconds":
            table.add_column("max |Δ| vs sdpa", justify="right")  # of explicit and chunked
        for length, row in results["lengths"].items():
            baseline = row[key].get("explicit")
            cells = []
            for method in METHODS:
                if method in row["skipped"]:
                    cells.append(f"skipped (needs ~{row['skipped'][method] / 1e9:.0f} GB)")
                else:
                    cells.append(f"{row[key][method] * scale:,.1f}{ratio(row[key][method], baseline)}")
            if key == "seconds":
                cells.append(f"{max(row['max_abs_diff_vs_sdpa'].values(), default=0.0):.1e}")
            table.add_row(length, *cells)
        console.print(table)
    console.print(f"memory: {results['memory_method']}, one fresh process per (path, T); budget "
                  f"{results['budget_bytes'] / 2**30:.1f} GiB")
    console.print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, {args.threads} thread(s), "
                  f"torch {machine['torch']}, python {machine['python']}; {results['wall_s'] / 60:.1f} min")
    busy = results["other_cpus"]
    if busy is not None and busy > 0.2:
        console.print(f"[yellow]warning: other processes kept {busy:.1f} CPUs busy on average while this ran; "
                      f"absolute times are unreliable, the ratios less so[/yellow]")


def write_atomically(path: Path, write: Any) -> None:
    """``write(temp_path)`` beside ``path``, then rename it over, so no reader ever sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(results: dict[str, Any], path: Path) -> None:
    """Two log-log panels, time and peak memory against T; skipped configurations are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    rows = results["lengths"]
    for method, marker in zip(METHODS, "osd"):
        measured = [(int(length), row) for length, row in rows.items() if method in row["seconds"]]
        xs = [length for length, _ in measured]
        time_axis.plot(xs, [row["seconds"][method] * 1e3 for _, row in measured], marker=marker, label=method)
        memory_axis.plot(xs, [max(row["memory_bytes"][method], 2**10) / 2**20 for _, row in measured],
                         marker=marker, label=method)
    for axis, label in ((time_axis, "time per call (ms)"), (memory_axis, "peak extra memory (MB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"{mask_words(results['window'])} attention, {N_HEADS} heads / {N_KV_HEADS} kv heads, "
                    f"head_dim {HEAD_DIM}, fp32, CPU, {results['threads']} thread(s)", fontsize=10)
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=90, format="png"))
    plt.close(figure)


def parent_main(args: argparse.Namespace) -> int:
    import torch

    from attnlab.bench.run import cpu_model

    if not Path("/proc/self/status").exists():
        raise BenchError("needs Linux /proc to measure peak memory")
    print(f"bench: T = {args.min_length} … {args.max_length}, {args.repeats} timed rounds each, one subprocess "
          f"per length for time and per (path, length) for memory (minutes)…", file=sys.stderr, flush=True)
    results = benchmark(args)
    results["threads"], results["window"] = args.threads, args.window
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    render(results, args, machine)
    png = Path(args.png) if args.png else Path(tempfile.gettempdir()) / "attnlab-bench-attention.png"
    plot(results, png)
    print(f"plot: {png}")
    if args.json:
        settings = {key: getattr(args, key) for key in ("min_length", "max_length", "repeats", "threads",
                                                        "memory_budget_gb", "window")}
        data = {"settings": settings, "shapes": {"batch": 1, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS,
                                                 "head_dim": HEAD_DIM, "causal": True, "window": args.window,
                                                 "dtype": "float32"},
                "machine": machine, "results": results}
        write_atomically(Path(args.json), lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time and peak memory of attnlab's attention paths against T.")
    parser.add_argument("--min-length", type=positive_int, default=128, help="shortest T (default 128)")
    parser.add_argument("--max-length", type=positive_int, default=16384, help="longest T, doubling (default 16384)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds; medians shown (default 3)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1, see above)")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0,
                        help="skip a configuration estimated to need more (default 8; capped at 70%% of free RAM)")
    parser.add_argument("--window", type=positive_int, help="a sliding window of this many tokens (default none)")
    parser.add_argument("--png", metavar="FILE", help="where the plot goes (default: the temp folder)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=positive_int, help=argparse.SUPPRESS)
    parser.add_argument("--methods", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.min_length > args.max_length:
        parser.error("--min-length must not exceed --max-length")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.worker:
            import torch

            torch.set_num_threads(args.threads)
            if args.worker == "time":
                time_worker(args.methods.split(","), args.length, args.repeats, args.window)
            else:
                memory_worker(args.methods, args.length, args.window)
            return 0
        return parent_main(args)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

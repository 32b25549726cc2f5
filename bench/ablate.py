"""How many ablation runs to train side by side: ``attnlab ablate --jobs 1`` (one run at a time on every
core) against ``--jobs 2`` (two runs, one thread each), on the same small plan, alternating A/B so that
a busy machine slows both alike. Prints a table and the ratio; the default of ``--jobs`` rests on it.

    .venv/bin/python bench/ablate.py [--repeats 2] [--steps 150]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_ablation(jobs: int, steps: int, out: Path) -> float:
    command = [sys.executable, "-m", "attnlab.cli", "ablate", "--variants", "softmax,no-q,linear", "--seeds", "2",
               "--set", f"train.max_steps={steps}", "--set", "train.warmup_steps=10", "--eval-batches", "5",
               "--out", str(out), "--jobs", str(jobs), "--overwrite", "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for jobs in (1, 2) if repeat % 2 == 0 else (2, 1):
                seconds[jobs].append(timed_ablation(jobs, args.steps, Path(folder) / f"jobs{jobs}"))
                print(f"repeat {repeat + 1}, --jobs {jobs}: {seconds[jobs][-1]:.1f} s", file=sys.stderr)
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    print(f"6 runs × {args.steps} steps (softmax, no-q, linear × 2 seeds), median of {args.repeats}")
    print("| --jobs | threads per run | wall s |")
    print("|---|---|---|")
    print(f"| 1 | all cores | {one:.1f} |")
    print(f"| 2 | cores / 2 | {two:.1f} |")
    print(f"--jobs 2 takes {two / one:.2f}× the time of --jobs 1")


if __name__ == "__main__":
    main()

"""Generation benchmark: attnlab against transformers, on the same model, in the same run.

What is measured, for each system (each in its own subprocess, fp32, greedy, ``torch.inference_mode()``):

* load time (s)        -- from the call that loads the model until the model is ready. attnlab loads its
                          cached fp32 conversion of the GGUF; transformers dequantises the GGUF at every load.
* prefill (tokens/s)   -- prompt length / time to produce the first new token after a ``--prompt-tokens``
                          prompt (an English paragraph repeated, encoded and cut to exactly that many ids).
* decode (tokens/s)    -- (N - 1) / (time to generate N tokens - time to generate 1 token), which removes the
                          prefill; after a short context (the 37-token chat prompt "What is the capital of
                          France?") and after the long ``--prompt-tokens`` context.
* peak RSS (MB)        -- ``ru_maxrss`` of the worker process: imports, load and generation together.

Both run their product path: ``attnlab.generate.generate_token_ids`` and ``model.generate`` (transformers,
default sdpa attention, ``min_new_tokens = max_new_tokens`` so that no end-of-text stops it early). Each
measurement is warmed up once, then repeated ``--repeats`` times; the table shows medians. The script also
checks that both systems produce the same greedy tokens after the short prompt: a benchmark of a model that
computes something else would be meaningless.

The machine this usually runs on is small and shared, so absolute numbers drift from run to run; only the
ratios measured within one run mean much.

Run it from the repository root (first use of a GGUF model converts it once, ~10-30 s, before timing):

    .venv/bin/python bench/generate.py                     # smollm2-135m-instruct, 2 threads, 3 repeats
    .venv/bin/python bench/generate.py --repeats 5 --prompt-tokens 1024 --new-tokens 128 --json out.json

Internally the script re-invokes itself with ``--worker attnlab`` / ``--worker transformers``; a worker
prints one JSON line (prefixed with a marker) that the parent parses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULT_MARKER = "ATTNLAB_BENCH_RESULT "
SYSTEMS = ("attnlab", "transformers")
SHORT_PROMPT = "What is the capital of France?"
# Plain English filler for the long prompt; repeated as often as needed and cut to an exact token count.
PARAGRAPH = (
    "The old lighthouse stood at the end of a narrow spit of rock, and for more than a century its keepers "
    "had climbed the spiral stairs every evening to light the lamp. Fishermen coming home through fog and "
    "storm learned to trust the slow turn of its beam, and children in the village grew up counting the "
    "seconds between flashes as they fell asleep. When the light was finally automated, the last keeper "
    "moved into a cottage by the harbour, where he mended nets, wrote letters to the newspaper about the "
    "weather, and told anyone who would listen how the sea changes colour an hour before a gale. "
)

Runner = Callable[[Sequence[int], int], list[int]]


# --------------------------------------------------------------------------------------------- worker side


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def timed(runner: Runner, ids: Sequence[int], new_tokens: int) -> tuple[float, list[int]]:
    """Seconds taken by ``runner(ids, new_tokens)`` and the tokens it generated."""
    start = time.perf_counter()
    tokens = runner(ids, new_tokens)
    elapsed = time.perf_counter() - start
    if len(tokens) != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} new tokens, got {len(tokens)}")
    return elapsed, tokens


def decode_rate(time_n: float, time_1: float, new_tokens: int) -> float:
    """Decode tokens/s from the time for N tokens and for 1 token (both include the same prefill)."""
    return (new_tokens - 1) / max(time_n - time_1, 1e-9)


def measure(runner: Runner, short_ids: Sequence[int], long_ids: Sequence[int], new_tokens: int,
            repeats: int) -> dict[str, Any]:
    """Warm up once, then time prefill and decode ``repeats`` times; medians plus the raw runs."""
    timed(runner, short_ids, new_tokens)  # warm-up: first-call allocations, kernel selection, caches
    timed(runner, long_ids, new_tokens)
    runs: list[dict[str, float]] = []
    short_tokens: list[int] = []
    long_tokens: list[int] = []
    for _ in range(repeats):
        long_1, _ = timed(runner, long_ids, 1)
        long_n, long_tokens = timed(runner, long_ids, new_tokens)
        short_1, _ = timed(runner, short_ids, 1)
        short_n, short_tokens = timed(runner, short_ids, new_tokens)
        runs.append({
            "prefill_tok_s": len(long_ids) / long_1,
            "decode_short_tok_s": decode_rate(short_n, short_1, new_tokens),
            "decode_long_tok_s": decode_rate(long_n, long_1, new_tokens),
            "seconds_long_1": long_1, "seconds_long_n": long_n,
            "seconds_short_1": short_1, "seconds_short_n": short_n,
        })
    medians = {key: statistics.median(run[key] for run in runs)
               for key in ("prefill_tok_s", "decode_short_tok_s", "decode_long_tok_s")}
    return {**medians, "runs": runs, "short_tokens": short_tokens, "long_tokens": long_tokens}


def long_prompt_ids(encode: Callable[[str], list[int]], n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids of English text: the paragraph repeated until long enough, then cut."""
    text = PARAGRAPH
    ids = encode(text)
    while len(ids) < n_tokens:
        text += PARAGRAPH
        ids = encode(text)
    return ids[:n_tokens]


def converted_entries() -> set[str]:
    """Names in attnlab's converted-model cache (a new one after load means the GGUF was converted)."""
    from attnlab.paths import cache_dir

    folder = cache_dir() / "converted"
    return {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()


def attnlab_worker(args: argparse.Namespace, torch: Any) -> dict[str, Any]:
    import attnlab
    from attnlab.generate import generate_token_ids

    before = converted_entries()
    start = time.perf_counter()
    lm = attnlab.load(args.model)
    load_s = time.perf_counter() - start
    converted = bool(converted_entries() - before)
    model = lm.model.eval()

    short_ids = lm.prompt_ids(SHORT_PROMPT, chat=True)
    long_ids = long_prompt_ids(lm.tokenizer.encode, args.prompt_tokens)
    if len(long_ids) + args.new_tokens > lm.config.context_length:
        raise SystemExit(f"error: {args.prompt_tokens} + {args.new_tokens} tokens exceed the model's context "
                         f"of {lm.config.context_length}")

    def run(ids: Sequence[int], new_tokens: int) -> list[int]:
        with torch.inference_mode():
            return list(generate_token_ids(model, ids, max_new_tokens=new_tokens, stop_ids=frozenset()))

    result = measure(run, short_ids, long_ids, args.new_tokens, args.repeats)
    return {"load_s": load_s, "converted_on_load": converted, "short_ids": short_ids, "long_ids": long_ids,
            "version": attnlab.__version__, **result}


def transformers_worker(args: argparse.Namespace, torch: Any, prompts: dict[str, list[int]]) -> dict[str, Any]:
    import transformers
    from transformers import AutoModelForCausalLM

    path = Path(args.model_path)
    start = time.perf_counter()
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - start
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:  # irrelevant for one unpadded sequence, but generate() wants one
        eos = model.generation_config.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) or 0

    def run(ids: Sequence[int], new_tokens: int) -> list[int]:
        input_ids = torch.tensor([list(ids)])
        with torch.inference_mode():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=pad_id)
        return output[0, len(ids):].tolist()

    result = measure(run, prompts["short_ids"], prompts["long_ids"], args.new_tokens, args.repeats)
    return {"load_s": load_s, "version": transformers.__version__,
            "attn_implementation": model.config._attn_implementation, **result}


def worker_main(args: argparse.Namespace) -> int:
    """Run one system's measurements and print its results as one marked JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "attnlab":
        result = attnlab_worker(args, torch)
    else:
        result = transformers_worker(args, torch, json.loads(sys.stdin.read()))
    result.update(system=args.worker, threads=torch.get_num_threads(), torch_version=torch.__version__,
                  peak_rss_mb=peak_rss_mb())
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------- parent side


class BenchError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def check_transformers_installed() -> None:
    missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise BenchError(f"{' and '.join(missing)} not installed; the benchmark compares against it: "
                         f"pip install transformers accelerate")


def resolve_model_path(model: str) -> Path:
    """The weights both systems load: a named model's .gguf (or HF folder), or a path given directly."""
    from attnlab.errors import ModelNotFoundError
    from attnlab.weights.registry import NAMED_MODELS, resolve_named_model

    if model in NAMED_MODELS:
        try:
            return resolve_named_model(model)
        except ModelNotFoundError as error:
            raise BenchError(str(error)) from None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf" or (path / "config.json").is_file():
        return path.resolve()
    raise BenchError(f"model {model!r} not found: give a named model ({', '.join(NAMED_MODELS)}), "
                     f"a .gguf file or a Hugging Face folder")


def run_worker(system: str, args: argparse.Namespace, model_path: Path, stdin: str = "") -> dict[str, Any]:
    """Run one worker subprocess and parse its result line; BenchError with its stderr tail if it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--model", args.model,
               "--model-path", str(model_path), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER) and done.returncode == 0:
            return json.loads(line[len(RESULT_MARKER):])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    raise BenchError(f"the {system} worker failed (exit {done.returncode}): {tail[0]}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def agreeing_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file beside ``path`` then rename it over, so no reader ever sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# (key, label, unit format, higher is better)
METRICS = (
    ("load_s", "load time (s)", "{:.2f}", False),
    ("prefill_tok_s", "prefill, {prompt}-token prompt (tok/s)", "{:.0f}", True),
    ("decode_short_tok_s", "decode after {short}-token context (tok/s)", "{:.1f}", True),
    ("decode_long_tok_s", "decode after {prompt}-token context (tok/s)", "{:.1f}", True),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}", False),
)


def ratio_cell(ours: float, theirs: float, higher_is_better: bool) -> str:
    ratio = ours / theirs if theirs else float("nan")
    better = ratio > 1 if higher_is_better else ratio < 1
    colour = "green" if better else "red"
    return f"[{colour}]{ratio:.2f}×[/{colour}]"


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, theirs = results["attnlab"], results["transformers"]
    names = {"prompt": args.prompt_tokens, "short": len(ours["short_ids"])}
    table = Table(title=f"Generation benchmark: {args.model}, fp32, greedy, {args.new_tokens} new tokens, "
                        f"median of {args.repeats}")
    table.add_column("metric")
    for column in ("attnlab", "transformers", "attnlab / transformers"):
        table.add_column(column, justify="right")
    table.add_column("better")
    for key, label, fmt, higher in METRICS:
        table.add_row(label.format(**names), fmt.format(ours[key]), fmt.format(theirs[key]),
                      ratio_cell(ours[key], theirs[key], higher), "higher" if higher else "lower")

    console = Console()
    console.print(table)
    match = ours["short_tokens"] == theirs["short_tokens"]
    agree = agreeing_prefix(ours["long_tokens"], theirs["long_tokens"])
    console.print(f"tokens match (short prompt, {args.new_tokens} greedy tokens): "
                  f"{'[green]yes[/green]' if match else '[red]no[/red]'}")
    console.print(f"long prompt: first {agree}/{args.new_tokens} greedy tokens agree")
    console.print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, {args.threads} threads, "
                  f"torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}, "
                  f"transformers attention: {theirs.get('attn_implementation')}")
    if machine["attnlab_converted_first"]:
        console.print("note: attnlab converted the GGUF on its first load; the worker was run again so the "
                      "load time above is the cached load")


def parent_main(args: argparse.Namespace) -> int:
    check_transformers_installed()
    model_path = resolve_model_path(args.model)
    print(f"bench: attnlab worker ({args.repeats} repeats + warm-up)…", file=sys.stderr, flush=True)
    ours = run_worker("attnlab", args, model_path)
    converted_first = bool(ours["converted_on_load"])
    if converted_first:  # the first load paid the one-off GGUF conversion: measure the everyday load
        ours = run_worker("attnlab", args, model_path)
    print("bench: transformers worker…", file=sys.stderr, flush=True)
    prompts = {"short_ids": ours["short_ids"], "long_ids": ours["long_ids"]}
    theirs = run_worker("transformers", args, model_path, stdin=json.dumps(prompts))

    results = {"attnlab": ours, "transformers": theirs}
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "torch": ours["torch_version"],
               "transformers": theirs["version"], "python": platform.python_version(),
               "attnlab_converted_first": converted_first}
    render(results, args, machine)
    if args.json:
        settings = {key: getattr(args, key) for key in ("model", "threads", "repeats", "prompt_tokens", "new_tokens")}
        write_json_atomically(Path(args.json), {
            "settings": {**settings, "model_path": str(model_path)}, "machine": machine, "results": results,
            "tokens_match": ours["short_tokens"] == theirs["short_tokens"]})
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark attnlab generation against transformers.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="named model or .gguf path")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads per system (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats; medians shown (default 3)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=512, help="long prompt length (default 512)")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be ≥ 2 (decode speed is measured from N tokens minus 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return worker_main(args) if args.worker else parent_main(args)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

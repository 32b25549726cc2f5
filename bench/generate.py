"""Generation benchmark: attnlab against transformers, on the same model, in the same run.

What is measured, for each system (fp32, greedy, under ``torch.inference_mode()``):

* load time (s)        -- the call that loads the model, until it is ready to generate. attnlab loads its
                          cached fp32 conversion of the GGUF; transformers parses and dequantises the GGUF
                          at every load.
* prefill (tokens/s)   -- prompt length / time to the first new token after a ``--prompt-tokens`` prompt
                          (an English paragraph repeated, encoded and cut to exactly that many ids).
* decode (tokens/s)    -- (N - 1) / (time to generate N tokens - time to generate 1 token), which takes the
                          prefill out; after a short context (the 37-token chat prompt "What is the capital
                          of France?") and after the long ``--prompt-tokens`` context. N = ``--new-tokens``.
* peak RSS (MB)        -- ``ru_maxrss`` of the system's own process: imports, load and generation together.

Both run their product path: ``attnlab.generate.generate_token_ids`` and ``model.generate`` (transformers,
default sdpa attention, ``min_new_tokens = max_new_tokens`` and no end-of-text id, so neither stops early),
on the same token ids (attnlab's tokenizer makes them). Each measurement is warmed up once, then repeated
``--repeats`` times; the table shows medians. The script also checks that both systems produce the same greedy
tokens after the short prompt: a benchmark of a model that computes something else would be meaningless.

How: each system lives in its own subprocess (the script re-invokes itself with ``--worker attnlab`` or
``--worker transformers``), so peak RSS is per system and imports do not interfere. Both stay alive, and the
parent asks them for one timed generation at a time, alternating between them (A B, then B A): on a small
shared machine speed drifts by tens of percent within a minute, and timing one system after the other would
put that drift into the ratios. A worker answers each request with one JSON line (prefixed with a marker)
and prints its peak RSS when told it is done. Only ratios measured within one run mean much.

Run it from the repository root (first use of a GGUF model converts it once, ~10-30 s, before timing):

    .venv/bin/python bench/generate.py                     # smollm2-135m-instruct, 2 threads, 3 repeats
    .venv/bin/python bench/generate.py --repeats 5 --prompt-tokens 1024 --new-tokens 128 --json out.json
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
from typing import IO, Any

RESULT_MARKER = "ATTNLAB_BENCH "
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


def reply(message: dict[str, Any]) -> None:
    """Send one message to the parent: a marked JSON line (libraries may print other lines)."""
    print(RESULT_MARKER + json.dumps(message), flush=True)


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


def load_attnlab(args: argparse.Namespace, torch: Any) -> tuple[Runner, dict[str, Any]]:
    """Load attnlab's model; its runner, and the prompts (made with its tokenizer) for both systems."""
    import attnlab
    from attnlab.errors import TokenizerError
    from attnlab.generate import generate_token_ids

    before = converted_entries()
    start = time.perf_counter()
    lm = attnlab.load(args.model)
    load_s = time.perf_counter() - start
    if not (lm.config.lm_head and lm.config.causal):
        raise SystemExit(f"error: {args.model} is not a causal language model ({lm.config.family}); "
                         f"there is no generation to benchmark")
    model = lm.model.eval()
    try:
        short_ids, chat = lm.prompt_ids(SHORT_PROMPT, chat=True), True
    except TokenizerError:  # a base model without a chat template: the question as plain text
        short_ids, chat = lm.prompt_ids(SHORT_PROMPT), False
    long_ids = long_prompt_ids(lm.tokenizer.encode, args.prompt_tokens)
    if len(long_ids) + args.new_tokens > lm.config.context_length:
        raise SystemExit(f"error: {args.prompt_tokens} + {args.new_tokens} tokens exceed the model's context "
                         f"of {lm.config.context_length}")

    def run(ids: Sequence[int], new_tokens: int) -> list[int]:
        with torch.inference_mode():
            return list(generate_token_ids(model, ids, max_new_tokens=new_tokens, stop_ids=frozenset()))

    info = {"load_s": load_s, "converted_on_load": bool(converted_entries() - before), "version": attnlab.__version__,
            "prompts": {"short": short_ids, "long": long_ids}, "short_prompt_chat": chat}
    return run, info


def load_transformers(args: argparse.Namespace, torch: Any) -> tuple[Runner, dict[str, Any]]:
    """Load the transformers model from the same weights file; its runner (``model.generate``)."""
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

    info = {"load_s": load_s, "version": transformers.__version__,
            "attn_implementation": model.config._attn_implementation}
    return run, info


def worker_main(args: argparse.Namespace) -> int:
    """Load one system, then serve timed generations until the parent says done.

    stdin, one JSON object a line: {"prompts": {...}} (transformers only, first), then
    {"prompt": "short"|"long", "new_tokens": N} for each timed run, then {"done": true}.
    """
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "attnlab":
        runner, info = load_attnlab(args, torch)
        prompts = info["prompts"]
    else:
        prompts = json.loads(sys.stdin.readline())["prompts"]
        runner, info = load_transformers(args, torch)
    reply({**info, "threads": torch.get_num_threads(), "torch_version": torch.__version__})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("done"):
            break
        start = time.perf_counter()
        tokens = runner(prompts[request["prompt"]], request["new_tokens"])
        reply({"seconds": time.perf_counter() - start, "tokens": tokens})
    reply({"peak_rss_mb": peak_rss_mb()})
    return 0


# --------------------------------------------------------------------------------------------- parent side


class BenchError(Exception):
    """A problem the user can fix, or a failed worker; printed as one line, exit status 2."""


class Worker:
    """One system in its own process, answering requests for timed generations."""

    def __init__(self, system: str, args: argparse.Namespace, model_path: Path) -> None:
        self.system = system
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--model", args.model,
                   "--model-path", str(model_path), "--threads", str(args.threads),
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        threads = str(args.threads)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        # stderr goes to a file, not a pipe: progress bars would fill a pipe nobody reads and block the worker.
        self.stderr: IO[str] = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, bufsize=1, env=env)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self.failure() from None

    def receive(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(RESULT_MARKER):
                return json.loads(line[len(RESULT_MARKER):])
        raise self.failure()

    def generate(self, prompt: str, new_tokens: int) -> dict[str, Any]:
        """Seconds and tokens of one generation of ``new_tokens`` after the named prompt."""
        self.send({"prompt": prompt, "new_tokens": new_tokens})
        answer = self.receive()
        if len(answer["tokens"]) != new_tokens:
            raise BenchError(f"{self.system} generated {len(answer['tokens'])} tokens instead of {new_tokens}")
        return answer

    def finish(self) -> dict[str, Any]:
        """Tell the worker to stop; its final message (peak RSS)."""
        self.send({"done": True})
        final = self.receive()
        self.process.wait()
        return final

    def cpu_seconds(self) -> float:
        """CPU time the worker has used so far (Linux /proc; 0 where unavailable)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return 0.0

    def failure(self) -> BenchError:
        code = self.process.wait()
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        return BenchError(f"the {self.system} worker failed (exit {code}): {lines[-1] if lines else 'no output'}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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


def start_workers(args: argparse.Namespace, model_path: Path) -> tuple[dict[str, Worker], dict[str, dict[str, Any]]]:
    """Start both workers (attnlab first: its tokenizer makes the prompts); their load-time reports."""
    workers: dict[str, Worker] = {}
    try:
        workers["attnlab"] = Worker("attnlab", args, model_path)
        ready = workers["attnlab"].receive()
        if ready["converted_on_load"]:  # that load paid the one-off GGUF conversion: time the everyday one
            workers["attnlab"].finish()
            workers["attnlab"] = Worker("attnlab", args, model_path)
            ready = {**workers["attnlab"].receive(), "converted_first": True}
        workers["transformers"] = Worker("transformers", args, model_path)
        workers["transformers"].send({"prompts": ready["prompts"]})
        return workers, {"attnlab": ready, "transformers": workers["transformers"].receive()}
    except BaseException:
        for worker in workers.values():
            worker.kill()
        raise


def measure(workers: dict[str, Worker], prompt_tokens: int, new_tokens: int,
            repeats: int) -> dict[str, dict[str, Any]]:
    """Warm-up, then ``repeats`` rounds of four timed generations per system, the systems alternating."""
    schedule = (("long", 1), ("long", new_tokens), ("short", 1), ("short", new_tokens))
    for prompt, count in schedule:  # warm-up: first-call allocations, kernel selection, caches
        for worker in workers.values():
            worker.generate(prompt, count)
    runs: dict[str, list[dict[str, float]]] = {system: [] for system in workers}
    tokens: dict[str, dict[str, list[int]]] = {system: {} for system in workers}
    order = list(workers)
    for _ in range(repeats):
        seconds: dict[str, dict[str, float]] = {system: {} for system in workers}
        for prompt, count in schedule:
            for system in order:
                answer = workers[system].generate(prompt, count)
                seconds[system][f"seconds_{prompt}_{count}"] = answer["seconds"]
                if count == new_tokens:
                    tokens[system][prompt] = answer["tokens"]
        for system in workers:
            runs[system].append(rates(seconds[system], prompt_tokens, new_tokens))
        order.reverse()
    results = {}
    for system in workers:
        medians = {key: statistics.median(run[key] for run in runs[system])
                   for key in ("prefill_tok_s", "decode_short_tok_s", "decode_long_tok_s")}
        results[system] = {**medians, "runs": runs[system], "short_tokens": tokens[system]["short"],
                           "long_tokens": tokens[system]["long"]}
    return results


def rates(seconds: dict[str, float], prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Prefill and decode tokens/s from one round's timings (decode = (N-1) / (t_N - t_1)), and the timings."""
    long_1, long_n = seconds["seconds_long_1"], seconds[f"seconds_long_{new_tokens}"]
    short_1, short_n = seconds["seconds_short_1"], seconds[f"seconds_short_{new_tokens}"]
    return {"prefill_tok_s": prompt_tokens / long_1,
            "decode_short_tok_s": (new_tokens - 1) / max(short_n - short_1, 1e-9),
            "decode_long_tok_s": (new_tokens - 1) / max(long_n - long_1, 1e-9), **seconds}


def cpu_jiffies() -> int | None:
    """Busy clock ticks of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait; steal counts: that CPU was not ours


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
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# (key, label, number format, higher is better)
METRICS = (
    ("load_s", "load (s)", "{:.2f}", False),
    ("prefill_tok_s", "prefill {prompt} tok (tok/s)", "{:.0f}", True),
    ("decode_short_tok_s", "decode @ {short}-tok ctx (tok/s)", "{:.1f}", True),
    ("decode_long_tok_s", "decode @ {prompt}-tok ctx (tok/s)", "{:.1f}", True),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}", False),
)


def ratio_cell(ours: float, theirs: float, higher_is_better: bool) -> str:
    ratio = ours / theirs if theirs else float("nan")
    colour = "green" if (ratio > 1 if higher_is_better else ratio < 1) else "red"
    return f"[{colour}]{ratio:.2f}×[/{colour}]"


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, theirs = results["attnlab"], results["transformers"]
    names = {"prompt": args.prompt_tokens, "short": len(ours["prompts"]["short"])}
    table = Table(title=f"{args.model}: fp32, greedy, {args.new_tokens} new tokens, median of {args.repeats}",
                  caption="ratio a/t = attnlab / transformers; green where attnlab is better")
    table.add_column("metric")
    for column in ("attnlab", "transformers", "ratio a/t"):
        table.add_column(column, justify="right")
    table.add_column("better")
    for key, label, fmt, higher in METRICS:
        table.add_row(label.format(**names), fmt.format(ours[key]), fmt.format(theirs[key]),
                      ratio_cell(ours[key], theirs[key], higher), "↑ higher" if higher else "↓ lower")

    console = Console()
    console.print(table)
    match = ours["short_tokens"] == theirs["short_tokens"]
    agree = agreeing_prefix(ours["long_tokens"], theirs["long_tokens"])
    console.print(f"tokens match (short prompt, {args.new_tokens} greedy tokens): "
                  f"{'[green]yes[/green]' if match else '[red]no[/red]'}")
    console.print(f"long prompt: first {agree}/{args.new_tokens} greedy tokens agree")
    console.print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, {args.threads} threads, "
                  f"torch {machine['torch']}, transformers {machine['transformers']} "
                  f"({theirs.get('attn_implementation')} attention), python {machine['python']}")
    busy = machine["other_cpus"]
    if busy is not None and busy > 0.2:
        console.print(f"[yellow]warning: other processes kept {busy:.1f} CPUs busy on average while timing; "
                      f"the numbers are unreliable, rerun on a quieter machine[/yellow]")
    if not ours["short_prompt_chat"]:
        console.print("note: the model has no chat template; the short prompt is the question as plain text")
    if ours.get("converted_first"):
        console.print("note: attnlab converted the GGUF on its first load; it was loaded again, so the load "
                      "time above is the everyday (cached) load")


def benchmark(args: argparse.Namespace, model_path: Path) -> tuple[dict[str, dict[str, Any]], float | None]:
    """Both systems' results, and how many CPUs other processes kept busy while they were timed."""
    workers, loaded = start_workers(args, model_path)
    try:
        busy_before, start = cpu_jiffies(), time.perf_counter()
        ours_before = sum(worker.cpu_seconds() for worker in workers.values()) + sum(os.times()[:2])
        measured = measure(workers, args.prompt_tokens, args.new_tokens, args.repeats)
        ours_after = sum(worker.cpu_seconds() for worker in workers.values()) + sum(os.times()[:2])
        busy_after, wall = cpu_jiffies(), time.perf_counter() - start
        others = None
        if busy_before is not None and busy_after is not None:
            machine_s = (busy_after - busy_before) / os.sysconf("SC_CLK_TCK")
            others = max(machine_s - (ours_after - ours_before), 0.0) / wall
        finals = {system: worker.finish() for system, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.kill()
    return {system: {**loaded[system], **measured[system], **finals[system]} for system in SYSTEMS}, others


def parent_main(args: argparse.Namespace) -> int:
    check_transformers_installed()
    model_path = resolve_model_path(args.model)
    print(f"bench: loading both systems, then a warm-up and {args.repeats} timed round(s), the systems "
          f"alternating (a few minutes)…", file=sys.stderr, flush=True)
    results, others = benchmark(args, model_path)
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
               "torch": results["attnlab"]["torch_version"], "transformers": results["transformers"]["version"],
               "python": platform.python_version(), "other_cpus": others}
    render(results, args, machine)
    if args.json:
        settings = {key: getattr(args, key) for key in ("model", "threads", "repeats", "prompt_tokens", "new_tokens")}
        write_json_atomically(Path(args.json), {
            "settings": {**settings, "model_path": str(model_path)}, "machine": machine, "results": results,
            "tokens_match": results["attnlab"]["short_tokens"] == results["transformers"]["short_tokens"]})
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

"""The parent side of ``attnlab bench``: check the options, start one worker per system, time them alternately.

Every system (each attnlab mode, transformers, llama.cpp) lives in its own long-lived subprocess
(:mod:`attnlab.bench.worker`), so peak RSS is per system and imports do not interfere. Workers are started one
after the other (a start timed while another system loads on the same two cores would be slower than a real
one), then asked for one timed generation at a time, rotating through all of them and reversing the order each
round: on a small shared machine speed drifts by tens of percent within a minute, and timing one system after
the other would put that drift into the ratios.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from attnlab.bench import worker as worker_module
from attnlab.errors import AttnlabError, InputError, ModelNotFoundError
from attnlab.weights.registry import DEFAULT_MODEL

PEERS = ("transformers", "llama.cpp")
PEER_ALIASES = {"hf": "transformers", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp", "llamacpp": "llama.cpp"}
LLAMA_CPP_HINT = "pip install llama-cpp-python; see README"
REFERENCE = "attnlab fp32"  # the greedy tokens every other system is compared with

Say = Callable[[str], None]


class BenchError(AttnlabError):
    """A failed worker or an impossible benchmark; printed as one line, exit status 2."""


@dataclass
class BenchOptions:
    model: str = DEFAULT_MODEL
    modes: str = "all"
    peers: str = ",".join(PEERS)
    repeats: int = 3
    prompt_tokens: int = 512
    new_tokens: int = 128
    threads: int = 2
    json: str | None = None
    batch_sizes: str = "1,4,8"  # batch throughput of the default mode ("none": not measured)


@dataclass
class Plan:
    """What will run, decided before any process starts."""

    options: BenchOptions
    model_path: Path
    model_kind: str  # "gguf", "hf" (a Hugging Face folder) or "checkpoint" (attnlab's own)
    modes: list[str]  # attnlab modes asked for, in attnlab's order
    peers: list[str]  # peers that will run
    unavailable: dict[str, str] = field(default_factory=dict)  # mode → why it cannot run
    skipped: dict[str, str] = field(default_factory=dict)  # peer → why it does not run


# --------------------------------------------------------------------------------------------- options


def mode_names() -> tuple[str, ...]:
    """Every mode attnlab knows, in attnlab.fast's order."""
    from attnlab import fast

    return tuple(fast.MODES)


def parse_choices(text: str, names: Sequence[str], what: str, *, aliases: dict[str, str] | None = None,
                  allow_none: bool = False) -> list[str]:
    """``all`` (or ``none``) or a comma list of ``names`` → the chosen ones, in ``names`` order; an empty list or
    an unknown name is an InputError naming the option (``--{what}s``)."""
    aliases = aliases or {}
    asked = [aliases.get(part.strip().lower(), part.strip().lower()) for part in text.split(",") if part.strip()]
    others = "all or none" if allow_none else "or all"
    if allow_none and asked == ["none"]:
        return []
    if not asked:
        raise InputError(f"--{what}s is empty: give a comma list of {', '.join(names)}, {others}")
    if "all" in asked:
        return list(names)
    unknown = [name for name in asked if name not in names]
    if unknown:
        raise InputError(f"unknown {what} {unknown[0]!r} in --{what}s: expected a comma list of {', '.join(names)}, "
                         f"{others}")
    return [name for name in names if name in asked]


def parse_modes(text: str, names: Sequence[str]) -> list[str]:
    return parse_choices(text, names, "mode")


def parse_peers(text: str) -> list[str]:
    return parse_choices(text, PEERS, "peer", aliases=PEER_ALIASES, allow_none=True)


def parse_batch_sizes(text: str) -> list[int]:
    """``none`` or a comma list of positive integers (the batch sizes) → sorted, without repeats."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if [part.lower() for part in parts] == ["none"]:
        return []
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise InputError(f"--batch-sizes {text!r}: expected a comma list of positive integers (1,4,8) or none")
    return sorted({int(part) for part in parts})


def check_numbers(options: BenchOptions) -> None:
    for name, value, least in (("--repeats", options.repeats, 1), ("--prompt-tokens", options.prompt_tokens, 1),
                               ("--threads", options.threads, 1), ("--new-tokens", options.new_tokens, 2)):
        if value < least:
            why = " (decode speed is measured from N tokens minus the first)" if name == "--new-tokens" else ""
            raise InputError(f"{name} must be ≥ {least}, got {value}{why}")


def resolve_model(model: str) -> tuple[Path, str]:
    """The weights every system loads, and their kind: a named model's file, or a path as ``attnlab.load`` takes."""
    from attnlab.weights.checkpoint import is_checkpoint
    from attnlab.weights.registry import NAMED_MODELS, resolve_named_model

    path = resolve_named_model(model) if model in NAMED_MODELS else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{model}: no such file or folder, and not a named model "
                                 f"(named models: {', '.join(NAMED_MODELS)})")
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve(), "gguf"
    if is_checkpoint(path) or is_checkpoint(path / "checkpoint"):
        return path.resolve(), "checkpoint"
    if (path / "config.json").is_file():
        return path.resolve(), "hf"
    raise ModelNotFoundError(f"{model}: expected a named model, a .gguf file, a Hugging Face folder or an attnlab "
                             f"checkpoint")


def peer_skip_reason(peer: str, model_kind: str) -> str | None:
    """Why ``peer`` cannot run on this model here (not installed, cannot read the format); None if it can."""
    if peer == "transformers":
        if model_kind == "checkpoint":
            return "the model is an attnlab checkpoint; transformers reads GGUF files and Hugging Face folders"
        needed = ("transformers", "accelerate") if model_kind == "gguf" else ("transformers",)
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        return f"pip install {' '.join(missing)}" if missing else None
    if model_kind != "gguf":  # whether installed or not: the format rules it out
        return "llama.cpp reads GGUF files only"
    if importlib.util.find_spec("llama_cpp") is None:
        return LLAMA_CPP_HINT
    return None


def plan_bench(options: BenchOptions) -> Plan:
    """Check every option before any work: one InputError / ModelNotFoundError naming the first problem."""
    from attnlab import fast

    check_numbers(options)
    parse_batch_sizes(options.batch_sizes)
    modes = parse_modes(options.modes, mode_names())
    peers = parse_peers(options.peers)
    if options.json is not None and Path(options.json).is_dir():
        raise InputError(f"--json {options.json} is a folder: give a file name")
    model_path, kind = resolve_model(options.model)
    plan = Plan(options, model_path, kind, modes, [])
    plan.unavailable = {mode: reason for mode in modes if (reason := fast.mode_unavailable(mode)) is not None}
    for peer in peers:
        reason = peer_skip_reason(peer, kind)
        if reason is None:
            plan.peers.append(peer)
        else:
            plan.skipped[peer] = reason
    return plan


# --------------------------------------------------------------------------------------------- workers


class Worker:
    """One system in its own process, answering requests for timed generations."""

    def __init__(self, system: str, label: str, plan: Plan, prompts: dict[str, list[int]] | None,
                 mode: str = "auto") -> None:
        self.system, self.label = system, label
        options = plan.options
        command = [sys.executable, "-c", worker_module.BOOTSTRAP, str(Path(worker_module.__file__).resolve()),
                   "--worker", system, "--model", options.model, "--model-path", str(plan.model_path),
                   "--mode", mode, "--threads", str(options.threads), "--prompt-tokens", str(options.prompt_tokens),
                   "--new-tokens", str(options.new_tokens)]
        threads = str(options.threads)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        # stderr goes to a file, not a pipe: progress bars would fill a pipe nobody reads and block the worker.
        self.stderr: IO[str] = tempfile.TemporaryFile("w+")
        command.extend(["--spawn-time", repr(time.time())])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, bufsize=1, env=env)
        self.send({"prompts": prompts})

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self.failure() from None

    def receive(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(worker_module.RESULT_MARKER):
                return json.loads(line[len(worker_module.RESULT_MARKER):])
        raise self.failure()

    def ready(self) -> dict[str, Any]:
        """The worker's load report ({"ready": ...} or {"unavailable": reason}); its input errors raised."""
        answer = self.receive()
        if "error" in answer:
            self.kill()
            raise BenchError(answer["error"])
        if "unavailable" in answer:
            self.process.wait()
        return answer

    def generate(self, prompt: str, new_tokens: int) -> dict[str, Any]:
        """Seconds and tokens of one generation of ``new_tokens`` after the named prompt."""
        self.send({"prompt": prompt, "new_tokens": new_tokens})
        answer = self.receive()
        if len(answer["tokens"]) != new_tokens:
            raise BenchError(f"{self.label} generated {len(answer['tokens'])} tokens instead of {new_tokens}")
        return answer

    def teacher_forced(self, prompt: str, tokens: Sequence[int]) -> list[int]:
        """The worker's greedy token after each prefix of ``tokens`` following the named prompt (attnlab only)."""
        self.send({"teacher_forced": prompt, "tokens": list(tokens)})
        return self.receive()["predicted"]

    def batch(self, sizes: Sequence[int], new_tokens: int, repeats: int) -> list[dict[str, Any]]:
        """Generation throughput at each batch size (``attnlab.throughput.batch_throughput``; attnlab only)."""
        self.send({"batch": list(sizes), "new_tokens": new_tokens, "repeats": repeats})
        answer = self.receive()
        if "unavailable" in answer:
            raise BenchError(answer["unavailable"])
        return answer["rows"]

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
        return BenchError(f"the {self.label} worker failed (exit {code}): {lines[-1] if lines else 'no output'}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Started:
    """The workers that run, their load reports, and what the starts found out."""

    workers: dict[str, Worker] = field(default_factory=dict)  # label → worker, in table order
    ready: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompts: dict[str, list[int]] | None = None
    default_mode: str | None = None
    short_prompt_chat: bool | None = None  # whether the short prompt went through the model's chat template
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def kill_all(self) -> None:
        for worker in self.workers.values():
            worker.kill()


def start_once(started: Started, system: str, label: str, plan: Plan, mode: str, say: Say) -> tuple[Worker, dict]:
    """Start one worker; if its load built something (a conversion, a compiled artefact), start it again, so
    the table shows the everyday cached start and the first start is kept beside it."""
    worker = Worker(system, label, plan, started.prompts, mode)
    ready = worker.ready()
    if ready.get("ready") and ready.get("built_on_load"):
        say(f"bench: {label}: the first start built and cached its artefact "
            f"({ready['ttft_s']:.1f} s to first token); starting it again to time a cached start")
        worker.finish()
        first = {"load_s": ready["load_s"], "ttft_s": ready["ttft_s"]}
        worker = Worker(system, label, plan, started.prompts, mode)
        ready = {**worker.ready(), "first_start": first}
        if ready.get("built_on_load"):
            started.notes.append(f"{label} built its artefact again on the second start: it is not being cached")
    return worker, ready


def start_workers(plan: Plan, say: Say) -> Started:
    """Start every system one after the other: attnlab as ``load`` picks by default first (its tokenizer makes
    the prompts), then the other asked-for modes, then the peers."""
    started = Started(unavailable=dict(plan.unavailable))
    try:
        say("bench: starting attnlab in its default mode (a first start may build and cache an artefact)…")
        worker, ready = start_once(started, "attnlab", "attnlab (default)", plan, "auto", say)
        if "unavailable" in ready:
            raise BenchError(f"attnlab could not load {plan.options.model}: {ready['unavailable']}")
        started.prompts, started.default_mode = ready["prompts"], ready["mode"]
        started.short_prompt_chat = ready["short_prompt_chat"]
        if started.default_mode in plan.modes:
            worker.label = f"attnlab {started.default_mode}"
            started.workers[worker.label], started.ready[worker.label] = worker, ready
            say(f"bench: {worker.label} (the default) ready: load {ready['load_s']:.2f} s, "
                f"first token at {ready['ttft_s']:.2f} s")
        else:
            worker.finish()
            started.notes.append(f"attnlab's default mode here is {started.default_mode}, which --modes left out")
        for mode in plan.modes:
            if mode == started.default_mode or mode in started.unavailable:
                continue
            label = f"attnlab {mode}"
            say(f"bench: starting {label}…")
            worker, ready = start_once(started, "attnlab", label, plan, mode, say)
            if "unavailable" in ready:
                started.unavailable[mode] = ready["unavailable"]
                say(f"bench: {label}: not available: {ready['unavailable']}")
                continue
            if ready["mode"] != mode:
                started.notes.append(f"{label}: load(mode={mode!r}) gave a model in mode {ready['mode']!r}")
            started.workers[label], started.ready[label] = worker, ready
            say(f"bench: {label} ready: load {ready['load_s']:.2f} s, first token at {ready['ttft_s']:.2f} s")
        if not started.workers:
            reasons = "; ".join(f"{mode}: {reason}" for mode, reason in started.unavailable.items())
            raise BenchError(f"none of the modes asked for can run here ({reasons}); attnlab's default mode here "
                             f"is {started.default_mode}")
        for peer in plan.peers:
            say(f"bench: starting {peer}…")
            worker, ready = start_once(started, peer, peer, plan, "auto", say)
            started.workers[peer], started.ready[peer] = worker, ready
            say(f"bench: {peer} ready: load {ready['load_s']:.2f} s, first token at {ready['ttft_s']:.2f} s")
        return started
    except BaseException:
        started.kill_all()
        raise


# --------------------------------------------------------------------------------------------- measuring


def rates(timings: dict[str, dict[str, float]], prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Prefill and decode tokens/s from one round's two generations, each timed at its first and last token:
    prefill = prompt tokens / time to the first token of the long prompt; decode = (N - 1) / (time from the first
    to the last token), which leaves the prefill out."""
    long, short = timings["long"], timings["short"]
    return {"prefill_tok_s": prompt_tokens / long["first_s"],
            "decode_short_tok_s": (new_tokens - 1) / max(short["last_s"] - short["first_s"], 1e-9),
            "decode_long_tok_s": (new_tokens - 1) / max(long["last_s"] - long["first_s"], 1e-9),
            **{f"{prompt}_{key}": value for prompt, timing in timings.items() for key, value in timing.items()}}


RATE_KEYS = ("prefill_tok_s", "decode_short_tok_s", "decode_long_tok_s")


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of each rate over the timed rounds."""
    return {key: statistics.median(run[key] for run in runs) for key in RATE_KEYS}


def measure(workers: dict[str, Worker], prompt_tokens: int, new_tokens: int, repeats: int,
            say: Say) -> dict[str, dict[str, Any]]:
    """A warm-up round, then ``repeats`` rounds of two timed generations per system (N tokens after the long
    prompt, N after the short one), the systems rotating and their order reversed every round; medians, every
    round's timings, and each system's greedy tokens."""
    schedule = ("long", "short")
    order = list(workers)
    say(f"bench: warm-up round ({len(order)} systems)…")
    for prompt in schedule:  # first-call allocations, kernel selection, caches
        for label in order:
            workers[label].generate(prompt, new_tokens)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in workers}
    tokens: dict[str, dict[str, list[list[int]]]] = {label: {"short": [], "long": []} for label in workers}
    for round_index in range(repeats):
        say(f"bench: timed round {round_index + 1}/{repeats}: {', '.join(order)}…")
        timings: dict[str, dict[str, dict[str, float]]] = {label: {} for label in workers}
        for prompt in schedule:
            for label in order:
                answer = workers[label].generate(prompt, new_tokens)
                timings[label][prompt] = {"first_s": answer["first_s"], "last_s": answer["last_s"]}
                tokens[label][prompt].append(answer["tokens"])
        for label in workers:
            runs[label].append(rates(timings[label], prompt_tokens, new_tokens))
        order.reverse()
    return {label: {**medians(runs[label]), "runs": runs[label],
                    "tokens": {prompt: runs_tokens[-1] for prompt, runs_tokens in tokens[label].items()},
                    "tokens_stable": all(run == runs_tokens[0] for runs_tokens in tokens[label].values()
                                         for run in runs_tokens)}
            for label in workers}


def agreement(tokens: Sequence[int], reference: Sequence[int]) -> dict[str, Any]:
    """Free-running greedy agreement: positions where ``tokens`` equals ``reference`` (each generated from the
    same prompt by its own system), and the length of their common prefix."""
    matched = sum(a == b for a, b in zip(tokens, reference))
    prefix = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        prefix += 1
    steps = max(len(tokens), len(reference))
    return {"matched": matched, "steps": steps, "fraction": matched / steps if steps else 1.0, "prefix": prefix}


def agreements(tokens: dict[str, Sequence[int]], reference: dict[str, Sequence[int]]) -> dict[str, Any]:
    """Agreement after each prompt, and over both together (the fraction the target is checked on)."""
    per_prompt = {prompt: agreement(tokens[prompt], reference[prompt]) for prompt in ("short", "long")}
    matched = sum(a["matched"] for a in per_prompt.values())
    steps = sum(a["steps"] for a in per_prompt.values())
    return {**per_prompt, "fraction": matched / steps if steps else 1.0, "matched": matched, "steps": steps}


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


def measure_all(started: Started, options: BenchOptions,
                say: Say) -> tuple[dict[str, dict[str, Any]], float | None, list[dict[str, Any]] | None]:
    """Time every started system; their results, how many CPUs other processes kept busy meanwhile, and the
    default mode's batch throughput rows."""
    workers = started.workers
    busy_before, start = cpu_jiffies(), time.perf_counter()
    ours_before = sum(worker.cpu_seconds() for worker in workers.values()) + sum(os.times()[:2])
    measured = measure(workers, options.prompt_tokens, options.new_tokens, options.repeats, say)
    if REFERENCE in measured:  # every attnlab mode, fed fp32's greedy tokens: does it pick the same at each step?
        reference = measured[REFERENCE]["tokens"]
        for label, worker in workers.items():
            if label.startswith("attnlab") and label != REFERENCE:
                predicted = {prompt: worker.teacher_forced(prompt, reference[prompt]) for prompt in ("short", "long")}
                measured[label]["teacher_forced"] = agreements(predicted, reference)
    batch = measure_batches(started, options, say)
    ours_after = sum(worker.cpu_seconds() for worker in workers.values()) + sum(os.times()[:2])
    busy_after, wall = cpu_jiffies(), time.perf_counter() - start
    others = None
    if busy_before is not None and busy_after is not None:
        machine_s = (busy_after - busy_before) / os.sysconf("SC_CLK_TCK")
        others = max(machine_s - (ours_after - ours_before), 0.0) / wall
    finals = {label: worker.finish() for label, worker in workers.items()}
    return {label: {**started.ready[label], **measured[label], **finals[label]} for label in workers}, others, batch


def measure_batches(started: Started, options: BenchOptions, say: Say) -> list[dict[str, Any]] | None:
    """The default mode's generation throughput against batch size (after every batch-1 measurement, so that a
    batch's larger KV cache is no part of the peak RSS the table reports); None when not asked for."""
    sizes = parse_batch_sizes(options.batch_sizes)
    label = f"attnlab {started.default_mode}"
    if not sizes or label not in started.workers:
        return None
    say(f"bench: batch throughput of {label}: batch sizes {', '.join(map(str, sizes))}, "
        f"{options.new_tokens} greedy tokens per prompt, {options.repeats} round(s)…")
    try:
        rows = started.workers[label].batch(sizes, options.new_tokens, options.repeats)
    except BenchError as error:
        started.notes.append(f"batch throughput: not measured ({error})")
        return None
    return [{"system": label, "batch size": row["batch_size"], "sequences": row["sequences"],
             "seconds": row["seconds"], "tokens/s": row["tokens_per_s"],
             "tokens/s per sequence": row["per_sequence_tokens_per_s"],
             f"vs batch {row['baseline_batch_size']}": row["ratio"],
             f"= batch {row['baseline_batch_size']} (sequences)":
                 f"{row['sequences_same_as_baseline']} / {row['sequences']}"} for row in rows]


def run_bench(options: BenchOptions, say: Say | None = None) -> dict[str, Any]:
    """The whole benchmark: plan, start, time, compare. Returns the results (what ``--json`` writes)."""
    from attnlab.bench.report import evaluate_targets

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    plan = plan_bench(options)
    for peer, reason in plan.skipped.items():
        say(f"bench: {peer}: skipped ({reason})")
    systems = max(len(plan.modes) - len(plan.unavailable), 1) + len(plan.peers)
    say(f"bench: {plan.options.model}: up to {systems} systems, each in its own process, started one by one, "
        f"then a warm-up and {options.repeats} timed round(s) rotating through them (several minutes)")
    started = start_workers(plan, say)
    try:
        measured, others, batch = measure_all(started, options, say)
    finally:
        started.kill_all()

    systems_out: dict[str, dict[str, Any]] = {}
    order = [f"attnlab {mode}" for mode in mode_names()] + list(PEERS)  # the table's rows: attnlab's modes first
    rank = {label: index for index, label in enumerate(order)}
    for label, result in sorted(measured.items(), key=lambda item: rank.get(item[0], len(order))):
        result.pop("prompts", None)
        result.pop("ready", None)
        kind = "attnlab" if label.startswith("attnlab") else label
        systems_out[label] = {"system": kind, "default": kind == "attnlab" and result["mode"] == started.default_mode,
                              **result}
    reference = systems_out.get(REFERENCE)
    for label, result in systems_out.items():
        result["agreement"] = (agreements(result["tokens"], reference["tokens"])
                               if reference is not None and label != REFERENCE else None)
        if not result["tokens_stable"]:
            started.notes.append(f"{label} produced different greedy tokens in different rounds (nondeterministic)")
    first = next(iter(systems_out.values()))
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": options.threads,
               "torch": first.get("torch_version"), "python": platform.python_version(), "other_cpus": others,
               "versions": {label: result.get("version") for label, result in systems_out.items()}}
    results = {
        "settings": {**asdict(options), "model_path": str(plan.model_path), "model_kind": plan.model_kind,
                     "modes_asked": plan.modes, "peers_asked": plan.peers + list(plan.skipped)},
        "machine": machine,
        "prompt_lengths": {prompt: len(ids) for prompt, ids in (started.prompts or {}).items()},
        "short_prompt_chat": started.short_prompt_chat,
        "default_mode": started.default_mode,
        "reference": REFERENCE if reference is not None else None,
        "agreement_method": "free-running: each system generates its own greedy tokens from the same prompt; "
                            "positions compared one by one with attnlab fp32's, plus the common prefix",
        "teacher_forced_method": "each attnlab mode reads the prompt + attnlab fp32's greedy tokens in one pass; "
                                 "at each step, is its argmax fp32's token (what the agreement target judges)",
        "systems": systems_out,
        "unavailable": {f"attnlab {mode}": reason for mode, reason in started.unavailable.items()},
        "skipped": plan.skipped,
        "notes": started.notes,
        "batch": batch,  # the default mode's throughput against batch size (measure_batches), or None
    }
    results["targets"] = evaluate_targets(results)
    if options.json:
        write_json_atomically(Path(options.json), results)
    return results

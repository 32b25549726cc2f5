"""One benchmarked system in its own process: load it, time its first token, then serve timed generations.

The parent (:mod:`attnlab.bench.run`) starts every worker the same way, by loading this file by its path
(``python -c BOOTSTRAP <this file> --worker SYSTEM ...``) rather than ``python -m attnlab...``: importing anything
under ``attnlab`` runs ``attnlab/__init__.py``, which imports torch, and a peer's process must carry neither
torch nor attnlab (llama.cpp's peak RSS and start time would include ~220 MB and ~2 s of ours). So this module
imports only the standard library at the top; each loader imports what its system needs.

Protocol (one JSON object a line; the worker's replies are prefixed with ``RESULT_MARKER`` because libraries
may print lines of their own on stdout):

1. parent → worker: ``{"prompts": null | {"short": [ids], "long": [ids]}}``, written right after the spawn.
   ``null`` only for the first attnlab worker, which makes the prompts with attnlab's tokenizer.
2. worker → parent: ``{"ready": true, "load_s", "ttft_s", "prompts", ...}`` once loaded and its first token
   generated; or ``{"unavailable": reason}`` (a mode this attnlab or machine cannot run; the worker exits 0);
   or ``{"error": message}`` (a problem with the user's input; exit 2).
3. parent → worker: ``{"prompt": "short" | "long", "new_tokens": N}``; worker → parent:
   ``{"first_s": s, "last_s": s, "tokens": [ids]}``: exactly N greedy tokens (end-of-text does not stop them)
   and the seconds from the request to the first and to the last of them, as the system streamed them.
4. parent → worker: ``{"done": true}``; worker → parent: ``{"peak_rss_mb": MB}``, then it exits.

Time to first token (``ttft_s``) is wall time from the parent's ``time.time()`` just before it spawned the process
(``--spawn-time``) to the first generated token of the short prompt: interpreter start, imports, load, prefill
and the first decode step, as a user starting a command would wait for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULT_MARKER = "ATTNLAB_BENCH "
SYSTEMS = ("attnlab", "transformers", "llama.cpp")
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
# Runs this file as a top-level module from its path, then its worker_main (see the module docstring).
BOOTSTRAP = ("import importlib.util, sys; "
             "spec = importlib.util.spec_from_file_location('attnlab_bench_worker', sys.argv[1]); "
             "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
             "sys.exit(module.worker_main(sys.argv[2:]))")

# (prompt ids, N) → (N greedy token ids, seconds to the first of them, seconds to the last), timed from the call.
Runner = Callable[[Sequence[int], int], tuple[list[int], float, float]]


class Unavailable(Exception):
    """This system cannot run here: a mode the installed attnlab does not have, or this machine cannot run."""


class UserInputError(Exception):
    """A problem with what the user asked for (e.g. prompt + new tokens exceed the model's context)."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reply(message: dict[str, Any]) -> None:
    """Send one message to the parent: a marked JSON line."""
    print(RESULT_MARKER + json.dumps(message), flush=True)


def long_prompt_ids(encode: Callable[[str], list[int]], n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids of English text: the paragraph repeated until long enough, then cut."""
    text = PARAGRAPH
    ids = encode(text)
    while len(ids) < n_tokens:
        text += PARAGRAPH
        ids = encode(text)
    return ids[:n_tokens]


def cache_snapshot() -> set[str]:
    """Every file under attnlab's cache folder: a new one after load means load built something (a GGUF
    conversion, a compiled artefact) that the next start will find cached."""
    from attnlab.paths import cache_dir

    root = cache_dir()
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root) for name in names}


class StderrRecorder:
    """Passes writes on to the real stderr and keeps a copy (what load printed while it ran)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.written = stream, []

    def write(self, text: str) -> int:
        self.written.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno…: the real stream's
        return getattr(self.stream, name)


class TokenClock:
    """Collects the tokens of one generation and when the first and the last of them arrived."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens: list[int] = []
        self.first_s = self.last_s = 0.0

    def tick(self, token: int) -> None:
        self.last_s = time.perf_counter() - self.start
        if not self.tokens:
            self.first_s = self.last_s
        self.tokens.append(int(token))

    def result(self) -> tuple[list[int], float, float]:
        return self.tokens, self.first_s, self.last_s


# --------------------------------------------------------------------------------------------- the systems


def load_attnlab(args: argparse.Namespace, prompts: dict[str, list[int]] | None) -> tuple[Runner, dict[str, Any]]:
    """Load attnlab in ``args.mode`` ("auto" = what ``attnlab.load`` picks by default); its runner and facts."""
    import torch

    import attnlab
    from attnlab.errors import AttnlabError, InputError, TokenizerError
    from attnlab.generate import generate_token_ids
    from attnlab.throughput import batch_throughput

    torch.set_num_threads(args.threads)
    before = cache_snapshot()
    messages = StderrRecorder(sys.stderr)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(messages):
            lm = attnlab.load(args.model, mode=args.mode)
    except InputError as error:  # forced: a mode this machine cannot run; auto: a problem with the input
        raise (UserInputError if args.mode == "auto" else Unavailable)(str(error)) from None
    except AttnlabError as error:  # the model cannot be loaded: one line for the user
        raise UserInputError(str(error)) from None
    load_s = time.perf_counter() - start
    # Load built something the next start will find cached: a new file in attnlab's cache, or its progress line
    # ("attnlab: dequantising … (first use only)", "attnlab: compiling …") on stderr.
    load_messages = [line.strip() for line in "".join(messages.written).splitlines() if line.strip()]
    built = bool(cache_snapshot() - before) or any(line.startswith("attnlab:") for line in load_messages)
    if not (lm.config.lm_head and lm.config.causal):
        raise UserInputError(f"{args.model} is not a causal language model ({lm.config.family}): there is no "
                             f"generation to benchmark")
    model = lm.model.eval()
    chat = None
    if prompts is None:
        try:
            short_ids, chat = lm.prompt_ids(SHORT_PROMPT, chat=True), True
        except TokenizerError:  # a base model without a chat template: the question as plain text
            short_ids, chat = lm.prompt_ids(SHORT_PROMPT), False
        prompts = {"short": short_ids, "long": long_prompt_ids(lm.tokenizer.encode, args.prompt_tokens)}
    longest = max(len(ids) for ids in prompts.values()) + args.new_tokens
    if longest > lm.config.context_length:
        raise UserInputError(f"{longest} tokens (prompt + --new-tokens) exceed the model's context of "
                             f"{lm.config.context_length}: lower --prompt-tokens or --new-tokens")

    # The product's greedy decode loop, with the mode's compiled decode step (as `attnlab generate` runs it).
    def run(ids: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        clock = TokenClock()
        with torch.inference_mode():
            for token in generate_token_ids(model, ids, max_new_tokens=new_tokens, stop_ids=frozenset(),
                                            decode_step=lm.decode_step):
                clock.tick(token)
        return clock.result()

    def teacher_forced(prompt: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """argmax after prompt + tokens[:i] for every i, in one pass (tokens are the reference's greedy ones)."""
        with torch.inference_mode():
            logits = model(torch.tensor([list(prompt) + list(tokens[:-1])]))[0, len(prompt) - 1:]
        return logits.argmax(-1).tolist()

    def batch(sizes: Sequence[int], new_tokens: int, repeats: int) -> dict[str, Any]:
        """{"rows": throughput at each batch size} or {"unavailable": why} (prompts beyond a small context…)."""
        try:
            return {"rows": batch_throughput(lm, sizes, new_tokens, repeats)}
        except AttnlabError as error:
            return {"unavailable": str(error)}

    info = {"load_s": load_s, "mode": lm.mode, "asked_mode": args.mode,
            "built_on_load": built, "load_messages": load_messages, "version": attnlab.__version__,
            "torch_version": torch.__version__, "threads": torch.get_num_threads(), "prompts": prompts,
            "short_prompt_chat": chat, "context_length": lm.config.context_length, "teacher_forced": teacher_forced,
            "batch": batch}
    return run, info


def load_transformers(args: argparse.Namespace, prompts: dict[str, list[int]]) -> tuple[Runner, dict[str, Any]]:
    """transformers fp32 from the same weights file; its runner is ``model.generate`` (default attention)."""
    from pathlib import Path

    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
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

    class Streamer(BaseStreamer):  # generate() hands it the prompt first, then each new token as it is chosen
        def __init__(self, clock: TokenClock) -> None:
            self.clock, self.prompt_seen = clock, False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                for token in value.reshape(-1).tolist():
                    self.clock.tick(token)
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def run(ids: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        clock = TokenClock()
        input_ids = torch.tensor([list(ids)])
        with torch.inference_mode():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=pad_id, streamer=Streamer(clock))
        tokens, first_s, last_s = clock.result()
        if tokens != output[0, len(ids):].tolist():
            raise RuntimeError("transformers streamed other tokens than it returned")
        return tokens, first_s, last_s

    info = {"load_s": load_s, "mode": "fp32", "version": transformers.__version__,
            "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation}
    return run, info


# ggml's file types (llama_ftype), for the label: the weights llama.cpp computes with.
GGML_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def load_llama_cpp(args: argparse.Namespace, prompts: dict[str, list[int]]) -> tuple[Runner, dict[str, Any]]:
    """llama.cpp (llama-cpp-python) on the GGUF itself, in its own quantisation; greedy on the same ids."""
    import llama_cpp

    n_ctx = max(2048, max(len(ids) for ids in prompts.values()) + args.new_tokens)
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model_path, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=n_ctx, n_batch=512, verbose=False, logits_all=False)
    load_s = time.perf_counter() - start

    def run(ids: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        clock = TokenClock()
        llm.reset()  # empty KV cache: no prefix of an earlier request is reused, the whole prompt is evaluated
        # generate() yields one token after another and never stops by itself (end-of-text included).
        for token in llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=True):
            clock.tick(int(token))
            if len(clock.tokens) == new_tokens:
                break
        return clock.result()

    file_type = llm.metadata.get("general.file_type")
    quant = GGML_FILE_TYPES.get(int(file_type), f"type {file_type}") if file_type is not None else "?"
    info = {"load_s": load_s, "mode": quant, "version": llama_cpp.__version__, "threads": args.threads,
            "n_ctx": n_ctx}
    return run, info


LOADERS = {"attnlab": load_attnlab, "transformers": load_transformers, "llama.cpp": load_llama_cpp}


def worker_main(argv: Sequence[str]) -> int:
    """Load one system, time its first token, then serve timed generations until the parent says done."""
    parser = argparse.ArgumentParser(prog="attnlab bench worker")
    parser.add_argument("--worker", choices=SYSTEMS, required=True)
    parser.add_argument("--model", required=True, help="what the user gave (attnlab loads it as attnlab.load would)")
    parser.add_argument("--model-path", required=True, help="the weights file or folder the peers load")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--spawn-time", type=float, required=True, help="parent's time.time() at the spawn")
    args = parser.parse_args(argv)

    prompts = json.loads(sys.stdin.readline())["prompts"]
    try:
        runner, info = LOADERS[args.worker](args, prompts)
        prompts = info.pop("prompts", prompts)
        teacher_forced = info.pop("teacher_forced", None)  # attnlab's workers only
        batch = info.pop("batch", None)
        first, first_s, _ = runner(prompts["short"], 1)
        ttft_s = time.time() - args.spawn_time
    except Unavailable as reason:
        reply({"unavailable": str(reason)})
        return 0
    except UserInputError as error:
        reply({"error": str(error)})
        return 2
    reply({"ready": True, **info, "prompts": prompts, "ttft_s": ttft_s, "first_token_s": first_s,
           "first_token": first})
    peak_generating = None
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("done"):
            break
        if "teacher_forced" in request:  # attnlab only: its greedy choice after each prefix of the given tokens
            # a full-sequence pass with every position's logits is no part of generating: peak RSS is read before it
            peak_generating = peak_generating or peak_rss_mb()
            reply({"predicted": teacher_forced(prompts[request["teacher_forced"]], request["tokens"])})
            continue
        if "batch" in request:  # attnlab only: throughput against batch size, after the batch-1 figures (RSS too)
            peak_generating = peak_generating or peak_rss_mb()
            reply(batch(request["batch"], request["new_tokens"], request["repeats"]))
            continue
        tokens, first_s, last_s = runner(prompts[request["prompt"]], request["new_tokens"])
        reply({"first_s": first_s, "last_s": last_s, "tokens": tokens})
    reply({"peak_rss_mb": peak_generating or peak_rss_mb()})
    return 0

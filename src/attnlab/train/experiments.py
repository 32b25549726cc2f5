"""``attnlab ablate``: train attention variants from the same seeds and data under one budget, and report.

A claim such as "removing W_Q costs nothing" means something only at a stated budget. Two are offered:

- **parameters** (``--match params``): every variant trains for the same steps, and its MLP width d_ff
  is moved so that its parameter count equals softmax attention's (within 2·d per layer: d_ff is an
  integer). A variant that removes W_Q gets those parameters back in its MLP; merged-qk, which costs
  H·d² instead of 2·H·d·d_k, gives them up from its MLP. Impossible when d_ff would fall below 1.
- **training FLOPs** (``--match flops``): every variant keeps its natural size and trains for
  steps = base steps × F_softmax / F_variant, F being the training FLOPs per token of
  :func:`forward_flops_per_token` (× 3: a backward pass costs twice a forward).

Seeds: run k of every variant uses seed ``train.seed + k`` for its initialisation *and* its batch
order, so the variants of one seed see the same batches in the same order: differences between them
are paired. Every run is scored on the same fixed held-out windows (data seed 0).

The report folder (``--out``):

    results.md     the table and a summary of what it shows and how sure it is
    results.csv    one row per run
    ablation.json  everything the table is made from (args, configs, per-run figures, curves)
    loss.png       training-loss curves, mean over seeds with a min–max band, one colour per variant
    runs/          each run's folder (attnlab explain / generate / sample take runs/<variant>-seed<k>)

Re-running with the same arguments on the same machine reproduces every number but the wall times:
training on the CPU is deterministic for a fixed thread count, which ``ablation.json`` records.
"""

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.paths import atomic_write_text
from attnlab.train.config import RunConfig
from attnlab.train.data import TokenData
from attnlab.variants import parse_variant

MATCHES = ("params", "flops")
DEFAULT_VARIANTS = ("softmax", "no-q", "no-k", "no-v", "merged-qk", "linear", "kernel")
BASELINE = "softmax"
EVAL_SEED = 0  # data seed of the held-out windows every run is scored on
REPORT_FILES = ("results.md", "results.csv", "ablation.json", "loss.png")
# Two-sided 95% quantiles of Student's t for 1 … 10 degrees of freedom (beyond: ≈ 2.2 and falling to 1.96).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# ----------------------------------------------------------------------------------------------- budget


def forward_flops_per_token(config: ModelConfig) -> float:
    """Multiply-adds × 2 of one token's forward pass at full context, by the algorithm each variant runs.

    Matrices: 2 FLOPs per weight. Softmax-family mixing: 2·key_dim per visible key for the scores and
    2·head_dim for the weighted sum of values, with the visible keys averaged over the positions of a
    causal window (T+1)/2 — or the sliding window's mean. Linear attention: the recurrent form, per
    head 2·d_k·d_v to add φ(k)vᵀ to the state and 2·d_k·d_v to read it, plus 4·d_k for the normaliser.
    Norms, activations and softmax itself are not counted (a few % at these sizes).
    """
    variant = parse_variant(config.attention)
    d, hd, H, H_kv, T = config.d_model, config.head_dim, config.n_heads, config.n_kv_heads, config.context_length
    projections = {"q": H * hd * d, "k": H_kv * hd * d, "v": H_kv * hd * d, "o": H * hd * d}
    key_dim = hd
    if variant.name in ("no-q", "no-k", "no-v"):
        projections[variant.name[-1]] = 0
    if variant.name == "merged-qk":
        rank = variant.merged_rank
        projections["q"], projections["k"] = (H * d * d, 0) if rank is None else (H * d * rank, H * d * rank)
        key_dim = d if rank is None else rank
    if config.causal:
        window = variant.window or T
        visible_keys = sum(min(i + 1, window) for i in range(T)) / T
    else:
        visible_keys = T
    if variant.name == "linear":
        mixing = H * (4 * hd * hd + 4 * hd)
    else:
        mixing = H * visible_keys * 2 * (key_dim + hd)
    mlp = (3 if config.mlp == "glu" else 2) * d * config.d_ff
    per_layer = 2 * sum(projections.values()) + mixing + 2 * mlp
    head = 2 * d * config.vocab_size if config.lm_head else 0
    return config.n_layers * per_layer + head


def training_flops(config: ModelConfig, steps: int, tokens_per_step: int) -> float:
    return 3 * forward_flops_per_token(config) * steps * tokens_per_step


@dataclass
class PlannedRun:
    variant: str  # the spec as parsed: "linear:elu"
    seed: int
    config: RunConfig  # complete: model.attention, model.d_ff, train.seed, train.max_steps, train.out_dir
    model: ModelConfig
    params: int
    flops: float

    @property
    def name(self) -> str:
        return run_name(self.variant, self.seed)


def run_name(spec: str, seed: int) -> str:
    """The run's folder under runs/: 'linear-elu-seed1337'."""
    return f"{spec.replace(':', '-')}-seed{seed}"


def plan_ablation(base: RunConfig, variants: list[str], seeds: int, match: str, vocab_size: int,
                  out_dir: Path) -> list[PlannedRun]:
    """One complete run config per (variant, seed), budgets matched; InputError on anything impossible."""
    if match not in MATCHES:
        raise InputError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")
    if seeds < 1:
        raise InputError(f"--seeds must be ≥ 1, got {seeds}")
    specs = [str(parse_variant(spec)) for spec in variants]
    if len(set(specs)) != len(specs):
        raise InputError(f"--variants names a variant twice: {', '.join(specs)}")
    if BASELINE not in specs:
        specs.insert(0, BASELINE)  # every budget and every comparison is relative to softmax
    if "attention" in base.model:
        raise InputError("the base config sets model.attention; ablate chooses the attention itself (--variants)")
    t = base.train
    tokens_per_step = t.batch_size * t.grad_accum * base.data.context
    baseline = base.model_config(vocab_size)
    baseline_flops = training_flops(baseline, t.max_steps, tokens_per_step)
    plan = []
    for spec in specs:
        model_table = dict(base.model, attention=spec)
        model = _model_config(base, model_table, vocab_size, spec)
        steps = t.max_steps
        if match == "params":
            model_table["d_ff"] = _d_ff_matching(base, model_table, model, baseline.n_parameters(), vocab_size, spec)
            model = _model_config(base, model_table, vocab_size, spec)
        else:
            steps = round(t.max_steps * baseline_flops / training_flops(model, t.max_steps, tokens_per_step))
            if steps <= t.warmup_steps:
                raise InputError(f"impossible budget: {spec} costs {training_flops(model, 1, 1) / 1e6:.2f} MFLOPs "
                                 f"per token against softmax's {training_flops(baseline, 1, 1) / 1e6:.2f}, so it "
                                 f"gets {steps} steps, not more than the {t.warmup_steps} warm-up steps; raise "
                                 f"train.max_steps or lower train.warmup_steps")
        for seed in range(t.seed, t.seed + seeds):
            train = dataclasses.replace(t, seed=seed, max_steps=steps, eval_interval=steps, checkpoint_interval=steps,
                                        out_dir=str(out_dir / "runs" / run_name(spec, seed)))
            plan.append(PlannedRun(spec, seed, RunConfig(model=model_table, data=base.data, train=train), model,
                                   model.n_parameters(), training_flops(model, steps, tokens_per_step)))
    return plan


def _model_config(base: RunConfig, model_table: dict, vocab_size: int, spec: str) -> ModelConfig:
    try:
        return RunConfig(model=model_table, data=base.data, train=base.train).model_config(vocab_size)
    except InputError as error:
        raise InputError(f"variant {spec} does not fit the base model: {error}") from None


def _d_ff_matching(base: RunConfig, model_table: dict, model: ModelConfig, target: int, vocab_size: int,
                   spec: str) -> int:
    """The MLP width that brings ``model`` closest to ``target`` parameters (parameters are linear in d_ff)."""
    per_unit = dataclasses.replace(model, d_ff=model.d_ff + 1).n_parameters() - model.n_parameters()
    d_ff = model.d_ff + round((target - model.n_parameters()) / per_unit)
    if d_ff < 1:
        missing = (model.n_parameters() - target) // model.n_layers
        raise InputError(f"impossible budget: {spec} has {missing:,} more parameters per layer than softmax "
                         f"attention, more than the MLP (d_ff {model.d_ff}) can give up; use --match flops or a "
                         f"wider model")
    return d_ff


# ----------------------------------------------------------------------------------------------- running


@dataclass
class RunFigures:
    variant: str
    seed: int
    params: int
    d_ff: int
    steps: int
    flops: float
    val_loss: float
    train_loss: float
    wall_seconds: float
    tokens_per_second: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean training loss of the interval)


def _train_one(run: PlannedRun, data: TokenData, eval_data: TokenData, eval_batches: int, threads: int) -> RunFigures:
    """Train one planned run (in this process or a worker) and score it on the shared held-out windows."""
    from attnlab.train.trainer import mean_loss, train

    torch.set_num_threads(threads)
    t = run.config.train
    result = train(run.config, dataclasses.replace(data, seed=t.seed), overwrite=True, progress=False)
    if result.interrupted:
        raise KeyboardInterrupt
    import attnlab

    model = attnlab.load(t.out_dir).model
    val = mean_loss(model, eval_data, "val", eval_batches, t.batch_size)
    lines = (Path(t.out_dir) / "metrics.jsonl").read_text().splitlines()
    curve = [(m["step"], m["loss"]) for m in map(json.loads, lines) if "loss" in m]
    return RunFigures(run.variant, run.seed, run.params, run.model.d_ff, t.max_steps, run.flops, val,
                      curve[-1][1], result.seconds, result.tokens_per_second, curve)


def _worker(args: tuple) -> RunFigures:
    return _train_one(*args)


@dataclass
class Ablation:
    """Everything a report is made from."""

    command: str
    match: str
    base: dict  # the base RunConfig as a dict
    corpus: str
    variants: list[str]
    seeds: list[int]
    threads_per_run: int
    jobs: int
    eval_batches: int
    runs: list[RunFigures]
    wall_seconds: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Ablation":
        runs = [RunFigures(**{**r, "curve": [tuple(p) for p in r["curve"]]}) for r in data["runs"]]
        return cls(**{**data, "runs": runs})

    def of(self, variant: str) -> list[RunFigures]:
        return [r for r in self.runs if r.variant == variant]


def run_ablation(base: RunConfig, plan: list[PlannedRun], text: str, out_dir: Path, *, command: str, match: str,
                 jobs: int = 1, eval_batches: int = 50, overwrite: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> Ablation:
    """Train every planned run (``jobs`` at a time, each on cores // jobs threads) and write the report."""
    check_run_options(jobs, eval_batches)
    prepare_report_dir(out_dir, overwrite=overwrite)
    threads = max(1, torch.get_num_threads() // jobs)
    data = TokenData.prepare(text, base.data.tokenizer, base.data.context, base.data.val_fraction, base.train.seed,
                             base.data.corpus)
    eval_data = dataclasses.replace(data, seed=EVAL_SEED)
    start = time.perf_counter()
    figures: list[RunFigures] = []
    report = progress or (lambda *a: None)
    report("starting", 0, len(plan))
    tasks = [(run, data, eval_data, eval_batches, threads) for run in plan]
    if jobs == 1:
        for run, task in zip(plan, tasks):
            figures.append(_train_one(*task))
            report(f"{run.name}: val {figures[-1].val_loss:.3f}", len(figures), len(plan))
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            for run, result in zip(plan, pool.map(_worker, tasks)):
                figures.append(result)
                report(f"{run.name}: val {result.val_loss:.3f}", len(figures), len(plan))
    variants = list(dict.fromkeys(run.variant for run in plan))
    ablation = Ablation(command=command, match=match, base=base.to_dict(), corpus=base.data.corpus,
                        variants=variants, seeds=sorted({run.seed for run in plan}), threads_per_run=threads,
                        jobs=jobs, eval_batches=eval_batches, runs=figures,
                        wall_seconds=time.perf_counter() - start)
    write_report(ablation, out_dir)
    return ablation


def check_run_options(jobs: int, eval_batches: int) -> None:
    if jobs < 1:
        raise InputError(f"--jobs must be ≥ 1, got {jobs}")
    if eval_batches < 1:
        raise InputError(f"--eval-batches must be ≥ 1, got {eval_batches}")


def check_report_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse a folder holding something else, or an old report without --overwrite; changes nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; --out must be a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "ablation.json").is_file():
            raise InputError(f"{out_dir} is not empty and holds no ablation report; choose another --out")
        if not overwrite:
            raise InputError(f"{out_dir} holds an ablation report: add --overwrite to replace it, or choose "
                             f"another --out")


def prepare_report_dir(out_dir: Path, *, overwrite: bool) -> None:
    """:func:`check_report_dir`, then clear the old report (its files and runs/) when --overwrite allows."""
    check_report_dir(out_dir, overwrite=overwrite)
    if out_dir.exists():
        for name in REPORT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "runs", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Comparison:
    """Variant minus softmax, paired by seed."""

    mean: float
    std: float | None  # None with one seed
    t: float | None
    verdict: str  # "worse", "better" or "indistinguishable"


def compare(ablation: Ablation, variant: str) -> Comparison:
    """Paired differences of val loss against softmax; 'worse'/'better' only when every seed agrees in sign and
    the paired t statistic passes the two-sided 95% level (with one seed: never)."""
    baseline = {r.seed: r.val_loss for r in ablation.of(BASELINE)}
    differences = [r.val_loss - baseline[r.seed] for r in ablation.of(variant)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return Comparison(mean, None, None, "indistinguishable")
    std = statistics.stdev(differences)
    t = math.inf if std == 0 else mean / (std / math.sqrt(len(differences)))
    same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    significant = same_sign and abs(t) > T_95.get(len(differences) - 1, 2.0)
    return Comparison(mean, std, t, ("worse" if mean > 0 else "better") if significant else "indistinguishable")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _pm(mean: float, std: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def results_table(ablation: Ablation) -> list[dict[str, str]]:
    """The report's rows, one per variant, as display strings (the Markdown table and the CLI print these)."""
    rows = []
    for variant in ablation.variants:
        runs = ablation.of(variant)
        loss, loss_std = _mean_std([r.val_loss for r in runs])
        ppl, ppl_std = _mean_std([math.exp(r.val_loss) for r in runs])
        wall, wall_std = _mean_std([r.wall_seconds for r in runs])
        if variant == BASELINE:
            delta = "—"
        else:
            c = compare(ablation, variant)
            delta = f"{c.mean:+.3f}" + ("" if c.std is None else f" ± {c.std:.3f}") + (
                "" if c.t is None else f" (t = {c.t:+.1f})")
        rows.append({"variant": variant, "val loss": _pm(loss, loss_std), "perplexity": _pm(ppl, ppl_std, 2),
                     "Δ val loss vs softmax": delta, "params": f"{runs[0].params:,}", "d_ff": str(runs[0].d_ff),
                     "steps": f"{runs[0].steps:,}", "training TFLOP": f"{runs[0].flops / 1e12:.2f}",
                     "wall s / run": _pm(wall, wall_std, 0)})
    return rows


def summary(ablation: Ablation) -> list[str]:
    """Sentences stating what the table shows and how sure it is, worked out from the numbers."""
    n = len(ablation.seeds)
    base_loss, base_std = _mean_std([r.val_loss for r in ablation.of(BASELINE)])
    lines = [f"Softmax attention reaches a held-out loss of {_pm(base_loss, base_std)} nats/token "
             f"(mean ± std over {n} seed{'s' if n > 1 else ''})."]
    by_verdict: dict[str, list[str]] = {"worse": [], "better": [], "indistinguishable": []}
    for variant in ablation.variants:
        if variant != BASELINE:
            c = compare(ablation, variant)
            by_verdict[c.verdict].append(f"{variant} ({c.mean:+.3f})")
    if by_verdict["worse"]:
        lines.append("Worse than softmax beyond seed noise: " + ", ".join(by_verdict["worse"]) + ".")
    if by_verdict["better"]:
        lines.append("Better than softmax beyond seed noise: " + ", ".join(by_verdict["better"]) + ".")
    if by_verdict["indistinguishable"]:
        lines.append(f"Not distinguishable from softmax with {n} seed{'s' if n > 1 else ''}: "
                     + ", ".join(by_verdict["indistinguishable"]) + ".")
    if n > 1:
        lines.append(f"How sure: differences are paired by seed (same initialisation seed and the same batches in "
                     f"the same order); a variant is called worse or better only when all {n} seeds agree in sign "
                     f"and the paired t statistic exceeds {T_95.get(n - 1, 2.0):.2f} (two-sided 95%, {n - 1} degrees "
                     f"of freedom). The spread between seeds of softmax itself is {base_std:.3f}: smaller "
                     f"differences are not findings.")
    else:
        lines.append("One seed: there are no error bars, and no difference here is a finding; use --seeds 3 or more.")
    base_run = ablation.of(BASELINE)[0]
    if ablation.match == "params":
        unequal = [f"{v} {ablation.of(v)[0].flops / base_run.flops - 1:+.1%}" for v in ablation.variants
                   if abs(ablation.of(v)[0].flops / base_run.flops - 1) > 0.01]
        if unequal:
            lines.append("Equal parameters are not equal compute: training FLOPs against softmax: " + ", ".join(unequal)
                         + " (--match flops evens that out).")
    else:
        unequal = [f"{v} {ablation.of(v)[0].params / base_run.params - 1:+.1%}" for v in ablation.variants
                   if ablation.of(v)[0].params != base_run.params]
        if unequal:
            lines.append("Equal FLOPs are not equal parameters: parameters against softmax: " + ", ".join(unequal)
                         + " (--match params evens that out).")
    budget = ("equal parameters (the MLP width d_ff absorbs what a variant adds or removes; equal steps)"
              if ablation.match == "params" else
              "equal training FLOPs (each variant's natural size; steps scaled by its FLOPs per token)")
    lines.append(f"Budget: {budget}. The loss is the mean cross-entropy on the same {ablation.eval_batches} "
                 f"held-out batches for every run; short runs of small models, so these rank the variants at this "
                 f"scale and budget, not in general.")
    return lines


def markdown_report(ablation: Ablation) -> str:
    base = ablation.base
    m, d, t = base["model"], base["data"], base["train"]
    rows = results_table(ablation)
    header = list(rows[0])
    lines = [f"# Attention ablation: {', '.join(ablation.variants)}", "",
             f"`{ablation.command}`", "",
             f"Base model: {m.get('family', 'gpt2')}-style, {m.get('n_layers', 4)} layers × "
             f"{m.get('n_heads', 4)} heads, d_model {m.get('d_model', 128)}, context {d['context']}; corpus "
             f"{d['corpus']} ({d['tokenizer']} tokens); batch {t['batch_size'] * t['grad_accum']}, lr {t['lr']:g}; "
             f"seeds {', '.join(map(str, ablation.seeds))}; {ablation.jobs} run(s) at a time on "
             f"{ablation.threads_per_run} thread(s) each; {ablation.wall_seconds / 60:.1f} min in all.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row[c] for c in header) + " |" for row in rows]
    lines += ["", "## What the numbers show", ""] + [f"- {line}" for line in summary(ablation)]
    lines += ["", "Wall times vary from run to run; every other number is reproduced by running the command again "
              "(same machine, same thread count).", "", "![training loss](loss.png)", ""]
    return "\n".join(lines)


def write_report(ablation: Ablation, out_dir: Path) -> None:
    """results.md, results.csv, ablation.json and loss.png, each written whole (temp file + rename)."""
    from attnlab.inspect.plots import new_figure, save_figure

    atomic_write_text(out_dir / "ablation.json", json.dumps(ablation.to_json(), indent=1))
    columns = ["variant", "seed", "params", "d_ff", "steps", "flops", "val_loss", "train_loss", "wall_seconds",
               "tokens_per_second"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for r in ablation.runs:
        writer.writerow([getattr(r, c) if not isinstance(getattr(r, c), float) else f"{getattr(r, c):.6g}"
                         for c in columns])
    atomic_write_text(out_dir / "results.csv", buffer.getvalue())
    atomic_write_text(out_dir / "results.md", markdown_report(ablation))

    figure = new_figure(8, 4.5)
    axes = figure.add_subplot()
    for variant in ablation.variants:
        curves = [r.curve for r in ablation.of(variant)]
        length = min(len(c) for c in curves)
        steps = [p[0] for p in curves[0][:length]]
        losses = torch.tensor([[p[1] for p in c[:length]] for c in curves])  # (seeds, points)
        line, = axes.plot(steps, losses.mean(0).tolist(), linewidth=1.3, label=variant)
        axes.fill_between(steps, losses.min(0).values.tolist(), losses.max(0).values.tolist(), alpha=0.15,
                          color=line.get_color(), linewidth=0)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (nats/token)")
    axes.set_title(f"attention variants, matched by {'parameters' if ablation.match == 'params' else 'FLOPs'}: "
                   f"mean over {len(ablation.seeds)} seeds (band: min–max)")
    axes.grid(alpha=0.3)
    axes.legend()
    low = min(min(p[1] for p in r.curve) for r in ablation.runs)
    axes.set_ylim(low - 0.1, low + 1.6)
    save_figure(figure, out_dir / "loss.png")


def default_jobs() -> int:
    """Two runs side by side on a 2-core machine, each on one thread: small models leave a second thread
    mostly idle, so this finishes an ablation sooner than one run on two threads."""
    return max(1, min(2, os.cpu_count() or 1))

"""The training loop: AdamW with warm-up + cosine decay, evaluation, checkpoints, resume, DDP.

A run lives in one folder (``train.out_dir``):

    run.json          the run's config (written first: a folder holding another run is refused)
    metrics.jsonl     one JSON line per log interval and per evaluation
    loss.png          train/val loss curves (redrawn at every checkpoint)
    checkpoint/       an attnlab checkpoint (``attnlab.load`` works on it and on the run folder)
                      plus training.safetensors (optimizer moments, RNG state) and training.json
                      (step, config, optimizer settings); written as a whole under a temporary name
                      and renamed, so a kill at any moment leaves the previous checkpoint intact.

Nothing in a checkpoint is code: tensors are safetensors, everything else JSON.

Exact resume: the data of step s depends only on (seed, s) (``data.py``), the model and the optimizer
moments are saved bit for bit, and the learning rate is a function of the step, so a run killed and
resumed computes the same steps as one that never stopped.

Several processes (``torchrun --nproc_per_node N``): each takes rows rank, rank + N, … of every
micro-batch, DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU), and only
rank 0 evaluates and writes. The global batch is the same as in one process, so the result is too.
"""

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from attnlab.errors import AttnlabError, InputError
from attnlab.model import Transformer
from attnlab.paths import atomic_write_text
from attnlab.train.config import RunConfig, TrainLoopConfig, config_differences
from attnlab.train.data import TokenData
from attnlab.weights.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint"
TRAINING_TENSORS = "training.safetensors"
TRAINING_STATE = "training.json"


class TrainingError(AttnlabError):
    """The run cannot go on (loss became NaN/inf); the message says what is kept and what to try."""


def learning_rate(step: int, t: TrainLoopConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (t.lr - t.min_lr)


def initialize_weights(model: Transformer) -> None:
    """GPT-2's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit norms, and the
    matrices that write into the residual stream (W_O, the MLP's output) scaled by 1/√(2·layers) so the
    stream's variance does not grow with depth (Radford et al., 2019). A merged W_QK (d×d per head) starts
    with std 0.02²·√d_k, which gives x W_QK xᵀ the variance q·k has when W_Q and W_K are N(0, 0.02²)."""
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2:
            torch.nn.init.zeros_(parameter) if name.endswith("bias") else torch.nn.init.ones_(parameter)
        elif name.endswith(("w_o.weight", "w_out.weight", "w_down.weight")):
            torch.nn.init.normal_(parameter, 0.0, residual_std)
        elif name.endswith(".w_qk"):
            torch.nn.init.normal_(parameter, 0.0, 0.02 ** 2 * math.sqrt(model.config.head_dim))
        else:
            torch.nn.init.normal_(parameter, 0.0, 0.02)


@torch.inference_mode()
def mean_loss(model: Transformer, data: TokenData, split: str, batches: int, batch_size: int,
              autocast: AbstractContextManager | None = None) -> float:
    """Mean cross-entropy of ``model`` over the first ``batches`` evaluation batches of ``split``
    (the same windows every time for the same data seed)."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for index in range(batches):
        inputs, targets = data.eval_batch(split, index, batch_size)
        with autocast or nullcontext():
            logits = model(inputs.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten()).item())
    return sum(losses) / len(losses)


def make_optimizer(model: torch.nn.Module, t: TrainLoopConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (decaying norms and biases only hurts)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
        return cls(rank, world_size, device)

    def close(self) -> None:
        """Leave the group together: a rank that exits while rank 0 still evaluates or writes would break
        the group under it."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@dataclass
class RunResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    seconds: float
    tokens_per_second: float
    interrupted: bool = False
    out_dir: Path | None = None


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the end of the current step (and save); a second one
    interrupts at once. A half-done optimizer step is never saved."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def check_out_dir(out_dir: Path, config: RunConfig, *, resume: bool, overwrite: bool) -> dict | None:
    """Check the output folder, changing nothing; return the checkpoint's training state when resuming.

    A folder holding another run is never touched without --resume or --overwrite: a typo must not
    destroy a day's training.
    """
    run_file = out_dir / RUN_FILE
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if resume:
        if not is_checkpoint(out_dir / CHECKPOINT):
            raise InputError(f"{out_dir}: no checkpoint to resume (expected {out_dir / CHECKPOINT}); "
                             f"start the run without --resume")
        state = json.loads((out_dir / CHECKPOINT / TRAINING_STATE).read_text())
        differing = config_differences(state["config"], config.to_dict())
        if differing:
            raise InputError(f"{out_dir}: the checkpoint was trained with another config; differing keys: "
                             f"{', '.join(differing)} (use the same config, or --overwrite to start again)")
        return state
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            what = "holds a run" if run_file.exists() else "is not empty"
            raise InputError(f"{out_dir} {what}: add --resume to continue it or --overwrite to start again "
                             f"(or set train.out_dir)")
        if not run_file.exists():
            raise InputError(f"{out_dir} is not an attnlab run folder; --overwrite only replaces runs, "
                             f"choose another train.out_dir")
    return None


def prepare_out_dir(out_dir: Path, config: RunConfig, *, resume: bool, overwrite: bool) -> dict | None:
    """:func:`check_out_dir`, then clear the old run when --overwrite asked for it."""
    state = check_out_dir(out_dir, config, resume=resume, overwrite=overwrite)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    return state


def train(config: RunConfig, data: TokenData, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> RunResult:
    """Train (or continue training) the run ``config`` describes; returns the final figures."""
    distributed = Distributed.from_environment()
    try:
        return _Trainer(config, data, distributed, resume=resume, overwrite=overwrite, progress=progress).run()
    finally:
        distributed.close()


class _Trainer:
    def __init__(self, config: RunConfig, data: TokenData, distributed: Distributed, *, resume: bool,
                 overwrite: bool, progress: bool) -> None:
        t = config.train
        self.config, self.data, self.dist, self.t = config, data, distributed, t
        if t.batch_size % distributed.world_size:
            raise InputError(f"train.batch_size {t.batch_size} must be divisible by the number of processes "
                             f"({distributed.world_size}): each takes an equal share of every batch")
        self.out_dir = Path(t.out_dir)
        state = None
        if distributed.is_main:
            state = prepare_out_dir(self.out_dir, config, resume=resume, overwrite=overwrite)
        if distributed.world_size > 1:  # every rank learns rank 0's verdict before building anything
            shared = [state]
            torch.distributed.broadcast_object_list(shared, src=0)
            state = shared[0]
        self.model_config = config.model_config(data.tokenizer.vocab_size)
        torch.manual_seed(t.seed)
        self.model = Transformer(self.model_config).to(distributed.device)
        initialize_weights(self.model)
        self.optimizer = make_optimizer(self.model, t)
        self.step = 0
        self.metrics: list[dict] = []
        if state is not None:
            self._restore(state)
        self.wrapped = self.model
        if distributed.world_size > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model)
        self.rows = slice(distributed.rank, None, distributed.world_size)
        self.progress = progress and distributed.is_main
        self.autocast = (torch.autocast(distributed.device.type, dtype=torch.bfloat16) if t.dtype == "bf16"
                         else nullcontext())
        if distributed.is_main and state is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / RUN_FILE, json.dumps(config.to_dict(), indent=2))

    # ----------------------------------------------------------------------------------------- the loop

    def run(self) -> RunResult:
        t = self.t
        stop = StopRequest()
        tokens_per_step = t.batch_size * t.grad_accum * self.data.context
        start_step, start_time = self.step, time.perf_counter()
        last = {"train": None, "val": None}
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        with stop.installed(), self._progress_bar(start_step) as advance:
            while self.step < t.max_steps:
                loss = self._train_step()
                self.step += 1
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    eval_start = time.perf_counter()
                    last = self._evaluate()
                    window_start += time.perf_counter() - eval_start  # tokens/s counts training time only
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * tokens_per_step / elapsed
                    self._log({"step": self.step, "loss": window_loss / window_steps,
                               "lr": learning_rate(self.step - 1, t), "tokens_per_s": round(rate, 1)})
                    advance(self.step, window_loss / window_steps, rate, last["val"])
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                if self.step % t.checkpoint_interval == 0 or self.step == t.max_steps:
                    self._save()
                if stop.requested:
                    self._save()
                    break
        seconds = time.perf_counter() - start_time
        return RunResult(self.step, last["train"], last["val"], seconds,
                         (self.step - start_step) * tokens_per_step / max(seconds, 1e-9), stop.requested,
                         self.out_dir)

    def _train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; the mean loss. NaN/inf stops the run."""
        t = self.t
        lr = learning_rate(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for micro in range(t.grad_accum):
            inputs, targets = self.data.batch("train", self.step, micro, t.batch_size, self.rows)
            inputs, targets = inputs.to(self.dist.device), targets.to(self.dist.device)
            last_micro = micro == t.grad_accum - 1
            sync = nullcontext() if last_micro or self.dist.world_size == 1 else self.wrapped.no_sync()
            with sync, self.autocast:
                logits = self.wrapped(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            (loss / t.grad_accum).backward()
            total += loss.item()
        mean = total / t.grad_accum
        if not math.isfinite(mean):
            kept = f"the last good checkpoint is {self.out_dir / CHECKPOINT}" if is_checkpoint(
                self.out_dir / CHECKPOINT) else "no checkpoint was written yet"
            raise TrainingError(f"loss became {mean} at step {self.step + 1}; stopped, {kept}; "
                                f"try a lower train.lr, train.grad_clip > 0 or train.dtype = \"fp32\"")
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    def _evaluate(self) -> dict[str, float | None]:
        """Mean loss over the same eval_batches batches of each split (rank 0 only; others skip)."""
        if not self.dist.is_main:
            return {"train": None, "val": None}
        result = {split: mean_loss(self.model, self.data, split, self.t.eval_batches, self.t.batch_size,
                                   self.autocast) for split in ("train", "val")}
        self._log({"step": self.step, "train_loss": round(result["train"], 5), "val_loss": round(result["val"], 5)})
        return result

    # ---------------------------------------------------------------------------------- saving, restoring

    def _log(self, entry: dict) -> None:
        if not self.dist.is_main:
            return
        self.metrics.append(entry)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def _save(self) -> None:
        """Checkpoint folder, written whole and renamed into place; then the loss curve. Rank 0 only."""
        if not self.dist.is_main:
            return
        optimizer_state = self.optimizer.state_dict()
        tensors = {"rng.torch": torch.get_rng_state()}
        for index, moments in optimizer_state["state"].items():
            for name, value in moments.items():
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()

        def write_training_state(folder: Path) -> None:
            save_file(tensors, str(folder / TRAINING_TENSORS))
            (folder / TRAINING_STATE).write_text(json.dumps({
                "step": self.step, "config": self.config.to_dict(),
                "param_groups": optimizer_state["param_groups"], "metrics_lines": len(self.metrics)}, indent=2))

        save_checkpoint(self.out_dir / CHECKPOINT, self.model_config, self.model.state_dict(), self.data.tokenizer,
                        extra={"source": f"attnlab train, step {self.step}"}, write_extra=write_training_state)
        self._plot_losses()

    def _restore(self, state: dict) -> None:
        folder = self.out_dir / CHECKPOINT
        _, model_state, _ = load_checkpoint(folder)
        self.model.load_state_dict(model_state)
        tensors = load_file(str(folder / TRAINING_TENSORS))
        optimizer_state = {"param_groups": state["param_groups"], "state": {}}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(tensors["rng.torch"])
        self.step = state["step"]
        if self.dist.is_main:  # lines a killed run wrote after its last checkpoint are dropped
            lines = (self.out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            self.metrics = [json.loads(line) for line in lines[:state["metrics_lines"]]]
            atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))

    def _plot_losses(self) -> None:
        from attnlab.inspect.plots import new_figure, save_figure

        steps = [(m["step"], m["loss"]) for m in self.metrics if "loss" in m]
        evals = [(m["step"], m["train_loss"], m["val_loss"]) for m in self.metrics if "val_loss" in m]
        figure = new_figure(7, 4)
        axes = figure.add_subplot()
        if steps:
            axes.plot(*zip(*steps), color="#bbbbbb", linewidth=1, label="train (batch mean per log interval)")
        if evals:
            x, train_loss, val_loss = zip(*evals)
            axes.plot(x, train_loss, "o-", color="#1f77b4", label="train (eval batches)")
            axes.plot(x, val_loss, "o-", color="#d62728", label="val (eval batches)")
        axes.set_xlabel("step")
        axes.set_ylabel("cross-entropy loss (nats/token)")
        axes.set_title(f"{self.out_dir.name}: loss")
        axes.grid(alpha=0.3)
        axes.legend()
        save_figure(figure, self.out_dir / "loss.png")

    @contextmanager
    def _progress_bar(self, start_step: int):
        """A rich progress bar with loss, tokens/s and ETA on rank 0; yields an ``advance`` function."""
        if not self.progress:
            yield lambda *args: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeRemainingColumn()]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("train", total=self.t.max_steps, completed=start_step, status="")

            def advance(step: int, loss: float, rate: float, val: float | None) -> None:
                status = f"loss {loss:.3f}" + (f" · val {val:.3f}" if val is not None else "") + f" · {rate:,.0f} tok/s"
                bar.update(task, completed=step, status=status)

            yield advance

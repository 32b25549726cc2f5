"""attnlab train: configs and presets, data, exact resume after SIGKILL, Ctrl-C, NaN, DDP, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_clean_error, cli, run

import attnlab
from attnlab.errors import InputError
from attnlab.train.config import config_differences, load_run_config, parse_override
from attnlab.train.data import TokenData
from attnlab.train.trainer import TrainingError, learning_rate, train

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 300


def write_run_toml(folder: Path, model: dict, train: dict, name: str = "run.toml") -> Path:
    """A run config over TEXT (written beside it as corpus.txt), char tokens, context 32."""
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT)
    lines = ["[model]"] + [f"{key} = {json.dumps(value)}" for key, value in model.items()]
    lines += ["", "[data]", f"corpus = {json.dumps(str(corpus))}", 'tokenizer = "char"', "context = 32", "", "[train]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in train.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(folder: Path, out_dir: Path, **train_overrides) -> Path:
    """A small char-level run on TEXT: fast enough for tests, big enough to learn something."""
    train_table = {"batch_size": 8, "max_steps": 40, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                   "eval_interval": 20, "eval_batches": 2, "checkpoint_interval": 20, "log_interval": 5,
                   "seed": 7, "out_dir": str(out_dir)} | train_overrides
    model = {"family": "llama", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 64}
    return write_run_toml(folder, model, train_table)


def final_parameters(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "checkpoint" / "model.safetensors"))


def eval_lines(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "val_loss" in line]


# ------------------------------------------------------------------------------------------ config, data


def test_presets_and_overrides():
    config = load_run_config(preset="shakespeare-char", overrides=["train.lr=3e-4", "train.out_dir=runs/x"])
    assert config.train.lr == 3e-4 and config.train.out_dir == "runs/x" and config.data.context == 64
    model = config.model_config(84)
    assert (model.n_layers, model.n_heads, model.d_model, model.d_ff, model.positions) == (4, 4, 128, 512, "learned")
    modern = load_run_config(preset="shakespeare-char-modern").model_config(84)
    assert (modern.norm, modern.mlp, modern.positions) == ("rmsnorm", "glu", "rope")
    assert parse_override("train.batch_size=4") == ("train", "batch_size", 4)
    assert config_differences({"train": {"lr": 1.0, "seed": 1}}, {"train": {"lr": 2.0, "seed": 1}}) == ["train.lr"]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"preset": "tiny"}, "unknown preset 'tiny'; presets: shakespeare-char, shakespeare-char-modern"),
    ({"preset": "shakespeare-char", "overrides": ["train.learning_rate=1"]}, "unknown key; valid keys: model."),
    ({"preset": "shakespeare-char", "overrides": ["train.lr=-1"]}, "train.lr must be > 0, got -1.0"),
    ({"preset": "shakespeare-char", "overrides": ["train.batch_size=0"]}, "train.batch_size must be ≥ 1, got 0"),
    ({"preset": "shakespeare-char", "overrides": ["train.batch_size=1.5"]}, "train.batch_size must be int"),
    ({"preset": "shakespeare-char", "overrides": ["model.heads=3"]}, "unknown key; valid keys"),
    ({"preset": "shakespeare-char", "overrides": ["model.n_heads=3"]}, "[model]:"),
    ({"preset": "shakespeare-char", "overrides": ["lr=1"]}, "expected TABLE.KEY=VALUE"),
    ({}, "give a config file or --preset NAME"),
])
def test_bad_configs_are_refused_with_the_valid_choices(kwargs, fragment):
    with pytest.raises(InputError, match=None) as error:
        load_run_config(**kwargs).model_config(84)
    assert fragment in str(error.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_run_config(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("[train\nlr = 1")
    with pytest.raises(InputError, match="invalid TOML"):
        load_run_config(str(tmp_path / "bad.toml"))
    (tmp_path / "extra.toml").write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(InputError, match="unknown table \\[optimizer\\]; valid tables: \\[model\\], \\[data\\]"):
        load_run_config(str(tmp_path / "extra.toml"))


def test_learning_rate_warms_up_then_decays_to_min():
    config = load_run_config(preset="shakespeare-char").train
    assert learning_rate(0, config) == pytest.approx(1e-5)
    assert learning_rate(99, config) == pytest.approx(1e-3)
    assert learning_rate(1999, config) == pytest.approx(1e-4, rel=1e-3)
    assert learning_rate(1050, config) == pytest.approx(5.5e-4, rel=1e-3)  # half way down the cosine


def test_batches_depend_only_on_seed_step_and_micro_step(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    data = TokenData.prepare(TEXT, "char", 32, 0.1, 7, "text")
    again = TokenData.prepare(TEXT, "char", 32, 0.1, 7, "text")  # from the token cache this time
    assert isinstance(again.train, np.memmap) and len(data.train) + len(data.val) == len(TEXT)
    x, y = data.batch("train", 5, 0, 8)
    assert torch.equal(x, again.batch("train", 5, 0, 8)[0]) and torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, data.batch("train", 6, 0, 8)[0])
    halves = [data.batch("train", 5, 0, 8, slice(rank, None, 2))[0] for rank in (0, 1)]
    assert torch.equal(torch.stack(halves, 1).flatten(0, 1), x)  # two processes share one batch exactly
    with pytest.raises(InputError, match="shorter than one context window"):
        TokenData.prepare("a short corpus", "char", 32, 0.1, 7, "tiny.txt")


# ------------------------------------------------------------------------------------------ runs


def test_train_writes_a_run_that_every_command_can_use(tmp_path):
    out = tmp_path / "run"
    result = run("train", str(write_config(tmp_path, out)))
    assert result.returncode == 0, result.stderr
    assert "done: step 40" in result.stderr and "val loss" in result.stderr
    assert {"run.json", "metrics.jsonl", "loss.png", "checkpoint"} <= {p.name for p in out.iterdir()}
    losses = eval_lines(out)
    assert [line["step"] for line in losses] == [20, 40] and losses[1]["val_loss"] < losses[0]["val_loss"] < 3.5
    lm = attnlab.load(out)  # the run folder loads like any model
    assert lm.config.n_layers == 2 and lm.tokenizer.decode(lm.tokenizer.encode("Speak")) == "Speak"
    sample = run("sample", str(out), "-n", "20", "--num-samples", "1", "--seed", "1", "--prompt", "All")
    assert sample.returncode == 0 and sample.stdout.startswith("All"), sample.stderr
    explained = run("explain", "--model", str(out), "Speak, speak.", "--token", "0", "--json")
    assert explained.returncode == 0, explained.stderr
    assert len(json.loads(explained.stdout)["attention"]["probs"]) == 2
    evaluated = run("eval", "--model", str(out), "--text", str(tmp_path / "corpus.txt"), "--max-tokens", "200",
                    "--json")
    assert evaluated.returncode == 0, evaluated.stderr


def test_existing_runs_are_protected_and_resume_checks_the_config(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, max_steps=10, checkpoint_interval=10, eval_interval=10)
    assert run("train", str(config)).returncode == 0
    assert_clean_error(cli("train", str(config)), "holds a run: add --resume to continue it or --overwrite")
    assert_clean_error(cli("train", str(config), "--resume", "--set", "train.lr=0.01"),
                       "trained with another config; differing keys: train.lr")
    assert_clean_error(cli("train", str(config), "--resume", "--overwrite"), "exclude each other")
    fresh = tmp_path / "fresh"
    assert_clean_error(cli("train", str(config), "--resume", "--set", f"train.out_dir={json.dumps(str(fresh))}"),
                       "no checkpoint to resume")
    assert run("train", str(config), "--overwrite").returncode == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert_clean_error(cli("train", str(config), "--overwrite", "--set",
                           f"train.out_dir={json.dumps(str(tmp_path / 'notes'))}"), "not an attnlab run folder")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("corpus, fragment", [
    ("missing.txt", "no such file or folder, and not a named corpus"),
    ("empty.txt", "is empty"),
    ("small.txt", "shorter than one context window"),
])
def test_bad_corpora_are_refused(tmp_path, corpus, fragment):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "small.txt").write_text("just a few characters of text")
    config = write_config(tmp_path, tmp_path / "run")
    text = config.read_text().replace(json.dumps(str(tmp_path / "corpus.txt")), json.dumps(str(tmp_path / corpus)))
    config.write_text(text)
    assert_clean_error(cli("train", str(config)), fragment)
    assert not (tmp_path / "run").exists()


def _start_training(config: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen([sys.executable, "-m", "attnlab.cli", "train", str(config), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "training.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_a_run_killed_with_sigkill_and_resumed_ends_exactly_like_one_that_never_stopped(tmp_path):
    settings = dict(max_steps=160, checkpoint_interval=20, eval_interval=40, log_interval=1)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run("train", str(write_config(tmp_path, straight, **settings))).returncode == 0

    config = write_config(tmp_path, killed, **settings)
    process = _start_training(config)
    while _checkpoint_step(killed) < 40 and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = _checkpoint_step(killed)
    assert 40 <= stopped_at < 160
    resumed = run("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    assert eval_lines(killed) == eval_lines(straight)
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 161))  # no step twice, none missing
    a, b = final_parameters(straight), final_parameters(killed)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, max_steps=100000, checkpoint_interval=100000, eval_interval=100000)
    process = _start_training(config)
    while not (out / "metrics.jsonl").exists() and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Resume with: attnlab train" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert 0 < _checkpoint_step(out) < 100000


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    config = load_run_config(str(write_config(tmp_path, tmp_path / "run", max_steps=30, checkpoint_interval=5)))
    data = TokenData.prepare(TEXT, "char", 32, 0.1, 7, "text")
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *args, **kwargs):  # after 12 good steps the weights turn to NaN
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 12:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(TrainingError, match="loss became nan at step 13; stopped, the last good checkpoint is"):
        train(config, data, progress=False)
    assert _checkpoint_step(tmp_path / "run") == 10


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this python")
def test_two_processes_and_one_give_the_same_parameters(tmp_path):
    settings = dict(max_steps=6, checkpoint_interval=6, eval_interval=6, log_interval=1, batch_size=8, grad_accum=2)
    single, double = tmp_path / "single", tmp_path / "double"
    assert run("train", str(write_config(tmp_path, single, **settings))).returncode == 0
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "attnlab.cli", "train",
                             str(write_config(tmp_path, double, **settings)), "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("done: step 6") == 1  # only rank 0 reports (and writes)
    a, b = final_parameters(single), final_parameters(double)
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5


def test_the_example_config_is_the_preset_written_out():
    example = Path(__file__).resolve().parents[1] / "examples" / "shakespeare-char.toml"
    written, preset = load_run_config(str(example)), load_run_config(preset="shakespeare-char")
    assert config_differences(written.to_dict(), preset.to_dict()) == []


def test_bf16_autocast_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    config = load_run_config(str(write_config(tmp_path, tmp_path / "run", max_steps=10, dtype="bf16",
                                              eval_interval=10, checkpoint_interval=10)))
    result = train(config, TokenData.prepare(TEXT, "char", 32, 0.1, 7, "text"), progress=False)
    assert result.step == 10 and 0 < result.val_loss < 4.5
    assert attnlab.load(tmp_path / "run").model.token_embedding.weight.dtype == torch.float32  # weights stay fp32

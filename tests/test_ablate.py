"""attnlab ablate: budgets matched as stated, reproducible reports, honest verdicts, bad input."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_clean_error, cli, run
from test_train import TEXT, write_run_toml
from torch.utils.flop_counter import FlopCounterMode

import attnlab
from attnlab.errors import InputError
from attnlab.model import Transformer
from attnlab.train.config import load_run_config
from attnlab.train.experiments import (
    Ablation,
    RunFigures,
    compare,
    forward_flops_per_token,
    plan_ablation,
    run_ablation,
    summary,
    training_flops,
)

VARIANTS = ["softmax", "no-q", "no-k", "no-v", "merged-qk", "merged-qk:4", "linear", "kernel", "sigmoid",
            "sliding-window:8"]


def write_base(folder: Path, **train) -> Path:
    """A tiny GPT-2-style char run on TEXT (learned positions, so every variant fits)."""
    table = {"batch_size": 8, "max_steps": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_batches": 1,
             "log_interval": 4, "seed": 7} | train
    model = {"family": "gpt2", "n_layers": 2, "n_heads": 4, "d_model": 32, "qkv_bias": False}
    return write_run_toml(folder, model, table, "base.toml")


@pytest.fixture()
def base(tmp_path):
    return load_run_config(str(write_base(tmp_path)))


def test_matched_parameters_move_the_mlp_width_and_keep_the_steps(base, tmp_path):
    plan = plan_ablation(base, VARIANTS, 1, "params", 40, tmp_path)
    target = plan[0].params
    d_ff = {planned.variant: planned.model.d_ff for planned in plan}
    for planned in plan:
        built = sum(p.numel() for p in Transformer(planned.model).parameters())
        assert built == planned.params
        assert abs(planned.params - target) <= 2 * planned.model.d_model * planned.model.n_layers, planned.variant
        assert planned.config.train.max_steps == 16
    assert d_ff["no-q"] > d_ff["softmax"] == d_ff["linear:elu"] > d_ff["merged-qk:full"]
    assert [planned.variant for planned in plan][:2] == ["softmax", "no-q"]


def test_matched_flops_scale_the_steps_and_keep_the_width(base, tmp_path):
    plan = plan_ablation(base, VARIANTS, 2, "flops", 40, tmp_path)
    target = plan[0].flops
    tokens_per_step = 8 * 32
    for planned in plan:
        assert planned.model.d_ff == plan[0].model.d_ff
        one_step = training_flops(planned.model, 1, tokens_per_step)
        assert abs(planned.flops - target) <= one_step / 2 + 1, planned.variant
    steps = {planned.variant: planned.config.train.max_steps for planned in plan}
    assert steps["no-q"] > steps["softmax"] > steps["merged-qk:full"]
    assert [planned.seed for planned in plan[:2]] == [7, 8]


def test_flop_count_of_the_projections_agrees_with_torch_s_counter(base):
    """The matrices' share of the formula: the difference between two variants that mix alike equals what
    torch's FLOP counter measures for their forward passes (MLP widths equal here)."""
    measured = {}
    for spec in ("softmax", "no-q", "no-v", "merged-qk:4"):
        config = dataclasses.replace(base.model_config(40), attention=spec)
        model = Transformer(config)
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 32, dtype=torch.long))
        measured[spec] = counter.get_total_flops() / 32, forward_flops_per_token(config)
    for spec in ("no-q", "no-v"):
        assert measured["softmax"][0] - measured[spec][0] == pytest.approx(measured["softmax"][1] - measured[spec][1])
    # merged-qk:4 swaps 2·(q, k: 2·H·hd·d) for 2·(2·H·d·r) and key width hd for r in the scores
    assert measured["merged-qk:4"][1] < measured["softmax"][1]


def test_impossible_budgets_and_bad_plans_say_why(base, tmp_path):
    narrow = load_run_config(str(write_base(tmp_path)), overrides=["model.d_ff=8"])
    with pytest.raises(InputError, match="impossible budget: merged-qk:full has .* more parameters per layer"):
        plan_ablation(narrow, ["merged-qk"], 1, "params", 40, tmp_path)
    warm = load_run_config(str(write_base(tmp_path)), overrides=["train.warmup_steps=15"])
    with pytest.raises(InputError, match="impossible budget: merged-qk:full .* gets 1[0-5] steps"):
        plan_ablation(warm, ["merged-qk"], 1, "flops", 40, tmp_path)
    with pytest.raises(InputError, match="unknown attention variant 'softmx'; valid: softmax"):
        plan_ablation(base, ["softmx"], 1, "params", 40, tmp_path)
    with pytest.raises(InputError, match="names a variant twice"):
        plan_ablation(base, ["linear", "linear:elu"], 1, "params", 40, tmp_path)
    rope = load_run_config(str(write_base(tmp_path)), overrides=['model.positions="rope"'])
    with pytest.raises(InputError, match="variant merged-qk:full does not fit the base model: .*RoPE rotates"):
        plan_ablation(rope, ["merged-qk"], 1, "params", 40, tmp_path)


def test_an_ablation_reproduces_its_table_and_its_runs_are_models(base, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    results = []
    for name in ("a", "b"):
        plan = plan_ablation(base, ["softmax", "no-v", "linear"], 2, "params", 40, tmp_path / name)
        results.append(run_ablation(base, plan, TEXT, tmp_path / name, command="test", match="params",
                                    eval_batches=3))
    first, second = ([(r.variant, r.seed, r.val_loss, r.train_loss, r.curve) for r in a.runs] for a in results)
    assert first == second
    assert len({r[2] for r in first}) == 6  # six different runs, not one number six times
    report = (tmp_path / "a" / "results.md").read_text()
    assert "| no-v |" in report and "## What the numbers show" in report
    written = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"results.md", "results.csv", "ablation.json", "loss.png", "runs"} <= written
    saved = Ablation.from_json(json.loads((tmp_path / "a" / "ablation.json").read_text()))
    assert saved.runs == results[0].runs
    lm = attnlab.load(tmp_path / "a" / "runs" / "linear-elu-seed8")
    assert lm.config.attention == "linear:elu" and lm.generate("Speak", max_new_tokens=5) is not None


def _figures(variant: str, losses: list[float]) -> list[RunFigures]:
    return [RunFigures(variant, seed, 1, 1, 1, 1.0, loss, loss, 1.0, 1.0, [(1, loss)])
            for seed, loss in enumerate(losses)]


def _ablation(runs: list[RunFigures]) -> Ablation:
    variants = list(dict.fromkeys(r.variant for r in runs))
    seeds = sorted({r.seed for r in runs})
    return Ablation("test", "params", {}, "text", variants, seeds, 1, 1, 1, runs, 1.0)


def test_verdicts_need_every_seed_to_agree_and_a_significant_paired_t():
    base = _figures("softmax", [2.00, 2.10, 1.95])
    clear = _ablation(base + _figures("no-q", [2.05, 2.16, 2.00]) + _figures("no-v", [1.90, 2.20, 1.94]))
    assert compare(clear, "no-q").verdict == "worse" and compare(clear, "no-q").mean == pytest.approx(0.0533, abs=1e-4)
    assert compare(clear, "no-v").verdict == "indistinguishable"  # signs disagree between seeds
    text = " ".join(summary(clear))
    assert "Worse than softmax beyond seed noise: no-q (+0.053)" in text and "no-v" in text and "4.30" in text
    one_seed = _ablation(_figures("softmax", [2.0]) + _figures("kernel", [1.5]))
    assert compare(one_seed, "kernel").verdict == "indistinguishable"
    assert "One seed: there are no error bars" in " ".join(summary(one_seed))


def test_cli_plans_runs_and_refuses_bad_input(tmp_path, monkeypatch):
    config = write_base(tmp_path, max_steps=8)
    planned = run("ablate", str(config), "--variants", "no-q,merged-qk", "--seeds", "2", "--plan")
    assert planned.returncode == 0, planned.stderr
    assert "ablation plan: 6 runs, matched by params" in planned.stderr and "merged-qk:full" in planned.stderr
    out = tmp_path / "report"
    done = run("ablate", str(config), "--variants", "no-v", "--seeds", "1", "--out", str(out), "--jobs", "2",
               "--eval-batches", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "One seed" in done.stdout and (out / "loss.png").stat().st_size > 1000
    explained = run("explain", "--model", str(out / "runs" / "no-v-seed7"), "Speak, speak.", "--token", "3")
    assert explained.returncode == 0, explained.stderr
    assert_clean_error(cli("ablate", str(config), "--variants", "no-v", "--out", str(out)),
                       "holds an ablation report: add --overwrite")
    assert_clean_error(cli("ablate", str(config), "--variants", "flash", "--plan"), "unknown attention variant 'flash'")
    assert_clean_error(cli("ablate", str(config), "--set", 'model.positions="rope"', "--variants", "merged-qk",
                           "--plan"), "RoPE rotates q and k")
    assert_clean_error(cli("ablate", str(config), "--set", "model.d_ff=4", "--variants", "merged-qk", "--plan"),
                       "impossible budget")
    assert_clean_error(cli("ablate", str(config), "--eval-batches", "0", "--plan"), "--eval-batches must be ≥ 1")
    assert_clean_error(cli("ablate", str(config), "--jobs", "0"), "--jobs must be ≥ 1")
    assert_clean_error(cli("ablate", str(config), "--seeds", "0", "--plan"), "--seeds must be ≥ 1")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert_clean_error(cli("ablate", str(config), "--out", str(tmp_path / "other")), "holds no ablation report")

"""attnlab bench: options, rates, agreement, targets and tables (unit), bad input (one line, exit 2), and one
end-to-end run on a tiny Hugging Face model against transformers."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_clean_error, cli, run
from tiny_models import tiny_hf_model

from attnlab.bench import report
from attnlab.bench import run as bench_run
from attnlab.bench.run import (
    LLAMA_CPP_HINT,
    BenchOptions,
    agreement,
    agreements,
    check_numbers,
    medians,
    parse_batch_sizes,
    parse_modes,
    parse_peers,
    peer_skip_reason,
    plan_bench,
    rates,
    write_json_atomically,
)
from attnlab.bench.worker import PARAGRAPH, SHORT_PROMPT, TokenClock, long_prompt_ids
from attnlab.errors import InputError

MODES = ("fp32", "bf16", "int8", "int4")


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory) -> Path:
    """A tiny random Llama in a Hugging Face folder, with a byte-level BPE tokenizer.json beside it."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("bench") / "tiny-llama"
    tiny_hf_model("llama", folder, vocab_size=300)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([PARAGRAPH, SHORT_PROMPT], vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# --------------------------------------------------------------------------------------------- options


def test_parse_modes_all_subset_in_attnlab_order_and_unknown():
    assert parse_modes("all", MODES) == list(MODES)
    assert parse_modes("int4, FP32", MODES) == ["fp32", "int4"]  # attnlab's order, not the user's
    with pytest.raises(InputError, match="unknown mode 'fp16'.*fp32, bf16, int8, int4"):
        parse_modes("fp32,fp16", MODES)
    with pytest.raises(InputError, match="empty"):
        parse_modes(" , ", MODES)


def test_parse_peers_none_all_aliases_and_unknown():
    assert parse_peers("none") == []
    assert parse_peers("all") == ["transformers", "llama.cpp"]
    assert parse_peers("llama-cpp,transformers") == ["transformers", "llama.cpp"]
    with pytest.raises(InputError, match="unknown peer 'vllm'"):
        parse_peers("transformers,vllm")


def test_parse_batch_sizes_sorted_unique_or_none():
    assert parse_batch_sizes("8, 1,4,4") == [1, 4, 8]
    assert parse_batch_sizes("none") == parse_batch_sizes("None") == []
    for bad in ("", "1,-2", "2.5"):
        with pytest.raises(InputError, match="--batch-sizes"):
            parse_batch_sizes(bad)


@pytest.mark.parametrize("field, value, fragment", [
    ("repeats", 0, "--repeats must be ≥ 1"), ("prompt_tokens", 0, "--prompt-tokens must be ≥ 1"),
    ("threads", 0, "--threads must be ≥ 1"), ("new_tokens", 1, "--new-tokens must be ≥ 2"),
])
def test_check_numbers_refuses_non_positive(field, value, fragment):
    with pytest.raises(InputError, match=fragment):
        check_numbers(BenchOptions(**{field: value}))


def test_plan_marks_modes_the_machine_cannot_run(monkeypatch, tiny_hf_folder):
    from attnlab import fast

    plan = plan_bench(BenchOptions(model=str(tiny_hf_folder), peers="none"))
    assert plan.modes == list(MODES) and plan.model_kind == "hf" and plan.unavailable == {}
    monkeypatch.setattr(fast, "_cpu_has_bf16", lambda: False)
    plan = plan_bench(BenchOptions(model=str(tiny_hf_folder), peers="none"))
    assert set(plan.unavailable) == {"bf16"} and "no bf16" in plan.unavailable["bf16"]

def test_peer_skip_reasons(monkeypatch):
    assert "attnlab checkpoint" in peer_skip_reason("transformers", "checkpoint")
    real_find_spec = bench_run.importlib.util.find_spec
    monkeypatch.setattr(bench_run.importlib.util, "find_spec",
                        lambda name: None if name == "llama_cpp" else real_find_spec(name))
    assert peer_skip_reason("llama.cpp", "gguf") == LLAMA_CPP_HINT
    assert peer_skip_reason("llama.cpp", "hf") == "llama.cpp reads GGUF files only"  # installed or not
    monkeypatch.setattr(bench_run.importlib.util, "find_spec", lambda name: object())
    assert peer_skip_reason("llama.cpp", "hf") == "llama.cpp reads GGUF files only"
    assert peer_skip_reason("llama.cpp", "gguf") is None


# --------------------------------------------------------------------------------------------- measuring


def test_long_prompt_is_exactly_n_tokens():
    ids = long_prompt_ids(lambda text: list(text.encode()), 1000)
    assert len(ids) == 1000 and bytes(ids[:20]) == PARAGRAPH.encode()[:20]


def test_token_clock_times_first_and_last_token():
    clock = TokenClock()
    for token in (5, 6, 7):
        clock.tick(token)
    tokens, first_s, last_s = clock.result()
    assert tokens == [5, 6, 7] and 0 <= first_s <= last_s


def test_rates_prefill_from_first_token_decode_between_first_and_last():
    timings = {"long": {"first_s": 0.5, "last_s": 2.5}, "short": {"first_s": 0.1, "last_s": 1.1}}
    result = rates(timings, prompt_tokens=512, new_tokens=11)
    assert result["prefill_tok_s"] == pytest.approx(1024)
    assert result["decode_long_tok_s"] == pytest.approx(5)  # 10 tokens after the first in 2 s
    assert result["decode_short_tok_s"] == pytest.approx(10)
    assert result["long_first_s"] == 0.5  # the raw timings are kept beside the rates
    runs = [{"prefill_tok_s": v, "decode_short_tok_s": v, "decode_long_tok_s": v} for v in (3.0, 1.0, 100.0)]
    assert medians(runs) == {"prefill_tok_s": 3.0, "decode_short_tok_s": 3.0, "decode_long_tok_s": 3.0}


def test_agreement_counts_positions_and_common_prefix():
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"matched": 3, "steps": 4, "fraction": 0.75, "prefix": 2}
    assert agreement([1, 2], [1, 2])["prefix"] == 2
    both = agreements({"short": [1, 2, 3, 4], "long": [7, 7, 7, 7]}, {"short": [1, 2, 3, 4], "long": [7, 0, 7, 7]})
    assert both["fraction"] == pytest.approx(7 / 8) and both["long"]["prefix"] == 1 and both["short"]["prefix"] == 4


def test_write_json_atomically_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out" / "bench.json"
    write_json_atomically(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomically(target, {"a": object()})  # fails half-way through json.dump
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in target.parent.iterdir()] == ["bench.json"]


# --------------------------------------------------------------------------------------------- targets and tables


def system(kind, mode, *, default=False, decode=10.0, prefill=100.0, rss=500.0, ttft=2.0, agree=None, forced=None):
    return {"system": kind, "mode": mode, "default": default, "load_s": 1.0, "ttft_s": ttft, "prefill_tok_s": prefill,
            "decode_short_tok_s": decode, "decode_long_tok_s": decode * 0.9, "peak_rss_mb": rss, "agreement": agree,
            "teacher_forced": forced, "version": "1"}


def fake_results(peers=("transformers", "llama.cpp")):
    agree = agreements({"short": [1] * 100 + [2] * 28, "long": [1] * 128}, {"short": [1] * 128, "long": [1] * 128})
    forced = agreements({"short": [1] * 127 + [2], "long": [1] * 128}, {"short": [1] * 128, "long": [1] * 128})
    systems = {"attnlab fp32": system("attnlab", "fp32", decode=20.0, prefill=700.0, rss=900.0, ttft=2.5),
               "attnlab int4": system("attnlab", "int4", default=True, decode=130.0, prefill=700.0, rss=400.0,
                                      ttft=2.9, agree=agree, forced=forced)}
    if "transformers" in peers:
        systems["transformers"] = system("transformers", "fp32", decode=25.0, prefill=650.0, rss=1300.0, ttft=20.0,
                                         agree=agreements({"short": [1] * 128, "long": [1] * 128},
                                                          {"short": [1] * 128, "long": [1] * 128}))
        systems["transformers"]["attn_implementation"] = "sdpa"
    if "llama.cpp" in peers:
        systems["llama.cpp"] = system("llama.cpp", "Q4_1", decode=80.0, prefill=300.0, rss=200.0, ttft=1.0)
    results = {"settings": {"model": "m", "threads": 2, "new_tokens": 128, "repeats": 3, "prompt_tokens": 512},
               "prompt_lengths": {"short": 37, "long": 512}, "systems": systems, "reference": "attnlab fp32",
               "default_mode": "int4", "agreement_method": "free-running", "teacher_forced_method": "teacher-forced",
               "unavailable": {"attnlab int8": "no AVX"},
               "skipped": {} if "llama.cpp" in peers else {"llama.cpp": LLAMA_CPP_HINT}, "notes": [],
               "short_prompt_chat": True, "batch": None,
               "machine": {"cpu": "cpu", "cpus": 2, "threads": 2, "torch": "2", "python": "3", "other_cpus": 0.0,
                           "versions": {"transformers": "5"}}}
    results["targets"] = report.evaluate_targets(results)
    return results


def target_values(results, name):
    return next(row["values"] for row in results["targets"] if row["name"] == name)


def test_targets_pass_and_fail_per_mode():
    results = fake_results()
    decode = target_values(results, "decode_short_vs_llama")
    assert decode["attnlab int4"]["value"] == pytest.approx(130 / 80) and decode["attnlab int4"]["passed"]
    assert decode["attnlab fp32"]["passed"] is False
    assert target_values(results, "decode_short_vs_transformers")["attnlab int4"]["passed"]  # 5.2× ≥ 4×
    assert target_values(results, "rss_vs_llama")["attnlab int4"]["passed"]  # 2× ≤ 3×
    assert target_values(results, "rss_vs_transformers")["attnlab int4"]["passed"]  # 0.31× ≤ 0.5×
    assert target_values(results, "prefill_vs_llama")["attnlab int4"]["passed"]  # 2.33× ≥ 2×
    agree = target_values(results, "agreement")
    assert agree["attnlab int4"]["value"] == pytest.approx(255 / 256) and agree["attnlab int4"]["passed"]
    assert agree["attnlab fp32"] == {"value": 1.0, "passed": True, "why": "is the reference"}
    assert target_values(results, "ttft")["attnlab int4"]["passed"]  # 2.9 s ≤ 3 s


def test_targets_against_a_missing_peer_are_not_judged():
    results = fake_results(peers=("transformers",))
    value = target_values(results, "decode_short_vs_llama")["attnlab int4"]
    assert value == {"value": None, "passed": None, "why": "llama.cpp not in this run"}


def render_text(results) -> str:
    from rich.console import Console

    out = io.StringIO()
    report.render(results, Console(file=out, width=220, color_system=None))
    return out.getvalue()


def test_render_shows_systems_ratios_targets_and_notes():
    text = render_text(fake_results())
    for fragment in ("attnlab int4 (default)", "transformers fp32 (sdpa)", "llama.cpp Q4_1", "100/128, prefix 100",
                     "attnlab / llama.cpp Q4_1", "1.62× ✓", "attnlab int8: not available: no AVX", "PASS",
                     "greedy agreement = fp32 (table): free-running", "greedy agreement (target): teacher-forced"):
        assert fragment in text, fragment
    assert "decode @ 37 (≥ 1.5×)" in text and "decode @ 512 (≥ 1.5×)" in text


def test_render_says_when_llama_cpp_was_skipped():
    text = render_text(fake_results(peers=("transformers",)))
    assert f"llama.cpp: skipped ({LLAMA_CPP_HINT})" in text
    assert "n/a (llama.cpp not in this run)" in text


def test_render_prints_batch_rows_when_present():
    results = fake_results()
    results["batch"] = [{"system": "attnlab int4", "batch size": 8, "sequences": 8, "tokens/s": 512.25}]
    assert "batch throughput" in render_text(results) and "512.2" in render_text(results)


# --------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("args, fragment", [
    (("--modes", "fp16"), "unknown mode 'fp16'"),
    (("--peers", "vllm"), "unknown peer 'vllm'"),
    (("--model", "/no/such/model"), "/no/such/model: no such file or folder"),
    (("--repeats", "0"), "--repeats must be ≥ 1"),
    (("--prompt-tokens", "0"), "--prompt-tokens must be ≥ 1"),
    (("--new-tokens", "1"), "--new-tokens must be ≥ 2"),
    (("--threads", "0"), "--threads must be ≥ 1"),
    (("--batch-sizes", "1,four"), "--batch-sizes '1,four': expected a comma list of positive integers"),
    (("--batch-sizes", "0"), "--batch-sizes '0': expected a comma list of positive integers"),
])
def test_bench_bad_input_is_one_line(args, fragment, tmp_path):
    result = cli("bench", *args, "--json", str(tmp_path / "out.json"))
    assert_clean_error(result, fragment)
    assert not (tmp_path / "out.json").exists()


def test_bench_json_to_a_folder_is_one_line(tmp_path):
    assert_clean_error(cli("bench", "--json", str(tmp_path)), "is a folder")


def test_bench_end_to_end_against_transformers(tiny_hf_folder, tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--model", str(tiny_hf_folder), "--modes", "fp32", "--peers", "transformers,llama.cpp",
                 "--repeats", "1", "--prompt-tokens", "16", "--new-tokens", "4", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "timed round 1/1" in result.stderr
    assert "attnlab fp32 (default)" in result.stdout and "transformers fp32" in result.stdout
    assert "llama.cpp: skipped (llama.cpp reads GGUF files only)" in result.stdout
    data = json.loads(out.read_text())
    assert list(data["systems"]) == ["attnlab fp32", "transformers"] and data["default_mode"] == "fp32"
    ours, theirs = data["systems"]["attnlab fp32"], data["systems"]["transformers"]
    assert len(ours["tokens"]["short"]) == 4 and len(ours["tokens"]["long"]) == 4
    assert data["prompt_lengths"]["long"] == 16
    assert theirs["agreement"]["matched"] == theirs["agreement"]["steps"] == 8  # the oracle: same greedy tokens
    for label in ("attnlab fp32", "transformers"):
        result_of = data["systems"][label]
        assert result_of["ttft_s"] > result_of["load_s"] > 0 and result_of["peak_rss_mb"] > 100
        assert result_of["prefill_tok_s"] > 0 and result_of["decode_short_tok_s"] > 0
    assert {row["name"] for row in data["targets"]} == {target.name for target in report.TARGETS}
    # throughput against batch size, default mode, through the product's loop (the same tokens at every size)
    assert [row["batch size"] for row in data["batch"]] == [1, 4, 8]
    assert all(row["system"] == "attnlab fp32" and row["= batch 1 (sequences)"] == "8 / 8" and row["tokens/s"] > 0
               for row in data["batch"])
    assert "batch throughput, attnlab fp32: 8 prompts" in result.stdout


def test_bench_generate_script_is_a_thin_wrapper():
    """bench/generate.py forwards to attnlab bench (bad input shows it without any work)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    result = subprocess.run([sys.executable, str(script), "--modes", "fp16"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "unknown mode 'fp16'" in result.stderr and "Traceback" not in result.stderr


def test_bench_times_the_cached_start_after_a_first_start_that_converted(tmp_path):
    """A GGUF's first load converts it (and caches the conversion): the bench starts that system again, shows the
    cached start and keeps the first beside it."""
    import os

    from gguf_writer import write_llama_gguf

    gguf_path = write_llama_gguf(tiny_hf_model("llama", tmp_path / "hf", vocab_size=257), tmp_path / "tiny.gguf")
    out = tmp_path / "bench.json"
    env = os.environ | {"ATTNLAB_CACHE": str(tmp_path / "cache"), "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "attnlab.cli", "bench", "--model", str(gguf_path), "--modes",
                             "fp32", "--peers", "none", "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "2",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    ours = json.loads(out.read_text())["systems"]["attnlab fp32"]
    assert ours["first_start"]["load_s"] > 0 and ours["built_on_load"] is False
    assert "first start built and cached an artefact" in result.stdout
    # the batch prompts do not fit this model's 64-token context: a note, not a failed run
    assert "batch throughput: not measured (prompt 4 of 4 is 66 tokens" in " ".join(result.stdout.split())


def test_bench_against_llama_cpp_on_the_real_model(smollm2_path, tmp_path):
    """The llama.cpp worker on SmolLM2's GGUF (skipped where llama-cpp-python is not installed)."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    result = run("bench", "--modes", "fp32", "--peers", "llama.cpp", "--repeats", "1", "--prompt-tokens", "16",
                 "--new-tokens", "4", "--json", str(out))
    assert result.returncode == 0, result.stderr
    peer = json.loads(out.read_text())["systems"]["llama.cpp"]
    assert peer["mode"] == "Q4_1" and len(peer["tokens"]["short"]) == 4 and peer["peak_rss_mb"] > 0
    assert peer["agreement"]["steps"] == 8
    assert "attnlab / llama.cpp Q4_1" in result.stdout

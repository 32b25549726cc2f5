"""attnlab swap: another kernel in a trained model's layers, from the same weights."""

import json
import math

import pytest
import torch
from test_cli import assert_clean_error, cli, run

from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.lm import LanguageModel
from attnlab.model import Transformer
from attnlab.swap import layers_label, parse_layers, swap_attention
from attnlab.tokenizer import CharTokenizer
from attnlab.weights.checkpoint import save_checkpoint

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
TEXT = "the cat sat on the mat. the dog sat on the log."


def _tiny_lm(**overrides) -> LanguageModel:
    """Two-layer llama-style char model with grouped-query attention and randomised norms, so every weight counts."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text(ALPHABET)
    fields = dict(family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=4, d_ff=32, context_length=64)
    model = Transformer(ModelConfig(**(fields | overrides)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return LanguageModel(model.eval(), tokenizer, "tiny")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return _tiny_lm()


def _ids(lm: LanguageModel, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(text)])


def _captured(lm: LanguageModel, ids: torch.Tensor, layer: int) -> Capture:
    capture = Capture(points=("q", "k", "probs"), layers=[layer])
    with torch.no_grad():
        lm.model(ids, capture=capture)
    return capture


def test_swapping_to_softmax_gives_identical_logits(lm):
    ids = _ids(lm)
    assert torch.equal(swap_attention(lm, "softmax").logits(ids), lm.logits(ids))


def test_weights_are_shared_not_copied(lm):
    swapped = swap_attention(lm, "kernel", [1])
    for (name, ours), theirs in zip(swapped.model.named_parameters(), lm.model.parameters(), strict=True):
        assert ours.data_ptr() == theirs.data_ptr(), name
    assert type(lm.model.blocks[1].attention).__name__ == "MultiHeadAttention"  # the original is untouched


def test_kernel_in_layer_1_follows_the_gaussian_kernel_and_layer_0_is_unchanged(lm):
    ids = _ids(lm)
    swapped = swap_attention(lm, "kernel", [1])
    layer1 = _captured(swapped, ids, 1)
    q, k = layer1.get("q", 1)[0], layer1.get("k", 1)[0].repeat_interleave(2, dim=0)  # (H, T, hd), GQA: 2 per kv
    T = ids.shape[1]
    expected = torch.zeros(4, T, T)
    for h in range(4):
        for i in range(T):  # w_ij = exp(−‖q_i − k_j‖²/(2√d_k)) / Σ_(l≤i) exp(−‖q_i − k_l‖²/(2√d_k))
            kernel = torch.exp(-((q[h, i] - k[h, :i + 1]) ** 2).sum(-1) / (2 * math.sqrt(4)))
            expected[h, i, :i + 1] = kernel / kernel.sum()
    assert torch.allclose(layer1.get("probs", 1)[0], expected, atol=1e-5)
    original_probs = _captured(lm, ids, 1).get("probs", 1)[0]
    assert (original_probs - expected).abs().max() > 1e-2  # the swap changed something
    assert torch.equal(_captured(swapped, ids, 0).get("probs", 0), _captured(lm, ids, 0).get("probs", 0))


def test_sliding_window_zeroes_weights_beyond_the_window(lm):
    swapped = swap_attention(lm, "sliding-window:2")
    probs = swapped.attention(TEXT).probs  # (L, H, T, T)
    distance = torch.arange(probs.shape[-1])[:, None] - torch.arange(probs.shape[-1])[None, :]
    assert float(probs[..., (distance >= 2) | (distance < 0)].abs().max()) == 0.0
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert float(lm.attention(TEXT).probs[..., distance >= 2].max()) > 0.05  # the original looks further back


def test_sigmoid_swap_is_inspectable_and_its_rows_need_not_sum_to_one(lm):
    probs = swap_attention(lm, "sigmoid", [0]).attention(TEXT).probs
    assert (probs[0].sum(-1) - 1).abs().max() > 0.1
    assert torch.allclose(probs[1].sum(-1), torch.ones(probs.shape[1:-1]), atol=1e-5)  # layer 1 is still softmax


@pytest.mark.parametrize("spec", ["kernel", "sigmoid", "linear:elu", "sliding-window:3"])
def test_a_swapped_model_generates_with_its_kv_cache_as_without(lm, spec):
    swapped = swap_attention(lm, spec, [1])
    ids = lm.tokenizer.encode("the cat")
    text = swapped.generate("the cat", max_new_tokens=8)
    for _ in range(8):  # greedy decoding by full forward passes, no cache
        ids.append(int(swapped.logits(torch.tensor([ids]))[0, -1].argmax()))
    assert text == lm.tokenizer.decode(ids[7:])


def test_a_window_swap_refuses_local_layers_that_keep_another_window():
    gemma_like = _tiny_lm(sliding_window=4, layer_types=["local", "global"])
    with pytest.raises(InputError, match="already has sliding-window layers .0. with window 4"):
        swap_attention(gemma_like, "sliding-window:2", [1])
    swapped = swap_attention(gemma_like, "sliding-window:2")  # every local layer gets the one new window
    assert swapped.model.local_window == 2 and [m for _, m in swapped.model.layer_kinds] == ["local", "local"]
    assert gemma_like.model.local_window == 4


@pytest.mark.parametrize("spec, fragment", [("no-q", "re-parameterises W_Q/W_K/W_V"),
                                            ("merged-qk:4", "cannot be swapped"),
                                            ("cosine", "unknown attention variant 'cosine'; valid: softmax")])
def test_projection_and_unknown_variants_are_refused(lm, spec, fragment):
    with pytest.raises(InputError, match=fragment):
        swap_attention(lm, spec)


def test_linear_attention_refuses_a_soft_capped_model():
    with pytest.raises(InputError, match="no logits to soft-cap"):
        swap_attention(_tiny_lm(attn_logit_softcap=20.0), "linear")


@pytest.mark.parametrize("text, expected", [("all", None), ("3", [3]), ("0-2", [0, 1, 2]), ("5,1,2-3,1", [1, 2, 3, 5])])
def test_parse_layers(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize("text, fragment", [("x", "'x' is neither"), ("3-1", "runs backwards"), ("1,", "'' is neither"),
                                            ("0-30", "layer 30 does not exist")])
def test_parse_layers_refuses(text, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_layers(text, 30)


def test_layers_label():
    assert [layers_label(layers, 8) for layers in ([0, 1, 2, 3, 4, 5, 6, 7], [3], [0, 1, 2, 5, 7])] == \
        ["all", "3", "0-2,5,7"]


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory, lm):
    folder = tmp_path_factory.mktemp("swap")
    text = folder / "held-out.txt"
    text.write_text(TEXT * 8, encoding="utf-8")
    return save_checkpoint(folder / "tiny", lm.config, lm.model.state_dict(), lm.tokenizer), text


def test_cli_swap_json_end_to_end(tiny_saved):
    checkpoint, text = tiny_saved
    result = run("swap", "--model", str(checkpoint), "--to", "softmax", "--to", "kernel", "--to", "sliding-window:2",
                 "--layers", "1", "--eval-text", str(text), "--max-tokens", "200", "--context", "32", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["original"]["tokens"] == 200 and data["original"]["context"] == 32
    assert [s["to"] for s in data["swaps"]] == ["softmax", "kernel", "sliding-window:2"]
    softmax, kernel, window = data["swaps"]
    assert softmax["perplexity"] == data["original"]["perplexity"] and softmax["change_percent"] == 0.0
    assert kernel["layers"] == [1] and abs(kernel["change_percent"]) > 0.1 and window["change_percent"] != 0.0
    assert "perplexity with kernel in layers 1" in result.stderr  # one progress line per evaluation


def test_cli_swap_table(tiny_saved):
    checkpoint, text = tiny_saved
    result = run("swap", "--model", str(checkpoint), "--to", "sigmoid", "--eval-text", str(text), "--max-tokens", "64",
                 "--context", "32")
    assert result.returncode == 0, result.stderr
    assert "original (softmax)" in result.stdout and "sigmoid" in result.stdout and "bits per byte" in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (("--to", "no-v"), "no-v cannot be swapped into a trained model"),
    (("--to", "bogus"), "unknown attention variant 'bogus'"),
    (("--to", "kernel", "--layers", "1-x"), "'1-x' is neither"),
    (("--to", "kernel", "--layers", "2"), "layer 2 does not exist: the model has 2 layers"),
    (("--to", "kernel", "--corpus", "nope"), "unknown corpus 'nope'"),
])
def test_cli_swap_bad_input_is_one_line(tiny_saved, args, fragment):
    checkpoint, _ = tiny_saved
    assert_clean_error(cli("swap", "--model", str(checkpoint), *args), fragment)

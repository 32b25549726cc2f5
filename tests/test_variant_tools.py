"""Models with another attention variant work with explain (--math writes out the variant's own formula), heads,
generate and info, as subprocesses on saved checkpoints."""

import json
import string

import pytest
import torch
from test_cli import run

from attnlab.config import ModelConfig
from attnlab.inspect.explain import head_arithmetic
from attnlab.lm import LanguageModel
from attnlab.model import Transformer
from attnlab.swap import swap_attention
from attnlab.tokenizer import CharTokenizer
from attnlab.weights.checkpoint import save_checkpoint

ALPHABET = string.ascii_letters + string.digits + " ."  # ≥ 32 ordinary tokens: heads' induction sequences
TEXT = "the cat sat on the mat."
QUERY = 12  # 'n' of "on": sees 13 keys, or fewer in a window


def _variant_lm(attention: str, **overrides) -> LanguageModel:
    """A tiny char model of ``attention`` with every parameter randomised (so each one shows in the numbers).

    GPT-2 style (learned positions, biases) unless overridden: merged-qk needs absolute positions, and without
    RoPE the projections no-q/no-k/merged-qk can be checked against the captured q and k themselves."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text(ALPHABET)
    fields = dict(family="gpt2", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=4, n_kv_heads=4,
                  head_dim=4, d_ff=32, context_length=80, norm="layernorm", mlp="gelu", activation="gelu",
                  positions="learned", qkv_bias=True, out_bias=True, attention=attention)
    model = Transformer(ModelConfig(**(fields | overrides)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.4)
    return LanguageModel(model.eval(), tokenizer, attention)


SPECS = ["no-q", "no-k", "no-v", "merged-qk", "merged-qk:3", "kernel", "sigmoid", "linear:elu", "linear:relu",
         "sliding-window:3"]


@pytest.mark.parametrize("spec", SPECS)
def test_head_arithmetic_of_each_variant_reproduces_the_model(spec):
    lm = _variant_lm(spec)
    ids = lm.tokenizer.encode(TEXT)
    arithmetic = head_arithmetic(lm, ids, layer=1, head=2, query=QUERY)
    expected_keys = list(range(QUERY - 2, QUERY + 1)) if spec == "sliding-window:3" else list(range(QUERY + 1))
    assert arithmetic.key_tokens == expected_keys  # from the mask, also where no masked scores are recorded
    assert max(arithmetic.check.values()) < 1e-4, arithmetic.check
    assert torch.allclose(arithmetic.weights, lm.attention(ids).probs[1, 2, QUERY, expected_keys], atol=1e-5)
    projection_checks = {"no-q": "q = x slice", "no-k": "k_j = x_j slice", "no-v": "v_j = x_j slice",
                         "merged-qk": "k_j = x_j", "merged-qk:3": "k_j = x_j·R"}
    if spec in projection_checks:  # the changed projection itself is recomputed from x
        assert projection_checks[spec] in arithmetic.check
    # the module's own variant; a window is a mask, reported as ``window``
    assert arithmetic.variant == {"merged-qk": "merged-qk:full", "sliding-window:3": "softmax"}.get(spec, spec)
    assert arithmetic.window == (3 if spec == "sliding-window:3" else None)


def test_head_arithmetic_follows_a_swapped_layer_not_the_config():
    lm = _variant_lm("softmax", positions="rope", qkv_bias=False, n_kv_heads=2, family="llama", norm="rmsnorm",
                     mlp="glu", activation="silu")
    swapped = swap_attention(lm, "kernel", [1])
    ids = lm.tokenizer.encode(TEXT)
    assert head_arithmetic(swapped, ids, 0, 1, QUERY).variant == "softmax"
    kernel = head_arithmetic(swapped, ids, 1, 1, QUERY)
    assert kernel.variant == "kernel" and "−‖q−k_j‖²/2" in kernel.check and max(kernel.check.values()) < 1e-4
    window = head_arithmetic(swap_attention(lm, "sliding-window:4"), ids, 1, 1, QUERY)
    assert window.window == 4 and window.key_tokens == [9, 10, 11, 12]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("variants")
    saved = {}
    for spec in ("kernel", "sigmoid", "linear:elu", "merged-qk:3", "no-v", "sliding-window:4"):
        lm = _variant_lm(spec)
        saved[spec] = str(save_checkpoint(folder / spec.replace(":", "-"), lm.config, lm.model.state_dict(),
                                          lm.tokenizer))
    return saved


@pytest.mark.parametrize("spec, formula", [
    ("kernel", "Gaussian kernel: score_j = −‖q − k_j‖²/2"),
    ("sigmoid", "w_j = σ(q·k_j / √d_k − log n), n = 80"),
    ("linear:elu", "w_j = φ(q)·φ(k_j) / Σ_l φ(q)·φ(k_l), φ(t) = elu(t) + 1"),
    ("merged-qk:3", "q = x·L[head 1] (merged-qk rank 3: W_QK = L·Rᵀ)"),
    ("no-v", "v_j = x_j[4:8] (no-v"),
    ("sliding-window:4", "only the 4 most recent keys"),
])
def test_cli_explain_math_names_the_variant_formula_and_checks_it(checkpoints, spec, formula):
    result = run("explain", "--model", checkpoints[spec], TEXT, "--token", str(QUERY), "--math", "--layer", "1",
                 "--head", "1")
    assert result.returncode == 0, result.stderr
    assert formula in result.stdout, result.stdout
    check = [line for line in result.stdout.splitlines() if line.startswith("check:")][0]
    assert float(check.rsplit("= ", 1)[1].rstrip(")")) < 1e-4, check


def test_cli_heads_generate_and_info_on_variant_models(checkpoints):
    heads = run("heads", "--model", checkpoints["linear:elu"], "--text", TEXT * 3, "--json")
    assert heads.returncode == 0, heads.stderr
    assert len(json.loads(heads.stdout)["scores"]) == 2  # layers
    generated = run("generate", "--model", checkpoints["sigmoid"], "the ", "-n", "6", "--json")
    assert generated.returncode == 0, generated.stderr
    assert len(json.loads(generated.stdout)["text"]) == 6  # char model: six tokens, six characters
    info = run("info", checkpoints["sliding-window:4"])
    assert info.returncode == 0, info.stderr
    assert "attention variant" in info.stdout and "sliding-window:4" in info.stdout
    assert "2 sliding-window (w=4)" in info.stdout  # every layer is local
    data = json.loads(run("info", checkpoints["merged-qk:3"], "--json").stdout)
    assert data["attention"] == "merged-qk:3"

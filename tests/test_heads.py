"""Head roles: the scores match their definitions on hand-made patterns and forced models; SmolLM2's roles."""

import json
import math

import pytest
import torch

import attnlab
from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.inspect.heads import (
    FIRST_QUERY,
    assign_role,
    induction_scores,
    pattern_scores,
    repeated_random_sequences,
    score_heads,
)
from attnlab.lm import LanguageModel
from attnlab.model import Transformer
from attnlab.tokenizer import CharTokenizer

LETTERS = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .")
TEXT = "the quick brown fox jumps over the lazy dog. a small bird sang in the old tree."


def _one_hot_rows(n: int, key_of_query) -> torch.Tensor:
    """(n, n) probabilities: query i puts all its weight on key_of_query(i)."""
    rows = torch.zeros(n, n)
    for i in range(n):
        rows[i, key_of_query(i)] = 1.0
    return rows


def test_pattern_scores_follow_the_definitions_on_made_patterns():
    n = 60
    local = torch.zeros(n, n)
    for i in range(n):
        band = [j for j in range(i - 8, i - 1) if j >= 0] or [0]
        local[i, band] = 1.0 / len(band)
    uniform = torch.ones(n, n).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    heads = [_one_hot_rows(n, lambda i: max(i - 1, 0)), _one_hot_rows(n, lambda i: i),
             _one_hot_rows(n, lambda i: 0), local, uniform]
    scores = pattern_scores(torch.stack(heads)[None], causal=True)  # one layer, five heads
    one_key = _mean_inverse(n)
    local_breadth = sum(math.log(7) / math.log(i + 1) for i in range(FIRST_QUERY, n)) / (n - FIRST_QUERY)
    expected = {  # per head: previous, current, first, local, uniform
        "previous": [1, 0, 0, 0, one_key],
        "current": [0, 1, 0, 0, one_key],
        "first": [0, 0, 1, 0, one_key],
        "local": [0, 0, 0, 1, 7 * one_key],
        "broad": [0, 0, 0, local_breadth, 1],
    }
    assert list(scores) == ["previous", "current", "first", "local", "broad"]  # no "next" in a decoder
    for role, values in expected.items():
        assert scores[role][0].tolist() == pytest.approx(values, abs=1e-6), role
    roles = [assign_role({role: float(value[0, head]) for role, value in scores.items()} | {"induction": 0.0})
             for head in range(5)]
    assert roles == ["previous", "current", "first", "local", "broad"]


def _mean_inverse(n: int) -> float:
    """Mean over the scored queries of 1 / (i + 1): any single key's weight under uniform causal attention."""
    return sum(1 / (i + 1) for i in range(FIRST_QUERY, n)) / (n - FIRST_QUERY)


def test_encoders_score_the_next_token_and_both_sides_of_the_band():
    n = 50
    probs = torch.stack([_one_hot_rows(n, lambda i: min(i + 1, n - 1)), _one_hot_rows(n, lambda i: min(i + 5, n - 1))])
    scores = pattern_scores(probs[None], causal=False)
    assert scores["next"][0, 0] == 1 and scores["local"][0, 1] == 1 and scores["previous"].sum() == 0
    with pytest.raises(InputError, match="the text is 47 tokens; head scores need at least 48"):
        pattern_scores(torch.ones(1, 1, 47, 47) / 47, causal=False)


def test_induction_score_reads_the_token_after_the_previous_copy():
    half, offset = 5, 1
    n = offset + 2 * half
    induction = _one_hot_rows(n, lambda i: i - half + 1 if i >= offset + half else 0)
    previous = _one_hot_rows(n, lambda i: max(i - 1, 0))
    scores = induction_scores(torch.stack([induction, previous])[None], half, offset)
    assert scores.tolist() == [[1.0, 0.0]]


def test_role_order_induction_first_then_strongest_position_then_broad_then_mixed():
    base = {"previous": 0.1, "current": 0.1, "first": 0.1, "local": 0.1, "induction": 0.0, "broad": 0.2}
    assert assign_role(base | {"first": 0.95, "induction": 0.3}) == "induction"  # dormant induction heads park on 0
    assert assign_role(base | {"first": 0.45, "previous": 0.5}) == "previous"
    assert assign_role(base | {"local": 0.39, "broad": 0.8}) == "broad"
    assert assign_role(base | {"first": 0.39, "broad": 0.69}) == "mixed"


def test_random_sequences_are_seeded_repeated_ordinary_tokens():
    first = repeated_random_sequences(LETTERS, LETTERS.vocab_size, n_sequences=3, half_length=6, seed=1)
    assert first == repeated_random_sequences(LETTERS, LETTERS.vocab_size, n_sequences=3, half_length=6, seed=1)
    assert first != repeated_random_sequences(LETTERS, LETTERS.vocab_size, n_sequences=3, half_length=6, seed=2)
    for ids in first:
        assert ids[:6] == ids[6:] and len(set(ids[:6])) == 6
        assert LETTERS.decode(ids).isalpha()  # no space or full stop: they have no letters
    with pytest.raises(InputError, match="only 26 ordinary tokens"):
        repeated_random_sequences(LETTERS, LETTERS.vocab_size, n_sequences=1, half_length=27, seed=0)


def _tiny_lm(causal: bool = True) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(family="gpt2", vocab_size=LETTERS.vocab_size, d_model=64, n_layers=1, n_heads=2,
                         n_kv_heads=2, head_dim=64, d_ff=32, context_length=128, norm="layernorm", mlp="gelu",
                         activation="gelu_tanh", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                         causal=causal)
    return LanguageModel(Transformer(config).eval(), LETTERS, "tiny")


@pytest.mark.parametrize("causal", [True, False])
def test_a_model_with_zero_queries_and_keys_attends_uniformly_and_is_broad(causal):
    lm = _tiny_lm(causal)
    attention = lm.model.blocks[0].attention
    with torch.no_grad():
        for projection in (attention.w_q, attention.w_k):
            projection.weight.zero_()
            projection.bias.zero_()
    result = score_heads(lm, text=TEXT, n_sequences=2, half_length=8)
    n = len(TEXT)
    if causal:
        one_key = _mean_inverse(n)  # every visible key gets 1 / (i + 1)
        band = sum(7 / (i + 1) for i in range(FIRST_QUERY, n)) / (n - FIRST_QUERY)
        induction = sum(1 / (i + 1) for i in range(8, 16)) / 8
    else:
        one_key, band, induction = 1 / n, 14 / n, 1 / 16
    expected = {"previous": one_key, "next": one_key, "current": one_key, "first": one_key, "local": band,
                "induction": induction, "broad": 1.0}
    assert result.roles == (("previous", "current", "first", "local", "induction", "broad") if causal else
                            ("previous", "next", "current", "first", "local", "induction", "broad"))
    for role in result.roles:
        assert result.scores[..., result.roles.index(role)] == pytest.approx(expected[role], abs=1e-5), role
    assert result.head_roles == [["broad", "broad"]]
    assert result.settings["bos_prefix"] is False and result.settings["causal"] is causal


def test_crafted_first_token_and_previous_token_heads_are_found_through_the_model():
    """Tokens embed to 0 and position j to 10·e_j, so after LayerNorm every key is c·(e_j − 1/64): head 0
    queries a constant pointing at position 0, head 1 maps its own position to the one before (q_i ∝ k_{i−1})."""
    lm = _tiny_lm()
    model, attention = lm.model, lm.model.blocks[0].attention
    with torch.no_grad():
        model.token_embedding.weight.zero_()
        model.position_embedding.weight.copy_(10 * torch.eye(128, 64))
        for projection in (attention.w_q, attention.w_k, attention.w_v):
            projection.weight.zero_()
            projection.bias.zero_()
        attention.w_k.weight.copy_(torch.eye(64).repeat(2, 1))  # both heads: k_j = normed x_j
        normed_first = model.blocks[0].attention_norm(model.position_embedding.weight[:1])[0]
        attention.w_q.bias[:64] = 20 * normed_first / normed_first.norm()
        attention.w_q.weight[64:] = 20 * torch.eye(64).roll(-1, dims=0).triu()  # row r reads position r + 1
    result = score_heads(lm, text=TEXT[:60], n_sequences=2, half_length=8)
    assert result.head_roles == [["first", "previous"]]
    assert result.score(0, 0, "first") > 0.99 and result.score(0, 1, "previous") > 0.99
    assert result.score(0, 0, "induction") < 0.01 and result.score(0, 1, "induction") < 0.01


def test_head_scores_table_json_and_plot():
    lm = _tiny_lm()
    result = score_heads(lm, text=TEXT, n_sequences=1, half_length=4)
    data = json.loads(json.dumps(result.to_json()))
    assert data["scores_axes"] == ["layer", "head", "role"] and len(data["scores"][0][0]) == len(result.roles)
    assert data["thresholds"]["induction"] == 0.3 and sum(data["counts"].values()) == 2
    table = result.table()
    assert [column.header for column in table.columns] == ["layer", "head", "role", *result.roles]
    assert table.row_count == 2
    assert result.table(top=1).row_count <= 1
    ax = result.plot().axes[0]
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer" and ax.get_legend() is not None


def test_too_short_text_and_bad_settings_are_input_errors():
    lm = _tiny_lm()
    with pytest.raises(InputError, match="at least 48"):
        score_heads(lm, text="abc")
    with pytest.raises(InputError, match="half_length"):
        score_heads(lm, text=TEXT, half_length=1)


@pytest.fixture(scope="module")
def smollm2_roles(smollm2_path):
    return score_heads(attnlab.load("smollm2-135m-instruct"))


def test_smollm2_has_previous_token_induction_and_sink_heads(smollm2_roles):
    result = smollm2_roles
    print("\nSmolLM2 head roles:", result.counts())
    for role in result.roles:
        found = result.heads_with(role)
        print(f"  {role}: {[(layer, head, round(result.score(layer, head, role), 2)) for layer, head in found][:8]}")
    assert result.scores.shape == (30, 9, 6) and 0 <= float(result.scores.min()) and float(result.scores.max()) <= 1
    assert result.heads_with("previous") and result.heads_with("induction") and result.heads_with("first")
    assert all(result.score(layer, head, "induction") >= 0.3 for layer, head in result.heads_with("induction"))

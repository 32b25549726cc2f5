"""attnlab explain: choosing the query, word grouping, sink removal, tables, the arithmetic; the CLI."""

import json

import pytest
import torch
from test_cli import assert_clean_error, cli, run

import attnlab
from attnlab.errors import InputError
from attnlab.inspect.attention_map import group_words
from attnlab.inspect.explain import choose_query, explain, head_arithmetic

SENTENCE = "The cat sat on the mat because it was tired."


@pytest.fixture(scope="module")
def lm(smollm2_path):
    return attnlab.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def amap(lm):
    return lm.attention(SENTENCE)


def test_words_group_sub_word_pieces_for_bpe_and_wordpiece(lm):
    ids = lm.tokenizer.encode("Tiredly, the cat<|im_end|>slept.")
    words, word_of_token = group_words(lm.tokenizer, ids, lm.tokenizer.token_strings(ids))
    assert words[:3] == ["Tiredly", ",", "the"] and "<|im_end|>" in words and words[-2:] == ["slept", "."]
    assert len(set(word_of_token)) == len(words) and word_of_token == sorted(word_of_token)
    try:
        encoder = attnlab.load("minilm-l6")
    except attnlab.AttnlabError as error:
        pytest.skip(str(error))
    ids = encoder.tokenizer.encode("tiredly sleeping")
    tokens = encoder.tokenizer.token_strings(ids)
    words, _ = group_words(encoder.tokenizer, ids, tokens)
    assert any(t.startswith("##") for t in tokens) and words == ["[CLS]", "tiredly", "sleeping", "[SEP]"]


def test_word_probs_sum_key_pieces_and_average_query_pieces(lm):
    amap = lm.attention("Tiredly, the cat slept.", layers=[3])
    word_probs = amap.word_probs()
    assert torch.allclose(word_probs.sum(-1), torch.ones(word_probs.shape[:-1]), atol=1e-5)
    pieces = amap.tokens_of_word(0)
    assert len(pieces) > 1  # 'Tiredly' is several tokens
    expected = amap.probs[0, :, pieces][:, :, pieces].sum(-1).mean(-1)  # (H,): mean over queries of summed keys
    assert torch.allclose(word_probs[0, :, 0, 0], expected, atol=1e-6)


def test_sink_removal_renormalises_rows(amap):
    clean = amap.without_sink()
    assert clean.sink_removed and "attention sink" in clean.notes[0]
    assert torch.all(clean.probs[..., 0] == 0)
    rows = clean.probs[:, :, 1:].sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert torch.all(clean.probs[:, :, 0] == 0)  # the first token's own row had nothing else to see
    kept = amap.probs[3, 4, 7, 1:8]
    assert torch.allclose(clean.probs[3, 4, 7, 1:8], kept / kept.sum(), atol=1e-6)


def test_choose_query_by_word_index_position_and_occurrence(amap):
    assert choose_query(amap, token="it").tokens == [7]
    assert choose_query(amap, token="7").tokens == [7] and choose_query(amap, token="-1").tokens == [10]
    assert choose_query(amap, position=SENTENCE.index("it") + 1).tokens == [7]
    assert choose_query(amap, token="the", occurrence=2).tokens == [4]
    with pytest.raises(InputError, match="'the' occurs 2 times \\(tokens 0, 4\\)"):
        choose_query(amap, token="the")
    with pytest.raises(InputError, match="'dog' is not a word or token of the text; tokens: 0 'The', 1 ' cat'"):
        choose_query(amap, token="dog")
    with pytest.raises(InputError, match="token index 11 is out of range"):
        choose_query(amap, token="11")
    with pytest.raises(InputError, match="--occurrence 3"):
        choose_query(amap, token="the", occurrence=3)
    with pytest.raises(InputError, match="no token covers character 3"):
        choose_query(amap, position=3)


def test_explain_averages_the_query_row_over_layers_and_heads(amap):
    explanation = explain(amap, choose_query(amap, token="it"))
    assert torch.allclose(explanation.weights, amap.probs[:, :, 7].mean((0, 1)))
    assert explanation.visible == [True] * 8 + [False] * 3
    layer, head, weight = explanation.strongest_heads(1, 1)[0]
    assert weight == pytest.approx(float(amap.probs[:, :, 7, 1].max()))
    assert float(amap.probs[layer, head, 7, 1]) == pytest.approx(weight)
    one = explain(amap, choose_query(amap, token="it"), layers=[13], heads=[8])
    assert torch.equal(one.weights, amap.probs[13, 8, 7])


def test_head_arithmetic_reproduces_the_model_step_by_step(lm, amap):
    arithmetic = head_arithmetic(lm, amap.token_ids, layer=13, head=8, query=7)
    assert arithmetic.kv_head == 2  # 9 query heads share 3 key/value heads: 6, 7, 8 → 2
    assert arithmetic.key_tokens == list(range(8))  # causal: the query sees itself and what came before
    assert max(arithmetic.check.values()) < 1e-4
    assert torch.allclose(arithmetic.weights, amap.probs[13, 8, 7, :8], atol=1e-5)
    assert torch.allclose(arithmetic.scores * arithmetic.scale, arithmetic.masked, atol=1e-4)
    assert not torch.allclose(arithmetic.q, arithmetic.q_before_rope)  # RoPE rotated it (position 7)
    with pytest.raises(InputError, match="layer 30 does not exist: smollm2-135m-instruct has 30 layers"):
        head_arithmetic(lm, amap.token_ids, layer=30, head=0, query=7)


def test_cli_explain_table_math_and_json(smollm2_path):
    table = run("explain", SENTENCE, "--token", "it", "--math", "--layer", "13", "--head", "8")
    assert table.returncode == 0, table.stderr
    assert "attention from word 'it'" in table.stdout and "' cat'" in table.stdout
    assert "query head 8 shares key/value head 2 with query heads 6, 7, 8" in table.stdout
    assert "softmax(q·k_j / √d_k + mask)" in table.stdout and "Σ_j w_j·v_j" in table.stdout
    data = json.loads(run("explain", SENTENCE, "--token", "cat", "--json", "--no-sink").stdout)
    probs = torch.tensor(data["attention"]["probs"])
    assert probs.shape == (30, 9, 11, 11) and data["attention"]["sink_removed"]
    assert data["explanation"]["query"]["tokens"] == [1]
    assert data["attention"]["tokens"][1] == " cat"


def test_cli_explain_pictures(smollm2_path, tmp_path):
    result = run("explain", SENTENCE, "--token", "it", "--png", str(tmp_path / "overview.png"),
                 "--svg", str(tmp_path / "overview.svg"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "overview.svg").read_bytes()[:400]
    result = run("explain", SENTENCE, "--token", "it", "--layer", "13", "--head", "8", "--png", str(tmp_path / "h.png"))
    assert result.returncode == 0 and (tmp_path / "h.png").exists(), result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--token", "dog"], "'dog' is not a word or token of the text; tokens: 0 'The'"),
    (["--token", "the"], "'the' occurs 2 times"),
    (["--token", "it", "--layer", "30"], "layer 30 does not exist"),
    (["--token", "it", "--layer", "0", "--head", "9"], "head 9 does not exist"),
    (["--token", "it", "--png", "/nonexistent/x.png"], "folder /nonexistent does not exist"),
    (["--token", "it", "--png", "out.gif"], "expected a file name ending in .png, got '.gif'"),
    ([], "say which token to explain"),
])
def test_cli_explain_bad_input(smollm2_path, tmp_path, args, fragment):
    if "out.gif" in args:
        args = [a if a != "out.gif" else str(tmp_path / "out.gif") for a in args]
    assert_clean_error(cli("explain", SENTENCE, *args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_cli_explain_refuses_text_longer_than_the_limit(smollm2_path):
    assert_clean_error(cli("explain", "word " * 1100, "--token", "0"), "attention inspection takes at most 1024")

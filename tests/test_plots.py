"""Attention pictures: files with the right format, axes labelled with the tokens, safe saving."""

import xml.etree.ElementTree as ElementTree

import pytest
import torch

from attnlab.errors import InputError
from attnlab.inspect.attention_map import AttentionMap
from attnlab.inspect.plots import head_heatmap, layer_grid, save_figure, token_label, token_overview

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AXES_STATEMENT = "rows: query (attending) token, columns: key (attended-to) token"


def _map(tokens: list[str], word_of_token: list[int] | None = None, n_layers: int = 2, n_heads: int = 4,
         n_kv_heads: int = 2, causal: bool = True) -> AttentionMap:
    """A hand-made map with random causal rows (each sums to 1)."""
    n = len(tokens)
    scores = torch.randn(n_layers, n_heads, n, n, generator=torch.Generator().manual_seed(0))
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    word_of_token = list(range(n)) if word_of_token is None else word_of_token
    words = ["".join(t for t, w in zip(tokens, word_of_token) if w == index).strip()
             for index in range(max(word_of_token) + 1)]
    return AttentionMap(model="tiny", text="".join(tokens), token_ids=list(range(n)), tokens=tokens, words=words,
                        word_of_token=word_of_token, layers=list(range(n_layers)), heads=list(range(n_heads)),
                        probs=scores.softmax(-1), n_query_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal)


TOKENS = ["The", " cat", " sat", " tired", "ly", "."]
WORDS_OF_TOKENS = [0, 1, 2, 3, 3, 4]


def _labels(ax, axis: str) -> list[str]:
    """The bottom (x) or left (y) tick labels."""
    ticks = (ax.xaxis if axis == "x" else ax.yaxis).get_major_ticks()
    return [tick.label1.get_text() for tick in ticks]


def _shown(ax) -> torch.Tensor:
    """The heatmap's values, blank cells as 0."""
    return torch.tensor(ax.images[0].get_array().filled(0.0)).float()


def test_head_heatmap_labels_both_axes_with_tokens_and_states_the_axes(tmp_path):
    amap = _map(TOKENS, WORDS_OF_TOKENS)
    fig = head_heatmap(amap, 1, 3)
    ax = fig.axes[0]
    assert _labels(ax, "x") == TOKENS and _labels(ax, "y") == TOKENS
    assert "layer 1 · head 3 (kv 1)" in ax.get_title() and AXES_STATEMENT in ax.get_title()
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    shown = ax.images[0].get_array()
    assert shown.mask[0, 1] and not shown.mask[1, 0]  # a decoder's future keys are blank, not 0
    assert torch.allclose(_shown(ax), amap.probs[1, 3])
    save_figure(fig, tmp_path / "head.png")
    assert (tmp_path / "head.png").read_bytes().startswith(PNG_MAGIC)


def test_head_heatmap_of_words_and_without_sink():
    amap = _map(TOKENS, WORDS_OF_TOKENS).without_sink()
    ax = head_heatmap(amap, 0, 0, words=True).axes[0]
    assert _labels(ax, "x") == ["The", "cat", "sat", "tiredly", "."]
    assert "rows: query (attending) word, columns: key (attended-to) word" in ax.get_title()
    assert "sink removed" in ax.get_title()
    assert torch.allclose(_shown(ax), amap.word_probs()[0, 0])


def test_labels_show_line_breaks_and_dollars_verbatim():
    tokens = ["$x$", "\n", " ", "a"]
    ax = head_heatmap(_map(tokens), 0, 0).axes[0]
    assert _labels(ax, "y") == ["$x$", "↵", "␣", "a"] == [token_label(t) for t in tokens]
    assert not any(tick.get_parse_math() for tick in ax.get_yticklabels())  # "$x$" is not mathtext


def test_unknown_layer_or_head_is_an_input_error():
    amap = _map(TOKENS)
    with pytest.raises(InputError, match="layer 5 is not in this attention map"):
        head_heatmap(amap, 5, 0)
    with pytest.raises(InputError, match="head 9 is not"):
        head_heatmap(amap, 0, 9)


def test_layer_grid_has_a_titled_panel_per_head_and_labels_only_short_inputs(tmp_path):
    fig = layer_grid(_map(TOKENS), 1)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["head 0 (kv 0)", "head 1 (kv 0)", "head 2 (kv 1)", "head 3 (kv 1)"]
    assert all(_labels(ax, "x") == TOKENS for ax in panels)
    assert AXES_STATEMENT in fig.get_suptitle()
    save_figure(fig, tmp_path / "grid.svg")
    data = (tmp_path / "grid.svg").read_bytes()
    assert data.startswith(b"<?xml") and ElementTree.fromstring(data).tag.endswith("svg")

    long = layer_grid(_map([f"t{i}" for i in range(30)], n_heads=3, n_kv_heads=3), 0)
    panels = [ax for ax in long.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["head 0", "head 1", "head 2"]  # no kv note without GQA
    assert all(not ax.get_xticks().size for ax in panels)


def test_token_overview_has_one_row_per_layer_and_head_and_stays_readable_for_270(tmp_path):
    amap = _map(["a", "b", "c", "d"], n_layers=30, n_heads=9, n_kv_heads=3)
    fig = token_overview(amap, [2])
    ax = fig.axes[0]
    rows = _labels(ax, "y")
    assert len(rows) == 270 and rows[:2] == ["L0 H0", "L0 H1"] and rows[-1] == "L29 H8"
    assert _labels(ax, "x") == ["a", "b", "c", "d"]
    assert len(ax.lines) == 29  # a separator between each pair of layers
    assert fig.get_figheight() > 270 * 0.1  # about 0.1 inch a row
    assert torch.allclose(_shown(ax)[:, :3], amap.probs[:, :, 2, :3].reshape(270, 3))
    assert ax.images[0].get_array().mask[:, 3].all()  # the key after the query is out of its sight
    save_figure(fig, tmp_path / "overview.png")
    assert (tmp_path / "overview.png").read_bytes().startswith(PNG_MAGIC)


def test_token_overview_of_a_word_averages_its_pieces_and_sums_keys():
    amap = _map(TOKENS, WORDS_OF_TOKENS)
    ax = token_overview(amap, [3, 4], words=True).axes[0]
    assert _labels(ax, "x") == amap.words
    expected = amap.word_probs()[:, :, 3].reshape(8, -1)  # the word "tiredly": the row of word_probs
    assert torch.allclose(_shown(ax), expected, atol=1e-6)
    with pytest.raises(InputError, match="query_tokens must be token positions in 0-5"):
        token_overview(amap, [6])
    with pytest.raises(InputError):
        token_overview(amap, [])


def test_save_refuses_bad_suffix_and_missing_folder_and_leaves_no_file(tmp_path):
    amap = _map(TOKENS)
    with pytest.raises(InputError, match="'.jpg'.*use .png or .svg"):
        save_figure(head_heatmap(amap, 0, 0), tmp_path / "map.jpg")
    with pytest.raises(InputError, match="does not exist"):
        save_figure(head_heatmap(amap, 0, 0), tmp_path / "missing" / "map.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="does not exist"):
        save_figure(head_heatmap(amap, 0, 0), tmp_path / "file" / "map.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_save_turns_a_write_failure_into_one_line_and_closes_pyplot_figures(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import attnlab.inspect.plots as plots

    def refuse(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(plots, "atomic_write_bytes", refuse)
    fig = plt.figure()
    with pytest.raises(InputError) as raised:
        save_figure(fig, tmp_path / "map.png")
    assert str(raised.value) == f"cannot write {tmp_path / 'map.png'}: Permission denied"
    assert not plt.fignum_exists(fig.number) and not list(tmp_path.iterdir())

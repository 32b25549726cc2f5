"""Pictures of an AttentionMap: one head, one layer's heads, one query across the whole model.

Every picture keeps the same convention: **rows are queries** (the token doing the attending),
**columns are keys** (the token attended to), so a row sums to 1. Figures are built on matplotlib's
Agg canvas without pyplot, so nothing depends on a display or on global figure state, and
matplotlib is imported only when a picture is asked for (``import attnlab`` stays fast).
"""

import io
import math
import sys
from pathlib import Path

import torch

from attnlab.errors import InputError
from attnlab.inspect.attention_map import AttentionMap
from attnlab.paths import atomic_write_bytes

FORMATS = (".png", ".svg")
GRID_LABELS_UP_TO = 24  # a layer grid labels its small panels only up to this many tokens
COLOURMAP = "Blues"
SAVE_DPI = 120


def new_figure(width: float, height: float):
    """A matplotlib Figure (inches) with an Agg canvas: renders anywhere, owned by nobody but the caller."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")  # room for rotated labels and colour bars
    FigureCanvasAgg(fig)
    return fig


def token_label(text: str) -> str:
    """A token's text as a tick label: line breaks and tabs shown as ↵ and ⇥, a blank token as ␣."""
    shown = text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return shown if shown.strip() else "␣" * max(len(shown), 1)


def head_heatmap(amap: AttentionMap, layer: int, head: int, *, words: bool = False):
    """One head's T×T map (W×W with ``words``), both axes labelled, with a colour bar."""
    probs, labels, unit = _probs_and_labels(amap, words)
    matrix = probs[_layer(amap, layer), _head(amap, head)]
    side = min(max(0.25 * len(labels) + 2.5, 5.0), 20.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = _draw(ax, _hide_future(amap, matrix, words), vmax=float(matrix.max()))
    _label_axes(ax, labels, _fontsize(len(labels), side))
    ax.set_xlabel(f"key (attended-to) {unit}")
    ax.set_ylabel(f"query (attending) {unit}")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    ax.set_title(f"{amap.model} · layer {layer} · head {head}{_kv_note(amap, head)}\n{_axes_statement(unit)}"
                 f"{_sink_note(amap)}", fontsize=9)
    return fig


def layer_grid(amap: AttentionMap, layer: int, *, words: bool = False):
    """Every held head of one layer as small maps on one shared colour scale."""
    probs, labels, unit = _probs_and_labels(amap, words)
    maps = probs[_layer(amap, layer)]  # (H, T, T)
    n_columns = math.ceil(math.sqrt(len(amap.heads)))
    n_rows = math.ceil(len(amap.heads) / n_columns)
    panel = 3.6 if len(labels) <= GRID_LABELS_UP_TO else 2.8
    fig = new_figure(panel * n_columns + 1.0, panel * n_rows + 1.0)
    axes = fig.subplots(n_rows, n_columns, squeeze=False)
    vmax = float(maps.max())
    for index, ax in enumerate(axes.flat):
        if index >= len(amap.heads):
            ax.set_axis_off()
            continue
        head = amap.heads[index]
        image = _draw(ax, _hide_future(amap, maps[index], words), vmax=vmax)
        ax.set_title(f"head {head}{_kv_note(amap, head)}", fontsize=8)
        if len(labels) <= GRID_LABELS_UP_TO:
            _label_axes(ax, labels, 5.5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, label="attention weight (shared scale)", shrink=0.6)
    fig.suptitle(f"{amap.model} · layer {layer} · {len(amap.heads)} heads\n{_axes_statement(unit)}"
                 f"{_sink_note(amap)}", fontsize=10)
    return fig


def token_overview(amap: AttentionMap, query_tokens: list[int], *, words: bool = False):
    """Where one query looks in every held layer and head: one row per (layer, head), one column per key.

    ``query_tokens`` are token positions whose rows are averaged (give the pieces of a word to see
    the word). With ``words`` the columns are words, each the sum over its pieces, so passing a
    word's pieces gives exactly that word's row of ``amap.word_probs()``.
    """
    if not query_tokens or any(not 0 <= t < len(amap.tokens) for t in query_tokens):
        raise InputError(f"query_tokens must be token positions in 0-{len(amap.tokens) - 1}, got {query_tokens}")
    rows = amap.probs[:, :, query_tokens].mean(2)  # (L, H, T): the query pieces averaged
    labels, unit = amap.tokens, "token"
    if words:
        labels, unit = amap.words, "word"
        membership = torch.zeros(len(amap.tokens), len(amap.words))  # (T, W)
        membership[torch.arange(len(amap.tokens)), torch.tensor(amap.word_of_token)] = 1.0
        rows = rows @ membership  # (L, H, W): key pieces summed
    n_layers, n_heads = rows.shape[:2]
    matrix = rows.reshape(n_layers * n_heads, -1)
    if amap.causal and not words:  # keys after the last query token are out of its sight: blank, not 0
        matrix[:, max(query_tokens) + 1:] = float("nan")
    width = min(max(0.3 * len(labels) + 2.5, 6.0), 20.0)
    height = 2.0 + 0.11 * len(matrix)
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    image = _draw(ax, matrix, vmax=float(matrix.nan_to_num().max()))
    key_fontsize = _fontsize(len(labels), width - 2.0)
    ax.set_xticks(range(len(labels)), [token_label(t) for t in labels], rotation=90, fontsize=key_fontsize,
                  parse_math=False)
    ax.tick_params(axis="x", labeltop=True, top=True)  # a tall figure: key labels above and below
    ax.set_yticks(range(len(matrix)), [f"L{layer} H{head}" for layer in amap.layers for head in amap.heads],
                  fontsize=5.5)
    for boundary in range(1, n_layers):
        ax.axhline(boundary * n_heads - 0.5, color="black", linewidth=0.6)
    ax.set_xlabel(f"key (attended-to) {unit}")
    ax.set_ylabel("layer, head")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=min(1.0, 8.0 / height), pad=0.02)
    query = "".join(amap.tokens[t] for t in query_tokens)
    ax.set_title(f"{amap.model} · query {query!r} (token {', '.join(map(str, query_tokens))}) in every layer "
                 f"and head\nrows: layer and head of the query, columns: key (attended-to) {unit}{_sink_note(amap)}",
                 fontsize=9)
    return fig


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as PNG or SVG (by the suffix), atomically, then close it."""
    path = Path(path)
    try:
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise InputError(f"cannot save a figure as {suffix or 'a file without a suffix'!r}: "
                             f"use {' or '.join(FORMATS)}")
        if not path.parent.is_dir():
            raise InputError(f"folder {path.parent} does not exist: create it first")
        buffer = io.BytesIO()  # render fully in memory so a failed render never touches the file
        fig.savefig(buffer, format=suffix[1:], dpi=SAVE_DPI, bbox_inches="tight")
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:  # a figure made with pyplot stays in its registry until closed
            pyplot.close(fig)


def _probs_and_labels(amap: AttentionMap, words: bool) -> tuple[torch.Tensor, list[str], str]:
    """(probs (L, H, N, N), axis labels, unit name) for tokens or words."""
    return (amap.word_probs(), amap.words, "word") if words else (amap.probs, amap.tokens, "token")


def _layer(amap: AttentionMap, layer: int) -> int:
    if layer not in amap.layers:
        raise InputError(f"layer {layer} is not in this attention map (it holds layers {amap.layers})")
    return amap.layer_index(layer)


def _head(amap: AttentionMap, head: int) -> int:
    if head not in amap.heads:
        raise InputError(f"head {head} is not in this attention map (it holds heads {amap.heads})")
    return amap.head_index(head)


def _hide_future(amap: AttentionMap, matrix: torch.Tensor, words: bool) -> torch.Tensor:
    """Token maps of a decoder with the keys a query cannot see (j > i) as NaN, drawn blank, not as 0."""
    if not amap.causal or words:  # a word may see some of its own later pieces: no clean triangle
        return matrix
    return matrix.masked_fill(torch.ones_like(matrix, dtype=torch.bool).triu(1), float("nan"))


def _draw(ax, matrix: torch.Tensor, vmax: float):
    import matplotlib

    colours = matplotlib.colormaps[COLOURMAP].with_extremes(bad="#f4f4f4")
    return ax.imshow(matrix.numpy(), cmap=colours, vmin=0.0, vmax=max(vmax, 1e-9), aspect="auto",
                     interpolation="nearest")


def _label_axes(ax, labels: list[str], fontsize: float) -> None:
    shown = [token_label(text) for text in labels]
    ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=fontsize, parse_math=False)
    ax.set_yticks(range(len(shown)), shown, fontsize=fontsize, parse_math=False)


def _fontsize(n_labels: int, inches: float) -> float:
    """Tick font size that lets ``n_labels`` labels share ``inches`` without overlapping (3-9 pt)."""
    return min(9.0, max(3.0, 0.75 * inches * 72 / max(n_labels, 1)))


def _axes_statement(unit: str) -> str:
    return f"rows: query (attending) {unit}, columns: key (attended-to) {unit}"


def _kv_note(amap: AttentionMap, head: int) -> str:
    """' (kv 2)' for grouped-query models, where heads share key/value heads; '' otherwise."""
    return f" (kv {amap.kv_head_of(head)})" if amap.n_kv_heads < amap.n_query_heads else ""


def _sink_note(amap: AttentionMap) -> str:
    return "\nfirst token set aside (attention sink removed), rows renormalised" if amap.sink_removed else ""

"""The attention viewer as one self-contained HTML page: head view, model view, per-token weights.

Script, style and the map's data are all inlined, so the file opens offline — from a file:// URL, an
e-mail attachment, a machine with no network — and makes no request (DESIGN: bertviz's views without
its CDN). The drawing happens in ``static/viewer.js``; this module only assembles the document.
With ``live=True`` the page also carries a text box that asks ``attnlab.inspect.server`` for new maps.
"""

import html
import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from string import Template

from attnlab.errors import InputError
from attnlab.inspect.attention_map import AttentionMap
from attnlab.paths import atomic_write_text

EXAMPLE_TEXT = "The cat sat on the mat because it was tired."
# The page holds layers × heads × T² weights as JSON (~8 bytes each): 30 × 9 × 128² ≈ 4.4 M numbers,
# ~35 MB for SmolLM2, about what a browser tab handles smoothly.
VIEWER_MAX_TOKENS = 128

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
$css</style>
</head>
<body data-live="$live">
<header>
  <h1>$title</h1>
  <p id="map-info">No attention map yet.</p>
  <ul id="notes"></ul>
</header>
$live_form
<section id="controls" aria-label="what to show">
  <label>layer <select id="layer-select"></select></label>
  <label>head <select id="head-select"></select></label>
  <label class="sink-label"><input type="checkbox" id="sink-toggle"> set aside first token (attention sink)</label>
</section>
<p id="sink-note" class="sink-note" hidden></p>
<p class="axes">Each weight is how much a <b>query</b> token (the one attending: row, left column, <i>from</i>)
  looks at a <b>key</b> token (the one attended to: column, right column, <i>to</i>).
  The weights of one query sum to 1.</p>
<main>
  <section id="head-view-section">
    <h2>Head view <span id="head-view-title" class="subtitle"></span></h2>
    <div class="head-view-row">
      <div id="head-view"></div>
      <aside id="weights" aria-live="polite">
        <h3 id="weights-title">Hover a token to see its weights</h3>
        <table id="weights-table"></table>
        <p id="weights-sum"></p>
      </aside>
    </div>
  </section>
  <section id="model-view-section">
    <h2>Selected head <span id="heatmap-title" class="subtitle"></span></h2>
    <canvas id="heatmap" width="10" height="10"></canvas>
    <p id="heatmap-cell" class="readout">Point at a cell to read its weight.</p>
    <h2>Model view <span class="subtitle">every layer × head (rows = query, columns = key); click one to select
      it</span></h2>
    <div id="model-view"></div>
  </section>
</main>
<script type="application/json" id="attnlab-data">$data</script>
<script>
$js</script>
</body>
</html>
""")

_LIVE_FORM = Template("""<form id="live-form">
  <label for="text-input">Text</label>
  <textarea id="text-input" rows="2" spellcheck="false">$text</textarea>
  <button id="submit" type="submit">Show attention</button>
  <span id="status" class="readout"></span>
</form>
<p id="error" role="alert" hidden></p>
""")


@cache
def _static(name: str) -> str:
    """A file of ``static/``, read once: the page inlines it so the HTML needs nothing beside it."""
    return (files("attnlab.inspect") / "static" / name).read_text(encoding="utf-8")


def _script_json(data: object) -> str:
    """JSON that is safe inside a ``<script>`` element.

    ``<`` ``>`` and ``&`` become ``\\u`` escapes, so no string in the data (a token ``"</script>"``) can
    end the element early or open a comment; ``JSON.parse`` reads the escapes back as the same text.
    """
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(attention_map: AttentionMap | None, *, title: str = "attnlab attention", live: bool = False) -> str:
    """One HTML document showing ``attention_map`` (its :meth:`AttentionMap.to_json` is embedded).

    ``live`` adds a text box that POSTs to ``/api/attention`` (served by ``attnlab.inspect.server``) and
    redraws the page with the map it gets back; with no map the box starts with an example sentence.
    """
    data = attention_map.to_json() if attention_map is not None else None
    live_form = ""
    if live:
        text = attention_map.text if attention_map is not None else EXAMPLE_TEXT
        live_form = _LIVE_FORM.substitute(text=html.escape(text))
    return _PAGE.substitute(title=html.escape(title), css=_static("viewer.css"), js=_static("viewer.js"),
                            live="true" if live else "false", live_form=live_form, data=_script_json(data))


def write_page(attention_map: AttentionMap, path: str | Path, *, title: str = "attnlab attention") -> None:
    """Write :func:`render_page` to ``path`` atomically: a reader sees the old file or the whole new one.

    The folder must exist: a typo in it should be an error, not a new folder tree somewhere.
    """
    path = Path(path)
    if len(attention_map.tokens) > VIEWER_MAX_TOKENS:
        raise InputError(f"the text is {len(attention_map.tokens)} tokens; the page takes at most "
                         f"{VIEWER_MAX_TOKENS}: shorten it")
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise InputError(f"cannot write {path}: {path.parent} {problem}; create the folder or choose another path")
    page = render_page(attention_map, title=title)
    try:
        atomic_write_text(path, page)
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}; choose a folder you can write to") from error

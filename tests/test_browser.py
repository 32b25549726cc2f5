"""The viewer in a real browser: Debian's headless chromium driven by Playwright (no browser is downloaded).

What the page shows is read back from its elements — each weight cell carries ``data-key-index`` and
``data-weight`` — and compared with the library's numbers, so these tests check the JavaScript too.
"""

import json
import threading
import time
from pathlib import Path

import pytest

import attnlab
from attnlab.errors import ModelNotFoundError
from attnlab.inspect.html import EXAMPLE_TEXT, write_page
from attnlab.inspect.server import make_server

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_WAIT_S = 600


def installer_running() -> bool:
    """Whether apt or dpkg is running (the test set-up may be installing chromium right now)."""
    for process in Path("/proc").iterdir():
        try:
            if process.name.isdigit() and (process / "comm").read_text().strip() in {"apt", "apt-get", "dpkg"}:
                return True
        except OSError:
            continue
    return False


def chromium_ready() -> bool:
    """Wait for chromium while an installer runs; give up at once when none does."""
    deadline = time.monotonic() + INSTALL_WAIT_S
    while not (CHROMIUM.exists() and Path("/usr/lib/chromium/chromium").exists()) or installer_running():
        if not installer_running() or time.monotonic() > deadline:
            return CHROMIUM.exists()
        time.sleep(2)
    return True


@pytest.fixture(scope="module")
def browser():
    if not chromium_ready():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium, done by "
                    f"install.sh --test) to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def lm(smollm2_path):
    return attnlab.load("smollm2-135m-instruct")


def open_page(browser, url: str):
    """(page at ``url``, the URLs it requested, its script errors) — the lists fill as the page runs."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests: list[str] = []
    script_errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(url)
    return page, requests, script_errors


def assert_shows_weights(page, expected: list[float]) -> None:
    """The weights panel lists one weight per key, numerically equal (1e-4) to ``expected``."""
    cells = page.eval_on_selector_all(
        "#weights-table [data-key-index]",
        "cells => cells.map(cell => [Number(cell.dataset.keyIndex), cell.dataset.weight, cell.textContent])")
    assert [index for index, _, _ in cells] == list(range(len(expected)))
    for (index, weight, shown), want in zip(cells, expected):
        assert abs(float(weight) - want) <= 1e-4, (index, weight, want)
        assert abs(float(shown) - want) <= 1e-4 and len(shown.split(".")[1]) == 4, (index, shown, want)


def wait_for_text(page, text: str) -> None:
    page.wait_for_function(f"document.getElementById('map-info').dataset.text === {json.dumps(text)}")


def test_written_page_shows_the_map_and_sets_the_sink_aside(lm, browser, tmp_path, artifacts_dir):
    attention_map = lm.attention(EXAMPLE_TEXT)
    query, cat = attention_map.tokens.index(" it"), attention_map.tokens.index(" cat")
    # the head where " it" looks hardest at " cat": worth a look, and with that much weight off the sink the
    # renormalised row is well defined from the 6-decimal JSON (tiny rows would amplify the rounding)
    to_cat = attention_map.probs[:, :, query, cat]
    layer, head = divmod(int(to_cat.argmax()), to_cat.shape[1])
    assert attention_map.probs[layer, head, query, 1:].sum() > 0.1
    target = tmp_path / "attention.html"
    write_page(attention_map, target)
    page, requests, script_errors = open_page(browser, target.as_uri())

    page.select_option("#layer-select", str(layer))  # option values are positions in map.layers (all here)
    page.select_option("#head-select", str(head))
    page.hover(f"#query-{query}")
    assert page.get_attribute("#weights-title", "data-index") == str(query)
    assert_shows_weights(page, attention_map.to_json()["probs"][layer][head][query])
    assert page.is_hidden("#sink-note")

    page.check("#sink-toggle")
    assert page.is_visible("#sink-note") and "Attention sink set aside" in page.text_content("#sink-note")
    aside = attention_map.without_sink().probs
    assert_shows_weights(page, aside[layer, head, query].tolist())
    page.select_option("#head-select", "avg")
    assert_shows_weights(page, aside[layer, :, query].mean(0).tolist())
    page.uncheck("#sink-toggle")
    assert page.is_hidden("#sink-note")
    assert_shows_weights(page, attention_map.probs[layer, :, query].mean(0).tolist())

    page.click("#thumb-3-5")  # the model view selects a head
    assert (page.input_value("#layer-select"), page.input_value("#head-select")) == ("3", "5")
    assert "thumb-3-5" in page.eval_on_selector_all("#model-view canvas.selected", "cells => cells.map(c => c.id)")
    assert_shows_weights(page, attention_map.probs[3, 5, query].tolist())
    page.screenshot(path=str(artifacts_dir / "viewer-file.png"), full_page=True)  # kept for a person to look at

    assert script_errors == []
    assert requests and all(url.startswith("file://") for url in requests), requests


def test_encoder_lines_go_both_ways(browser, tmp_path):
    try:
        encoder = attnlab.load("minilm-l6")
    except ModelNotFoundError as error:
        pytest.skip(str(error))
    write_page(encoder.attention("the bank of the river"), tmp_path / "encoder.html")
    page, _, script_errors = open_page(browser, (tmp_path / "encoder.html").as_uri())
    pairs = page.eval_on_selector_all("#head-view line", "lines => lines.map(l => [+l.dataset.query, +l.dataset.key])")
    assert any(key > query for query, key in pairs) and any(key < query for query, key in pairs)
    assert "bidirectional" in page.text_content("#map-info") and script_errors == []


def test_live_page_asks_the_server_and_shows_its_errors(lm, browser, artifacts_dir):
    server = make_server(lm, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page, _, script_errors = open_page(browser, f"http://127.0.0.1:{server.server_address[1]}/")
        wait_for_text(page, EXAMPLE_TEXT)  # the page asks for its example sentence by itself

        text = "Alice gave Bob the book because she had finished it."
        page.fill("#text-input", text)
        page.click("#submit")
        wait_for_text(page, text)
        expected = lm.attention(text)
        query = expected.tokens.index(" she")
        page.select_option("#layer-select", "12")
        page.select_option("#head-select", "4")
        page.hover(f"#query-{query}")
        assert_shows_weights(page, expected.probs[12, 4, query].tolist())
        assert page.is_hidden("#error")
        page.screenshot(path=str(artifacts_dir / "viewer-serve.png"), full_page=True)  # kept for a person

        page.fill("#text-input", "   ")
        page.click("#submit")
        page.wait_for_selector("#error", state="visible")
        assert "the text is empty" in page.text_content("#error")
        assert page.get_attribute("#map-info", "data-text") == text  # the last good map stays

        page.fill("#text-input", "Short and sweet.")
        page.press("#text-input", "Enter")
        wait_for_text(page, "Short and sweet.")
        assert page.is_hidden("#error")
        assert script_errors == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

"""The self-contained HTML page (attnlab.inspect.html) and the local viewer server (attnlab.inspect.server)."""

import json
import os
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.errors import AttnlabError
from attnlab.inspect.attention_map import AttentionMap
from attnlab.inspect.html import EXAMPLE_TEXT, render_page, write_page
from attnlab.inspect.server import MAX_BODY_BYTES, VIEWER_MAX_TOKENS, make_server

DATA_SCRIPT = re.compile(r'<script type="application/json" id="attnlab-data">(.*?)</script>', re.DOTALL)


def tricky_map() -> AttentionMap:
    """A hand-made 3-token map whose tokens try to break out of the page: script end, HTML, entities."""
    tokens = ["</script><script>alert(1)</script>", " <b>&amp;", " \u2028é"]
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.125, 0.375]]).expand(2, 3, 3, 3)
    return AttentionMap(model="tiny", text="".join(tokens), token_ids=[1, 2, 3], tokens=tokens, words=tokens,
                        word_of_token=[0, 1, 2], layers=[0, 1], heads=[0, 1, 2], probs=probs.clone(),
                        n_query_heads=3, n_kv_heads=1, causal=True)


def embedded_data(page: str):
    match = DATA_SCRIPT.search(page)
    assert match, "no attnlab-data script in the page"
    return json.loads(match.group(1))


def test_page_is_self_contained_and_carries_the_map_exactly():
    attention_map = tricky_map()
    page = render_page(attention_map)
    assert embedded_data(page) == attention_map.to_json()
    # the tokens' "</script>" must not end an element: exactly the page's own two scripts end
    assert page.count("</script>") == 2 and "alert(1)</script>" not in page
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//|<link|<iframe|<img", page, re.IGNORECASE)
    assert "<style>" in page and "function withoutSink" in page  # CSS and JS inlined, not linked
    assert 'data-live="false"' in page and 'id="text-input"' not in page


def test_title_is_escaped_and_live_page_has_the_input_box():
    page = render_page(None, title="<b>mine</b>", live=True)
    assert "<title>&lt;b&gt;mine&lt;/b&gt;</title>" in page
    assert embedded_data(page) is None
    assert 'data-live="true"' in page and 'id="error"' in page and 'id="submit"' in page
    assert f'id="text-input" rows="2" spellcheck="false">{EXAMPLE_TEXT}</textarea>' in page


def test_write_page_writes_the_page_atomically(tmp_path, monkeypatch):
    attention_map = tricky_map()
    target = tmp_path / "attention.html"
    write_page(attention_map, target)
    assert target.read_text(encoding="utf-8") == render_page(attention_map)
    assert os.listdir(tmp_path) == ["attention.html"]

    def fail_rename(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("attnlab.paths.os.replace", fail_rename)
    with pytest.raises(AttnlabError, match="cannot write .*No space left on device"):
        write_page(attention_map, target, title="new")
    assert target.read_text(encoding="utf-8") == render_page(attention_map)  # the old page, whole
    assert os.listdir(tmp_path) == ["attention.html"]  # and no temporary file left behind


def read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody may write in. root ignores permission bits, so as root use sysfs, which refuses root too."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("where", ["missing folder", "read-only folder", "parent is a file"])
def test_write_page_to_an_unwritable_path_is_a_clear_error_and_leaves_nothing(tmp_path, where):
    if where == "missing folder":
        folder, fragment = tmp_path / "no" / "such", "does not exist"
    elif where == "read-only folder":
        folder, fragment = read_only_folder(tmp_path), "Permission denied"
    else:
        (tmp_path / "file").write_text("x")
        folder, fragment = tmp_path / "file", "is not a folder"
    before = set(os.listdir(folder)) if folder.is_dir() else None
    target = folder / "page.html"
    with pytest.raises(AttnlabError, match=f"cannot write {re.escape(str(target))}: .*{fragment}") as info:
        write_page(tricky_map(), target)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "no").exists()  # the missing folder was not created
    if before is not None:
        assert set(os.listdir(folder)) == before


# ---- the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(smollm2_path):
    return attnlab.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server_url(lm):
    server = make_server(lm, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def post(url: str, body: bytes | dict, timeout: float = 120) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"{url}/api/attention", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_page_and_attention_match_the_library(lm, server_url):
    with urllib.request.urlopen(f"{server_url}/", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert 'id="text-input"' in page and embedded_data(page) is None

    text = "The cat sat on the mat because it was tired."
    expected = lm.attention(text)
    status, data = post(server_url, {"text": text})
    assert status == 200
    assert data["tokens"] == expected.tokens and data["causal"] is True and data["sink_removed"] is False
    torch.testing.assert_close(torch.tensor(data["probs"]), expected.probs, atol=1e-6, rtol=0)

    status, data = post(server_url, {"text": text, "sink": True})
    assert status == 200 and data["sink_removed"] is True
    torch.testing.assert_close(torch.tensor(data["probs"]), expected.without_sink().probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 400, 'a "text" field'),
    ({"words": "hello"}, 400, 'a "text" field'),
    ({"text": 42}, 400, '"text" must be a string'),
    ({"text": "hi", "sink": "yes"}, 400, '"sink" must be true or false'),
    ({"text": ""}, 400, "the text is empty"),
    ({"text": "   "}, 400, "the text is empty"),
    ({"text": "cat " * 300}, 400, f"tokens; the viewer takes at most {VIEWER_MAX_TOKENS}"),
    ({"text": "a" * (MAX_BODY_BYTES + 1)}, 413, f"the viewer takes at most {MAX_BODY_BYTES}"),
])
def test_server_refuses_bad_requests_with_one_line(server_url, body, status, fragment):
    got_status, data = post(server_url, body)
    assert got_status == status
    assert set(data) == {"error"} and fragment in data["error"] and "\n" not in data["error"]


def test_server_unknown_route_is_404(server_url):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server_url}/nothing", timeout=30)
    assert info.value.code == 404 and "the viewer is at /" in json.loads(info.value.read())["error"]


def test_concurrent_requests_each_get_their_own_map(lm, server_url):
    sentences = [
        "The cat sat on the mat.", "Paris is the capital of France.", "She read the book twice.",
        "Rain fell all night long.", "Two plus two is four.", "The old man and the sea.",
        "Birds fly south in winter.", "Attention is all you need.",
    ]
    with ThreadPoolExecutor(len(sentences)) as pool:
        answers = list(pool.map(lambda text: post(server_url, {"text": text}), sentences))
    for text, (status, data) in zip(sentences, answers):
        expected = lm.attention(text)
        assert status == 200 and data["text"] == text and data["tokens"] == expected.tokens
        torch.testing.assert_close(torch.tensor(data["probs"]), expected.probs, atol=1e-6, rtol=0)


def test_server_refuses_requests_from_other_sites(server_url):
    import http.client
    from urllib.parse import urlparse

    port = urlparse(server_url).port
    for origin, status in (("http://evil.example", 403), (f"http://127.0.0.1:{port}", 200)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/api/attention", body=json.dumps({"text": "Hi there."}),
                           headers={"Origin": origin, "Content-Type": "application/json"})
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == status, body
        if status == 403:
            assert "refused" in body["error"]

"""The attention viewer as a local web app: the live page at ``/``, attention maps from ``POST /api/attention``.

Standard library only (``http.server``). Requests are answered by threads, but the model runs one
request at a time under a lock: each call has its own capture either way, and two forward passes at
once would only fight over the same CPU cores. It listens on 127.0.0.1 unless told otherwise — it has
no authentication, and anyone who can reach it can make the machine compute.
"""

import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from attnlab.errors import AttnlabError, InputError
from attnlab.inspect.html import VIEWER_MAX_TOKENS, render_page
from attnlab.lm import LanguageModel

MAX_BODY_BYTES = 16 * 1024  # a 128-token text is ~1 KiB; anything much larger is not a sentence to look at
ATTENTION_ROUTE = "/api/attention"


class RequestError(Exception):
    """A request the viewer refuses: the HTTP status and a one-line message for the page to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ViewerServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the model, the lock that serialises its use, and the page."""

    def __init__(self, address: tuple[str, int], lm: LanguageModel) -> None:
        super().__init__(address, ViewerHandler)
        self.lm = lm
        self.model_lock = threading.Lock()
        self.page = render_page(None, title=f"attnlab attention · {lm.name}", live=True).encode("utf-8")

    def attention_json(self, text: str, sink: bool) -> dict:
        """The AttentionMap JSON of ``text`` (first token set aside if ``sink``), refusing long texts first."""
        n_tokens = len(self.lm.tokenizer.encode(text))
        if n_tokens > VIEWER_MAX_TOKENS:
            raise InputError(f"the text is {n_tokens} tokens; the viewer takes at most {VIEWER_MAX_TOKENS}: "
                             f"shorten it")
        with self.model_lock:
            attention_map = self.lm.attention(text)
        return (attention_map.without_sink() if sink else attention_map).to_json()


class ViewerHandler(BaseHTTPRequestHandler):
    """GET / → the live page; POST /api/attention {"text", "sink"?} → map JSON, or {"error"} with 4xx."""

    server: ViewerServer
    server_version = "attnlab-viewer"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        else:
            self._send_json(404, {"error": f"nothing at {self.path}; the viewer is at /"})

    def do_POST(self) -> None:
        if self.path != ATTENTION_ROUTE:
            self._send_json(404, {"error": f"nothing at {self.path}; POST to {ATTENTION_ROUTE}"})
            return
        try:
            self._check_origin()
            text, sink = self._read_request()
            answer = self.server.attention_json(text, sink)
        except RequestError as error:
            self._send_json(error.status, {"error": str(error)})
        except AttnlabError as error:
            self._send_json(400, {"error": " ".join(str(error).split())})
        except Exception as error:  # a bug, not the user's fault: say so on the page, keep the details here
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": f"internal error ({type(error).__name__}); see the server's output"})
        else:
            self._send_json(200, answer)

    def _check_origin(self) -> None:
        """Refuse requests sent by pages of other sites (a browser names them in Origin): no one else's
        page may make this machine compute."""
        origin = self.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != self.headers.get("Host"):
            raise RequestError(403, f"requests from {origin} are refused; open the viewer's own page")

    def _read_request(self) -> tuple[str, bool]:
        """(text, sink) from the JSON body; the size is checked from Content-Length before reading a byte."""
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError(411, "the request needs a Content-Length header")
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError(400, f"Content-Length {length_header!r} is not a number") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is {length} bytes; the viewer takes at most {MAX_BODY_BYTES}")
        try:
            request = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"the body is not valid JSON ({error}); send {{\"text\": \"...\"}}") from None
        if not isinstance(request, dict) or "text" not in request:
            raise RequestError(400, 'the body must be a JSON object with a "text" field: {"text": "..."}')
        text, sink = request["text"], request.get("sink", False)
        if not isinstance(text, str):
            raise RequestError(400, f'"text" must be a string, not {type(text).__name__}')
        if not isinstance(sink, bool):
            raise RequestError(400, f'"sink" must be true or false, not {json.dumps(sink)}')
        return text, sink

    def _send_json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Quiet: a viewer session is hundreds of requests; only failures (log_error, 5xx) reach stderr."""
        if isinstance(code, int) and code >= 500:
            super().log_request(code, size)


def make_server(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server (not yet serving) for ``lm`` on host:port; port 0 picks a free one (``server.server_address``)."""
    try:
        return ViewerServer((host, port), lm)
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another port or host") \
            from error


def serve(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the viewer until Ctrl-C, then close the socket and return."""
    server = make_server(lm, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"attnlab: attention viewer for {lm.name} at http://{bound_host}:{bound_port}/ (Ctrl-C to stop)", flush=True)
    if bound_host not in ("127.0.0.1", "localhost"):
        print(f"attnlab: warning: listening on {bound_host}, so other machines can reach the viewer; it has no "
              f"authentication", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("attnlab: viewer stopped", flush=True)
    finally:
        server.server_close()

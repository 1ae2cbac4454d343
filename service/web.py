"""The daemon's small read-only web server: the status page, ``/api/status``, ``/metrics``.

It runs on its own threads (``http.server.ThreadingHTTPServer``) and serves only what
the loop published last (``service.board.Board``), the page's static files, and the
finished videos under ``STATE_DIR/outputs/``. No endpoint changes anything: every method
but GET and HEAD is answered 405.

    GET /                 the status page (service/static/)
    GET /api/status       the status view, the same JSON as STATE_DIR/status.json
    GET /api/board        what the page draws: progress grids, videos, rejected files
    GET /gantt.svg        the Gantt chart of recent batches (``submit.py report``'s drawing)
    GET /metrics          Prometheus text format
    GET /outputs/<batch>/<file>   a finished video (byte ranges for seeking)
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

import config
from service.board import Board, Publisher
from service.metrics import Metrics
from service.report import render_svg
from statedir import StateDir
from statemachine.log import Log
from statemachine.store import Store

if TYPE_CHECKING:
    from service.loop import Loop

log = structlog.get_logger("comfy_dual.web")

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".png": "image/png", ".ico": "image/x-icon"}
VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
               ".mkv": "video/x-matroska", ".gif": "image/gif", ".webp": "image/webp",
               ".png": "image/png"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin",
    # the Gantt's SVG carries its own <style>: inline styles, no inline scripts
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; media-src 'self'; object-src 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
CHUNK = 1 << 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_name(host_header: str) -> bool:
    """A Host header naming this machine's loopback: ``localhost``, ``*.localhost``, or a
    loopback address, with or without a port."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host == "localhost" or host.endswith(".localhost") or is_loopback(host)


class StatusWeb:
    """The metrics, the publisher and the server of one daemon, wired in three calls:
    ``metered(log)`` before the store opens, ``watch(store)`` once it is open, and
    ``serving(loop)`` around the run. With ``WEB_ADDRESS = ""`` all three do nothing."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.endpoint = config.web_endpoint(settings.web_address)
        self.metrics = Metrics() if self.endpoint else None
        self._log: Any = None
        self.url: str | None = None  # once serving

    def metered(self, event_log: Log) -> Log:
        if self.metrics is None:
            return event_log
        self._log = self.metrics.metered(event_log)
        return self._log

    def watch(self, store: Store) -> None:
        if self.metrics is not None:
            self.metrics.watch(store)

    @contextlib.contextmanager
    def serving(self, loop: Loop) -> Iterator[StatusWeb]:
        """Publish a board each time the loop writes its status, and serve it. A port
        already taken is logged and the daemon goes on without the page."""
        if self.endpoint is None or self.metrics is None:
            yield self
            return
        server = self._bind()
        if server is None:
            yield self
            return
        server.publisher = Publisher(loop, self.metrics, self._snapshot_seq)
        loop.on_status.append(server.publisher.publish)
        thread = threading.Thread(target=server.serve_forever, name="comfy-dual-web",
                                  kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)

    def _snapshot_seq(self) -> int:
        return getattr(self._log, "snapshot_seq", 0)

    def _bind(self) -> WebServer | None:
        assert self.endpoint is not None
        host, port = self.endpoint
        if not is_loopback(host):
            log.warning("⚠️ the status page and /metrics listen on a non-loopback address: "
                        "anyone who can reach it sees every batch, prompt and server",
                        address=self.settings.web_address)
        try:
            server = WebServer((host, port), StateDir(self.settings.state_dir))
        except OSError as exc:
            log.warning("⚠️ cannot serve the status page; going on without it (set "
                        "WEB_ADDRESS to a free HOST:PORT, or \"\" for none)",
                        address=self.settings.web_address, error=exc.strerror or str(exc))
            return None
        bound_port = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}/"
        log.info(f"🌐 status page at {self.url} (Prometheus metrics at {self.url}metrics)")
        return server


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    publisher: Publisher  # set before it serves

    def __init__(self, address: tuple[str, int], state: StateDir) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.outputs = state.outputs.resolve()
        # Bound to loopback, only a loopback name may be asked for: a web page elsewhere
        # whose name an attacker points at 127.0.0.1 (DNS rebinding) gets nothing.
        self.loopback_only = is_loopback(address[0])
        self._svg: tuple[int, bytes] | None = None  # (board version, drawing)
        self._svg_lock = threading.Lock()
        super().__init__(address, Handler)

    @property
    def board(self) -> Board | None:
        return self.publisher.board

    def gantt_svg(self, board: Board) -> bytes | None:
        """The board's chart drawn once per board, whoever asks first."""
        if board.chart is None:
            return None
        with self._svg_lock:
            if self._svg is None or self._svg[0] != board.version:
                self._svg = (board.version, render_svg(board.chart).encode())
            return self._svg[1]


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "comfy-dual"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web request", line=format % args)

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _refuse(self) -> None:
        """405; the connection is closed, so a body sent with the request is never read
        as the next request."""
        self.close_connection = True
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n",
                   "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD", "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _route(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        board = self.server.board
        if self.server.loopback_only and not loopback_name(self.headers.get("Host", "")):
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"this server answers to loopback "
                       b"names only (localhost, 127.0.0.1, [::1])\n", "text/plain", body=body)
        elif path in ("/", "/index.html"):
            self._static("index.html", body)
        elif path.startswith("/static/"):
            self._static(path.removeprefix("/static/"), body)
        elif path == "/metrics":
            text = self.server.publisher.metrics.text()
            self._send(HTTPStatus.OK, text, CONTENT_TYPE_LATEST, body=body)
        elif path.startswith("/outputs/"):
            self._video(unquote(path.removeprefix("/outputs/")), body)
        elif board is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"starting\n", "text/plain",
                       body=body, extra={"Retry-After": "1"})
        elif path == "/api/status":
            self._send(HTTPStatus.OK, board.status, "application/json", body=body)
        elif path == "/api/board":
            self._send(HTTPStatus.OK, board.page, "application/json", body=body)
        elif path == "/gantt.svg":
            svg = self.server.gantt_svg(board)
            if svg is None:
                self._send(HTTPStatus.NOT_FOUND, b"nothing ran yet\n", "text/plain", body=body)
            else:
                self._send(HTTPStatus.OK, svg, "image/svg+xml", body=body)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body=body)

    def _static(self, name: str, body: bool) -> None:
        """A file of service/static/ by its exact name (no subdirectories)."""
        kind = STATIC_TYPES.get(Path(name).suffix)
        path = STATIC / name
        if "/" in name or name.startswith(".") or kind is None or not path.is_file():
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body=body)
            return
        self._send(HTTPStatus.OK, path.read_bytes(), kind, body=body,
                   extra={"Cache-Control": "no-cache"})

    def _video(self, relative: str, body: bool) -> None:
        """A regular file under STATE_DIR/outputs/, of a video or image type only."""
        outputs = self.server.outputs
        try:
            path = (outputs / relative).resolve()
            ok = path.is_relative_to(outputs) and path.is_file() and "\x00" not in relative
        except (OSError, ValueError):
            ok = False
        kind = VIDEO_TYPES.get(path.suffix.lower()) if ok else None
        if kind is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body=body)
            return
        try:
            with open(path, "rb") as f:
                self._file(f, os.fstat(f.fileno()).st_size, kind, body)
        except OSError:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body=body)

    def _file(self, f: Any, size: int, kind: str, body: bool) -> None:
        """The whole file, or the one byte range asked for (browsers seek in videos so)."""
        start, end = 0, size - 1
        status = HTTPStatus.OK
        asked = _RANGE.match(self.headers.get("Range", ""))
        if asked and (asked.group(1) or asked.group(2)):
            first, last = asked.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start = max(0, size - int(last))
            if start > end or start >= size:
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain",
                           body=body, extra={"Content-Range": f"bytes */{size}"})
                return
            status = HTTPStatus.PARTIAL_CONTENT
        length = max(0, end - start + 1)
        headers = {"Accept-Ranges": "bytes"}
        if status is HTTPStatus.PARTIAL_CONTENT:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._head(status, kind, length, headers)
        if body:
            f.seek(start)
            while length > 0:
                data = f.read(min(CHUNK, length))
                if not data:
                    break
                self.wfile.write(data)
                length -= len(data)

    def _send(self, status: HTTPStatus, data: bytes, kind: str, *, body: bool = True,
              extra: dict[str, str] | None = None) -> None:
        self._head(status, kind, len(data), extra or {})
        if body:
            self.wfile.write(data)

    def _head(self, status: HTTPStatus, kind: str, length: int, extra: dict[str, str]
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        for name, value in {**SECURITY_HEADERS, **extra}.items():
            self.send_header(name, value)
        self.end_headers()

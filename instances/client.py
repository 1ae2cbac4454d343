"""HTTP and websocket client for one ComfyUI server.

Every failure leaves the client as a comfy-dual error, never a raw ``requests`` or
``websocket`` exception:

- the server cannot be reached (refused, reset, timed out) -> ``InstanceUnreachable``;
- it refused the graph (400 with ``node_errors``) -> ``WorkflowRejected``, a
  ``PermanentDispatchError`` carrying the parsed body;
- any other 4xx -> ``PermanentDispatchError``; 5xx -> ``ServerError``.

``InstanceUnreachable`` and ``ServerError`` are both ``InstanceTrouble``: the server's
trouble, not the job's.

A read timeout on ``submit`` does not say whether the server queued the prompt: the caller
must look the prompt_id up in ``history()`` and ``queue()`` before posting it again.

Threads: the dispatcher, the poller and the health checker share one client per instance.
``requests.Session`` is not documented as thread-safe, and one Session behind a lock would
let a slow ``view`` download stall every health check, so each thread gets its own Session
(``threading.local``): connection reuse per thread, no shared mutable state.

What requests takes from the environment (proxies, ``no_proxy``, CA bundle) is read once
per client, not on every request (``trust_env`` off): those lookups cost more CPU than the
request itself on the path from a job ready to its POST. For the same reason ``POST
/prompt`` is a copy of a request prepared once, given its body, sent with
``Session.send`` (measured: a third less CPU than ``Session.post``).
"""

from __future__ import annotations

import contextlib
import random
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import orjson
import requests
import structlog
import websocket

from statemachine.errors import (
    BadConfig,
    ComfyDualError,
    InstanceUnreachable,
    PermanentDispatchError,
    ServerError,
)

log = structlog.get_logger(__name__)

Status = Literal["success", "error", "interrupted"]
T = TypeVar("T")


class WorkflowRejected(PermanentDispatchError):
    """POST /prompt answered 400: the graph is invalid on that server.

    ``error`` is the top-level ``error`` dict and ``node_errors`` the per-node dict, both as
    ComfyUI sent them; the message lists every node error in one readable line each.
    """

    def __init__(self, message: str, error: Mapping[str, Any], node_errors: Mapping[str, Any]):
        super().__init__(message)
        self.error = dict(error)
        self.node_errors = dict(node_errors)


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How a finished prompt ended; ``outputs`` is node id -> output dict as ComfyUI reported."""

    status: Status
    outputs: dict[str, Any]
    error: str | None


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """prompt_ids running and pending (pending in the server's heap order, not run order)."""

    running: tuple[str, ...]
    pending: tuple[str, ...]

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


# --- parsing: pure functions over response bodies --------------------------------------


def node_errors_text(node_errors: Mapping[str, Any]) -> list[str]:
    """``node 1 (EmptyImage): value_smaller_than_min: Value 0 smaller than min of 1 (width)``."""
    lines = []
    for node_id, entry in node_errors.items():
        for err in entry.get("errors", []):
            details = f" ({err['details']})" if err.get("details") else ""
            lines.append(f"node {node_id} ({entry.get('class_type', '?')}): "
                         f"{err.get('type', 'error')}: {err.get('message', '')}{details}")
    return lines


def rejection_text(body: Mapping[str, Any]) -> str:
    """One readable message for a 400 body: the top-level error, then every node error."""
    error = body.get("error") or {}
    if isinstance(error, str):
        error = {"message": error}
    head = f"{error.get('type', 'invalid_prompt')}: {error.get('message', '')}".rstrip(": ")
    if error.get("details"):
        head += f" ({error['details']})"
    return "; ".join([head, *node_errors_text(body.get("node_errors") or {})])


def execution_error_text(data: Mapping[str, Any]) -> str:
    """``PIL.UnidentifiedImageError: cannot identify ... (node 1, LoadImage)``."""
    kind = data.get("exception_type") or "error"
    message = str(data.get("exception_message", "")).strip()
    return f"{kind}: {message} (node {data.get('node_id')}, {data.get('node_type')})"


def _message_event(message: Any) -> tuple[str, Any]:
    """Both history shapes: upstream ``[event, data]`` pairs, the fork's ``"event: text"``."""
    if isinstance(message, list | tuple) and message:
        return str(message[0]), message[1] if len(message) > 1 else None
    event, _, text = str(message).partition(": ")
    return event, text.strip() or None


def _failure(event: str, data: Any) -> tuple[Status, str] | None:
    """The outcome an ``execution_error``/``execution_interrupted`` message stands for (its
    data a dict from the websocket or upstream history, or the fork's plain text)."""
    if event == "execution_interrupted":
        where = f" at node {data.get('node_id')}" if isinstance(data, dict) else ""
        return "interrupted", f"interrupted{where}"
    if event == "execution_error":
        text = execution_error_text(data) if isinstance(data, dict) else data
        return "error", text or "execution error"
    return None


def _outcome_from_messages(status_str: str | None, messages: Sequence[Any]
                           ) -> tuple[Status, str | None]:
    for event, data in map(_message_event, messages):
        if (failure := _failure(event, data)) is not None:
            return failure
    if status_str in (None, "success"):
        return "success", None
    return "error", f"status {status_str}"


def parse_history(body: Mapping[str, Any], prompt_id: str) -> JobOutcome | None:
    """The outcome of ``prompt_id`` in a ``/history/<id>`` body; None while unknown/unfinished."""
    entry = body.get(prompt_id)
    if not entry:
        return None
    status = entry.get("status") or {}  # written at the end of a run: an entry is finished
    kind, error = _outcome_from_messages(status.get("status_str"), status.get("messages", []))
    return JobOutcome(kind, dict(entry.get("outputs") or {}), error)


def _queue_item_id(item: Any) -> str:
    """Upstream items are arrays ``[number, prompt_id, ...]``; the fork's are objects."""
    return str(item["prompt_id"] if isinstance(item, dict) else item[1])


def parse_queue(body: Mapping[str, Any]) -> QueueSnapshot:
    return QueueSnapshot(tuple(_queue_item_id(i) for i in body.get("queue_running", [])),
                         tuple(_queue_item_id(i) for i in body.get("queue_pending", [])))


# --- HTTP ------------------------------------------------------------------------------


def _check_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadConfig(f"ComfyUI URL {base_url!r} must look like http://host:port")
    return base_url.rstrip("/")


def _seg(text: str) -> str:
    """``text`` as one URL path segment."""
    return quote(text, safe="")


def _body(resp: requests.Response) -> Any:
    try:
        return orjson.loads(resp.content) if resp.content else None
    except orjson.JSONDecodeError:
        return None


def _status_error(resp: requests.Response, what: str) -> ComfyDualError:
    text = resp.text.strip().replace("\n", " ")[:300] or "(empty body)"
    message = f"{what} -> HTTP {resp.status_code}: {text}"
    if resp.status_code >= 500:
        return ServerError(message)
    return PermanentDispatchError(message)


class ComfyClient:
    """One ComfyUI server's HTTP API; safe to share between threads (a Session per thread)."""

    def __init__(self, base_url: str, *, connect_timeout: float = 3.05,
                 read_timeout: float = 30.0) -> None:
        self.base_url = _check_base_url(base_url)
        self.timeout = (connect_timeout, read_timeout)
        with requests.Session() as probe:  # what the environment says for this server
            self._environ = probe.merge_environment_settings(self.base_url, {}, None, None,
                                                             None)
            probe.trust_env = False
            self._prompt_post = probe.prepare_request(requests.Request(
                "POST", self.base_url + "/prompt", headers={"Content-Type": "application/json"}))
        self._local = threading.local()
        # weak: a thread that ends takes its Session with it; close() reaches the rest
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ComfyClient({self.base_url!r})"

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's Session (their pooled connections)."""
        with self._lock:
            sessions = list(self._sessions)
            self._sessions.clear()
        for session in sessions:
            session.close()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False
            session.proxies.update(self._environ["proxies"])
            session.verify = self._environ["verify"]
            with self._lock:
                self._sessions.add(session)
        return session

    def _request(self, method: str, path: str, *, ok: Iterable[int] = (200,),
                 **kwargs: Any) -> requests.Response:
        """Send one request; statuses outside ``ok`` become comfy-dual errors."""
        return self._send(f"{method} {self.base_url}{path}", ok, lambda session: session.request(
            method, self.base_url + path, timeout=self.timeout, **kwargs))

    def _send(self, what: str, ok: Iterable[int],
              call: Callable[[requests.Session], requests.Response]) -> requests.Response:
        try:
            resp = call(self._session())
        except requests.RequestException as exc:
            raise InstanceUnreachable(f"{what}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code not in ok:
            raise _status_error(resp, what)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        body = _body(resp)
        if body is None:
            raise ServerError(f"{method} {self.base_url}{path}: expected JSON, got "
                                         f"{resp.text[:200]!r}")
        return body

    def system_stats(self) -> dict[str, Any]:
        """The health check: OS, versions and devices of the server."""
        return self._json("GET", "/system_stats")

    def object_info(self, class_type: str | None = None) -> dict[str, Any]:
        """Every node class (or one; ``{}`` when the server does not know it)."""
        return self._json("GET", "/object_info" + (f"/{_seg(class_type)}" if class_type else ""))

    def submit(self, graph: Mapping[str, Any], *, prompt_id: str, client_id: str,
               extra_data: Mapping[str, Any] | None = None) -> int:
        """POST /prompt under a client-chosen prompt_id; returns the queue number."""
        payload = {"prompt": graph, "prompt_id": prompt_id, "client_id": client_id,
                   "extra_data": dict(extra_data or {})}
        try:
            data = orjson.dumps(payload)
        except orjson.JSONEncodeError as exc:  # e.g. an int beyond 64 bits
            raise PermanentDispatchError(f"prompt {prompt_id} cannot be sent as JSON: {exc}"
                                         ) from exc
        post = self._prompt_post.copy()
        post.prepare_body(data, None)
        resp = self._send(f"POST {self.base_url}/prompt", (200, 400),
                          lambda session: session.send(post, timeout=self.timeout))
        body = _body(resp)
        if resp.status_code == 400:
            raise _rejection(body, resp, self.base_url)
        if not isinstance(body, dict) or "number" not in body:
            raise ServerError(f"POST {self.base_url}/prompt: unexpected answer "
                                         f"{resp.text[:200]!r}")
        self._check_accepted(body, prompt_id)
        return int(body["number"])

    def _check_accepted(self, body: Mapping[str, Any], prompt_id: str) -> None:
        if str(body.get("prompt_id")) != prompt_id:
            with contextlib.suppress(ComfyDualError):
                self.delete_from_queue([str(body.get("prompt_id"))])
            raise PermanentDispatchError(
                f"{self.base_url} ignored the client-chosen prompt_id {prompt_id} (it queued "
                f"{body.get('prompt_id')}, now deleted): the server is too old for comfy-dual")
        if body.get("node_errors"):
            log.warning("prompt accepted with invalid outputs", server=self.base_url,
                        prompt_id=prompt_id, errors=node_errors_text(body["node_errors"]))

    def _get_parsed(self, path: str, parse: Callable[[Any], T]) -> T:
        """GET ``path`` and parse the JSON; an unexpected shape is a ServerError."""
        body = self._json("GET", path)
        try:
            return parse(body)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise ServerError(f"GET {self.base_url}{path}: answer in an unknown "
                                         f"shape ({exc!r}): {str(body)[:200]}") from exc

    def history(self, prompt_id: str) -> JobOutcome | None:
        """The finished outcome of ``prompt_id``; None while unknown or still unfinished."""
        return self._get_parsed(f"/history/{_seg(prompt_id)}",
                                lambda body: parse_history(body, prompt_id))

    def queue(self) -> QueueSnapshot:
        return self._get_parsed("/queue", parse_queue)

    def delete_from_queue(self, prompt_ids: Iterable[str]) -> None:
        """Remove pending prompts (running and unknown ids are ignored by the server)."""
        ids = list(prompt_ids)
        if ids:
            self._request("POST", "/queue", json={"delete": ids})

    def interrupt(self, prompt_id: str) -> bool:
        """Interrupt ``prompt_id`` only if it is the one running; returns whether it did.

        The /queue check protects other jobs on servers that ignore the body's prompt_id.
        """
        if prompt_id not in self.queue().running:
            return False
        self._request("POST", "/interrupt", json={"prompt_id": prompt_id})
        return True

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """The bytes of an output (or input/temp) file; PermanentDispatchError on 404."""
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        return self._request("GET", "/view", params=params).content

    def upload(self, data: bytes, filename: str, subfolder: str = "", type: str = "input",
               overwrite: bool = True) -> dict[str, Any]:
        """POST /upload/image; returns ``{"name", "subfolder", "type"}`` as stored."""
        form = {"subfolder": subfolder, "type": type, "overwrite": str(overwrite).lower()}
        return self._json("POST", "/upload/image", files={"image": (filename, data)}, data=form)


def _rejection(body: Any, resp: requests.Response, base_url: str) -> ComfyDualError:
    if not isinstance(body, dict):
        return _status_error(resp, f"POST {base_url}/prompt")
    error = body.get("error") or {}
    return WorkflowRejected(f"{base_url} rejected the workflow: {rejection_text(body)}",
                            error if isinstance(error, dict) else {"message": error},
                            body.get("node_errors") or {})


# --- websocket -------------------------------------------------------------------------

EventKind = Literal["connected", "disconnected", "started", "cached", "progress", "executing",
                    "executed", "success", "error", "interrupted", "finished"]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One thing the server said about a prompt (or about the connection itself)."""

    kind: EventKind
    prompt_id: str | None
    data: dict[str, Any]


_SIMPLE_KINDS: dict[str, EventKind] = {
    "execution_start": "started",
    "execution_success": "success",
    "execution_error": "error",
    "execution_interrupted": "interrupted",
}
_ENDINGS = {kind: event for event, kind in _SIMPLE_KINDS.items() if kind != "started"}


@dataclass(slots=True)
class StreamedRun:
    """One run of a prompt as the stream told it from its ``execution_start`` on: how it
    ended and what ``executed`` reported, the same outputs ``/history`` lists.

    ComfyUI sends every message of a run to its client, in order, on one connection: a run
    followed from its start on a connection that stayed up is the whole story, and the
    ``/history`` request after it can be spared. Only the stream's thread touches one.
    """

    outputs: dict[str, Any] = field(default_factory=dict)
    ending: tuple[Status, str | None] | None = None
    cached: bool = False

    def add(self, event: StreamEvent) -> None:
        if event.kind == "executed" and event.data.get("output"):
            self.outputs[str(event.data.get("node"))] = event.data["output"]
        elif event.kind == "cached":
            self.cached = self.cached or bool(event.data.get("nodes"))
        elif event.kind in _ENDINGS:
            self.ending = _failure(_ENDINGS[event.kind], event.data) or ("success", None)

    def outcome(self) -> JobOutcome | None:
        """How it ended; None if only ``/history`` can tell: no end message was seen, or
        nodes came from the cache (some ComfyUI versions send no ``executed`` for those)."""
        if self.ending is None or self.cached:
            return None
        status, error = self.ending
        return JobOutcome(status, dict(self.outputs), error)


def parse_ws_message(text: str | bytes) -> StreamEvent | None:
    """A text frame as a StreamEvent; None for messages comfy-dual does not follow."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        msg = None
    if not isinstance(msg, dict) or not isinstance(msg.get("data") or {}, dict):
        log.warning("unreadable websocket message", message=str(text)[:200])
        return None
    kind, data = msg.get("type"), msg.get("data") or {}
    prompt_id = data.get("prompt_id")
    if kind in _SIMPLE_KINDS:
        return StreamEvent(_SIMPLE_KINDS[kind], prompt_id, data)
    if kind == "progress":
        return StreamEvent("progress", prompt_id,
                           {k: data.get(k) for k in ("node", "value", "max")})
    if kind == "executing":
        if data.get("node") is None:
            return StreamEvent("finished", prompt_id, {})
        return StreamEvent("executing", prompt_id, {"node": data["node"]})
    if kind == "executed":
        return StreamEvent("executed", prompt_id,
                           {"node": data.get("node"), "output": data.get("output")})
    if kind == "execution_cached":
        return StreamEvent("cached", prompt_id, {"nodes": data.get("nodes") or []})
    return None


def ws_url(base_url: str, client_id: str) -> str:
    """``http://h:p`` -> ``ws://h:p/ws?clientId=<id>`` (``https`` -> ``wss``)."""
    base = _check_base_url(base_url)
    scheme = "wss" if base.startswith("https:") else "ws"
    return f"{scheme}:{base.split(':', 1)[1]}/ws?clientId={quote(client_id)}"


def backoff_delay(attempt: int, max_delay: float, base: float = 0.1) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(max_delay, base * 2 ** min(attempt, 30))
    return delay / 2 + random.uniform(0, delay / 2)


class Frames(Protocol):
    """What EventStream reads a link by (``websocket.WebSocket`` has it)."""

    def recv_data(self, control_frame: bool = False) -> tuple[Any, ...]: ...
    def ping(self) -> None: ...


class EventStream:
    """Follows ``/ws?clientId=...`` on its own daemon thread and reconnects when it drops.

    ``on_event`` runs on that thread; an exception in it is logged and the stream goes on.
    Messages sent while the stream is down are lost: after ``disconnected``/``connected``
    the caller should ask ``ComfyClient.history``/``queue`` about the prompts in flight.
    A connection that is silent for ``idle_timeout`` seconds gets a ping; silent for as
    long again and it is taken as dead (a half-open TCP connection never reports itself).
    """

    def __init__(self, base_url: str, client_id: str,
                 on_event: Callable[[StreamEvent], None], *,
                 reconnect_max_delay: float = 10.0, connect_timeout: float = 3.05,
                 idle_timeout: float = 15.0) -> None:
        self.url = ws_url(base_url, client_id)
        self._on_event = on_event
        self._max_delay = reconnect_max_delay
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ws: websocket.WebSocket | None = None
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._ws is not None and self._ws.connected

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EventStream already started")
        self._thread = threading.Thread(target=self._run, name=f"ws {self.url}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the connection and end the thread; returns within about a second."""
        self._stop.set()
        with self._lock:
            ws = self._ws
        if ws is not None:
            ws.abort()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            ws = self._connect()
            if ws is not None:
                attempt = 0
                self._emit(StreamEvent("connected", None, {}))
                reason = self._receive(ws)
                self._close(ws)
                self._emit(StreamEvent("disconnected", None, {"reason": reason}))
            self._stop.wait(backoff_delay(attempt, self._max_delay))
            attempt += 1

    def _connect(self) -> websocket.WebSocket | None:
        try:
            # UTF-8 is checked by orjson when a frame is parsed; websocket-client's own check
            # is pure Python, byte by byte, and took most of the daemon's CPU under load.
            ws = websocket.create_connection(self.url, timeout=self._connect_timeout,
                                             skip_utf8_validation=True)
        except (websocket.WebSocketException, OSError) as exc:
            log.debug("websocket connect failed", url=self.url, error=str(exc))
            return None
        ws.settimeout(self._idle_timeout)
        with self._lock:
            self._ws = ws
        if self._stop.is_set():  # stop() ran before the socket was visible to it
            self._close(ws)
            return None
        return ws

    def _close(self, ws: websocket.WebSocket) -> None:
        with self._lock:
            self._ws = None
        ws.shutdown()

    def _receive(self, ws: Frames) -> str:
        """Read frames until the connection fails; returns why it ended.

        Control frames are asked for too: a pong is the answer that keeps a quiet link alive.
        """
        pinged = False
        while not self._stop.is_set():
            try:
                opcode, payload = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                if pinged:
                    return f"no answer for {2 * self._idle_timeout:g} s"
                pinged = True
                with contextlib.suppress(websocket.WebSocketException, OSError):
                    ws.ping()  # a dead link shows as the next recv failing or timing out
                continue
            except (websocket.WebSocketException, OSError) as exc:
                return f"{type(exc).__name__}: {exc}"
            pinged = False
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self._handle(payload)
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return "closed by server"
        return "stopped"

    def _handle(self, payload: bytes) -> None:
        event = parse_ws_message(payload)
        if event is not None:
            self._emit(event)

    def _emit(self, event: StreamEvent) -> None:
        if self._stop.is_set():
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("websocket event handler failed", url=self.url, kind=event.kind,
                          prompt_id=event.prompt_id)

"""The HTTP routes of the ComfyUI simulator (aiohttp, like ComfyUI itself), in groups that
each serve one part of the API: prompts and the queue, history, server information, files
and the debug knobs.

Routes, status codes and bodies follow ComfyUI's ``server.py`` and the recorded answers
of a real server; see ``comfyui-api.md``.
"""

from __future__ import annotations

import platform
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from simulator.config import FaultSwitch, SimConfig
from simulator.files import SimFiles
from simulator.graph import NodeCatalog, check_structure, validate_prompt
from simulator.sockets import Hub
from simulator.state import Number, PromptQueue, QueueItem
from simulator.worker import Ledger, Worker, now_ms
from statemachine.errors import BadConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]

CRASH_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
MAX_UPLOAD = 100 * 1024 * 1024
FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD,
            "extension": {"manager": {"supports_v4": True}}}
FAKE_MEMORY = 24 * 1024**3


def crash_response() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises: 500, plain text."""
    return web.Response(status=500, text=CRASH_TEXT)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    """The request body if it is a JSON object, else ``None``."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _no_prompt() -> web.Response:
    error = {"type": "no_prompt", "message": "No prompt provided",
             "details": "No prompt provided", "extra_info": {}}
    return _json({"error": error, "node_errors": {}}, status=400)


class QueueRoutes:
    """Submitting prompts (with ComfyUI's ``number`` counter), the queue and interrupts."""

    def __init__(self, config: SimConfig, catalog: NodeCatalog, files: SimFiles,
                 queue: PromptQueue, hub: Hub, worker: Worker, faults: FaultSwitch) -> None:
        self.config = config
        self.catalog = catalog
        self.files = files
        self.queue = queue
        self.hub = hub
        self.worker = worker
        self.faults = faults
        self._counter = 0

    def routes(self) -> list[Route]:
        return [("POST", "/prompt", self.post_prompt), ("GET", "/prompt", self.get_prompt),
                ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
                ("POST", "/interrupt", self.interrupt)]

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            return await self._submit(await request.json())
        except (ValueError, TypeError, AttributeError) as ex:
            request.app.logger.debug("POST /prompt crashed like ComfyUI would: %s", ex)
            return crash_response()

    async def _submit(self, body: dict[str, Any]) -> web.Response:
        number = self._next_number(body)
        if "prompt" not in body:
            return _no_prompt()
        prompt = body["prompt"]
        check_structure(prompt)
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        validation = validate_prompt(prompt, self.catalog,
                                     lambda name: self.files.input_path(name) is not None)
        extra_data = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if validation.error:
            return _json({"error": validation.error, "node_errors": validation.node_errors}, 400)
        extra_data["create_time"] = now_ms()
        self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, validation.good_outputs))
        await self.hub.status()
        return _json({"prompt_id": prompt_id, "number": number,
                      "node_errors": validation.node_errors})

    def _next_number(self, body: dict[str, Any]) -> Number:
        """ComfyUI's numbering: an explicit ``number`` (a float), else the counter, negated
        for ``front``; only the counter path advances the counter."""
        if "number" in body:
            return float(body["number"])
        number = -self._counter if body.get("front") else self._counter
        self._counter += 1
        return number

    async def get_prompt(self, request: web.Request) -> web.Response:
        return _json({"exec_info": {"queue_remaining": self.queue.remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        shape = self.config.queue_item_shape
        running = [self.queue.running.render(shape)] if self.queue.running else []
        return _json({"queue_running": running,
                      "queue_pending": [item.render(shape) for item in self.queue.pending()]})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return crash_response()
        before = self.queue.remaining()
        if body.get("clear"):
            self.queue.clear()
        if "delete" in body:
            self.queue.delete(body["delete"])
        if self.queue.remaining() != before:
            await self.hub.status()
        return web.Response()

    async def interrupt(self, request: web.Request) -> web.Response:
        """Interrupt the running job; with ``prompt_id``, only if that is the one running."""
        body = await _json_object(request) or {}
        if not self.faults.current.deaf_to_interrupts:
            self.worker.interrupt(body.get("prompt_id") or None)
        return web.Response()


class HistoryRoutes:
    """The history of finished prompts: pages of it, one entry, clearing and deleting."""

    def __init__(self, queue: PromptQueue) -> None:
        self.queue = queue

    def routes(self) -> list[Route]:
        return [("GET", "/history", self.get_history),
                ("GET", "/history/{prompt_id}", self.get_history_item),
                ("POST", "/history", self.post_history)]

    async def get_history(self, request: web.Request) -> web.Response:
        try:
            max_items, offset = (int(request.query[k]) if k in request.query else None
                                 for k in ("max_items", "offset"))
        except ValueError:
            return crash_response()
        return _json(self.queue.history_page(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.queue.history.get(prompt_id)
        return _json({} if entry is None else {prompt_id: entry})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return crash_response()
        if body.get("clear"):
            self.queue.history.clear()
        for prompt_id in body.get("delete", []):
            self.queue.history.pop(prompt_id, None)
        return web.Response()


class InfoRoutes:
    """What the server says about itself: system stats, features, its node classes."""

    def __init__(self, catalog: NodeCatalog) -> None:
        self.catalog = catalog

    def routes(self) -> list[Route]:
        return [("GET", "/system_stats", self.system_stats), ("GET", "/features", self.features),
                ("GET", "/object_info", self.object_info),
                ("GET", "/object_info/{node_class}", self.object_info),
                ("POST", "/free", self.free)]

    async def system_stats(self, request: web.Request) -> web.Response:
        memory = {"vram_total": FAKE_MEMORY, "vram_free": FAKE_MEMORY,
                  "torch_vram_total": FAKE_MEMORY, "torch_vram_free": FAKE_MEMORY}
        return _json({
            "system": {"os": sys.platform, "ram_total": FAKE_MEMORY, "ram_free": FAKE_MEMORY,
                       "comfyui_version": "0.12.1", "required_frontend_version": "1.58.1",
                       "installed_templates_version": "", "required_templates_version": "0.7.51",
                       "python_version": sys.version, "pytorch_version": "simulated",
                       "embedded_python": False, "argv": ["comfy-dual-simulator"]},
            "devices": [{"name": f"simulator ({platform.machine()})", "type": "cpu",
                         "index": None, **memory}],
        })

    async def features(self, request: web.Request) -> web.Response:
        return _json(FEATURES)

    async def object_info(self, request: web.Request) -> web.Response:
        return _json(self.catalog.describe(request.match_info.get("node_class")))

    async def free(self, request: web.Request) -> web.Response:
        return web.Response()


class FileRoutes:
    """Downloading files (``/view``) and uploading them (``/upload/image``)."""

    def __init__(self, files: SimFiles) -> None:
        self.files = files

    def routes(self) -> list[Route]:
        return [("GET", "/view", self.view), ("POST", "/upload/image", self.upload_image)]

    async def view(self, request: web.Request) -> web.StreamResponse:
        """A file of the output/input/temp directory; 404 (empty) when missing or escaping."""
        query = request.query
        path = self.files.view_path(query.get("filename", ""), query.get("subfolder", ""),
                                    query.get("type", "output"))
        if path is None:
            return web.Response(status=404)
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField):
            return web.Response(status=400)
        subfolder, folder = str(post.get("subfolder", "")), str(post.get("type") or "input")
        name = self.files.upload(image.filename, subfolder, folder, image.file.read(),
                                 overwrite=post.get("overwrite") in ("true", "1"))
        if name is None:
            return web.Response(status=400)
        return _json({"name": name, "subfolder": subfolder, "type": folder})


class DebugRoutes:
    """The simulator's own routes (no ComfyUI has them): fault knobs and executions."""

    def __init__(self, faults: FaultSwitch, ledger: Ledger) -> None:
        self.faults = faults
        self.ledger = ledger

    def routes(self) -> list[Route]:
        return [("GET", "/debug/faults", self.get_faults),
                ("POST", "/debug/faults", self.set_faults),
                ("GET", "/debug/executions", self.executions)]

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(self.faults.current.to_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        """Change fault knobs: ``{"http_500": true, ...}``; 400 names an unknown knob."""
        knobs = await _json_object(request)
        if knobs is None:
            return _json({"error": "the body must be a JSON object of knobs"}, status=400)
        try:
            return _json(self.faults.update(knobs).to_dict())
        except BadConfig as ex:
            return _json({"error": str(ex)}, status=400)

    async def executions(self, request: web.Request) -> web.Response:
        return _json({"executions": self.ledger.executions(), "counts": self.ledger.counts()})

"""One life of a simulated ComfyUI server: its parts, the aiohttp application that serves
their routes (every one also under ``/api``, as ComfyUI does), the fault knobs that
apply to every answer, and the start and end of it all.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from simulator.config import FaultSwitch, SimConfig
from simulator.files import SimFiles
from simulator.graph import NodeCatalog
from simulator.routes import (
    MAX_UPLOAD,
    DebugRoutes,
    FileRoutes,
    Handler,
    HistoryRoutes,
    InfoRoutes,
    QueueRoutes,
    Route,
    crash_response,
)
from simulator.sockets import Hub
from simulator.state import PromptQueue
from simulator.worker import Ledger, Worker, WorkerContext

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 1.0


def _report_crash(task: asyncio.Task[None]) -> None:
    """A worker that dies of a bug must not go unnoticed (it stops all execution)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("simulator worker crashed", exc_info=task.exception())


class SimServer:
    """One life of a simulated ComfyUI server: queue, history, clients and the worker."""

    def __init__(self, config: SimConfig, files: SimFiles, ledger: Ledger,
                 faults: FaultSwitch) -> None:
        self._faults = faults
        catalog = NodeCatalog(files.list_inputs)
        queue = PromptQueue()
        self._hub = Hub(queue)
        self._worker = Worker(WorkerContext(config, lambda: faults.current, catalog, files,
                                           queue, self._hub, ledger))
        self._routes: list[Route] = [
            ("GET", "/ws", self._hub.connect),
            *QueueRoutes(config, catalog, files, queue, self._hub, self._worker, faults).routes(),
            *HistoryRoutes(queue).routes(), *InfoRoutes(catalog).routes(),
            *FileRoutes(files).routes(), *DebugRoutes(faults, ledger).routes(),
        ]
        self._runner: web.AppRunner | None = None
        self._worker_task: asyncio.Task[None] | None = None

    async def open(self, host: str, port: int) -> int:
        """Start serving; the bound port (useful when ``port`` is 0)."""
        self._runner = web.AppRunner(self._app(), shutdown_timeout=SHUTDOWN_SECONDS,
                                     access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError:
            await self._runner.cleanup()
            raise
        self._worker_task = asyncio.create_task(self._worker.run_forever())
        self._worker_task.add_done_callback(_report_crash)
        return self._runner.addresses[0][1]

    async def close(self, abrupt: bool) -> None:
        """Stop: ``abrupt`` drops every connection without a word, like a killed process."""
        if self._worker_task is not None:
            self._worker_task.cancel()
            await asyncio.gather(self._worker_task, return_exceptions=True)
        await self._hub.close(abrupt)
        if self._runner is not None:
            await self._runner.cleanup()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD, middlewares=[self._fault_middleware])
        for prefix in ("", "/api"):
            app.router.add_routes([web.route(method, prefix + path, handler)
                                   for method, path, handler in self._routes])
        return app

    @web.middleware
    async def _fault_middleware(self, request: web.Request,
                                handler: Handler) -> web.StreamResponse:
        if request.path.startswith(("/debug/", "/api/debug/")):
            return await handler(request)
        faults = self._faults.current
        if faults.response_delay:
            await asyncio.sleep(faults.response_delay)
        failing = request.method == "GET" or request.path.endswith("/prompt")
        if faults.http_500 and failing:
            return crash_response()
        return await handler(request)

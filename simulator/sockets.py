"""The websocket side of one simulated ComfyUI life: the ``/ws`` clients, the messages
sent to them, and how their connections end with the server.

Everything here runs on the server's event loop; nothing is shared with other threads.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import WSCloseCode, web

from simulator.state import PromptQueue

log = logging.getLogger(__name__)


class Hub:
    """Websocket clients by ``clientId``; a reconnect with the same id replaces the old one."""

    def __init__(self, queue: PromptQueue) -> None:
        self._queue = queue
        self._by_sid: dict[str, web.WebSocketResponse] = {}
        self._transports: dict[web.WebSocketResponse, asyncio.Transport | None] = {}

    async def connect(self, request: web.Request) -> web.WebSocketResponse:
        """``/ws?clientId=``: a ``status`` with the sid, then the messages of its jobs."""
        transport = request.transport
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self._by_sid[sid] = ws
        self._transports[ws] = transport
        try:
            await self.status(sid)
            async for _ in ws:  # clients may send feature flags: nothing to do with them
                pass
        finally:
            self._transports.pop(ws, None)
            if self._by_sid.get(sid) is ws:
                del self._by_sid[sid]
        return ws

    async def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Send to one client, or to all when ``sid`` is ``None`` (ComfyUI's ``send_sync``)."""
        targets = list(self._by_sid.values()) if sid is None else [self._by_sid.get(sid)]
        for ws in targets:
            if ws is None or ws.closed:
                continue
            try:
                await ws.send_json({"type": event, "data": data})
            except (ConnectionError, RuntimeError) as ex:
                log.debug("dropping a message to a closing websocket: %s", ex)

    async def status(self, sid: str | None = None) -> None:
        """The queue's ``status``: to one client, or to all when ``sid`` is ``None``."""
        data: dict[str, Any] = {
            "status": {"exec_info": {"queue_remaining": self._queue.remaining()}}}
        if sid is not None:
            data["sid"] = sid
        await self.send("status", data, sid)

    async def close(self, abrupt: bool) -> None:
        """End every connection: ``abrupt`` drops it without a word, like a killed process."""
        for ws, transport in list(self._transports.items()):
            if abrupt and transport is not None:
                transport.abort()
            else:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

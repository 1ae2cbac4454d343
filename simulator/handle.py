"""A simulated ComfyUI server in-process, on its own thread (tests, ``--simulate``)::

    with start_simulator(config=SimConfig(durations={"HIGH": 0.5})) as sim:
        requests.post(sim.url + "/prompt", json={...})
        sim.kill(); sim.restart()          # a crash: queue and history are gone
        assert sim.counts()[prompt_id] == 1

The handle owns what outlives a server restart: config, fault knobs, directories and the
execution ledger. Each server life (queue, history, websocket clients, ``number``
counter) runs on its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from simulator.config import Faults, FaultSwitch, SimConfig
from simulator.files import SimFiles
from simulator.scratch import Scratch
from simulator.server import SimServer
from simulator.worker import Ledger

START_TIMEOUT = 10.0


class _Life:
    """One server life: a ``SimServer`` on a private event loop in a daemon thread."""

    def __init__(self, build: Callable[[], SimServer]) -> None:
        self._build = build
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="comfy-sim")
        self._server: SimServer | None = None

    def start(self, host: str, port: int) -> int:
        """Serve on ``host:port``; returns the bound port once connections are accepted."""
        self._thread.start()
        try:
            return self._call(self._open(host, port))
        except BaseException:
            self._halt()
            raise

    def end(self, abrupt: bool) -> None:
        try:
            if self._server is not None:
                self._call(self._server.close(abrupt))
        finally:
            self._halt()

    async def _open(self, host: str, port: int) -> int:
        self._server = self._build()
        return await self._server.open(host, port)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(START_TIMEOUT)

    def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class SimulatorHandle:
    """Controls one simulated server across its lives (start, kill, restart, stop)."""

    def __init__(self, config: SimConfig, host: str, port: int,
                 output_dir: Path | None, input_dir: Path | None) -> None:
        self.config = config
        self.host = host
        self.port = port
        self._given = (input_dir, output_dir)
        self._scratch = Scratch(self)
        self.files = self._files()
        self._ledger = Ledger()
        self._faults = FaultSwitch(config.faults)
        self._life: _Life | None = None

    def _files(self) -> SimFiles:
        return SimFiles.in_scratch(self._scratch.path, *self._given)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def scratch_dir(self) -> Path:
        return self._scratch.path

    @property
    def output_dir(self) -> Path:
        return self.files.dirs["output"]

    @property
    def input_dir(self) -> Path:
        return self.files.dirs["input"]

    def start(self) -> SimulatorHandle:
        """Start a fresh life (empty queue and history, ``number`` from 0) on ``port``."""
        if self._life is not None:
            raise RuntimeError(f"simulator on {self.url} is already running")
        if self._scratch.removed:  # started again after stop(): a fresh scratch directory
            self._scratch = Scratch(self)
            self.files = self._files()
        life = _Life(lambda: SimServer(self.config, self.files, self._ledger, self._faults))
        self.port = life.start(self.host, self.port)
        self._life = life
        return self

    def stop(self) -> None:
        """Shut down, closing websockets politely (if running, and even after ``kill``),
        and delete the scratch directory; the directories it was given stay."""
        try:
            self._end(abrupt=False)
        finally:
            self._scratch.remove()

    def kill(self) -> None:
        """Die like SIGKILL: connections dropped, queue and history forgotten."""
        self._end(abrupt=True)

    def restart(self) -> None:
        """Kill (if running) and start again on the same port; output files stay."""
        self.kill()
        self.start()

    def executions(self) -> list[dict[str, Any]]:
        """Every execution so far, across restarts, in start order."""
        return self._ledger.executions()

    def counts(self) -> dict[str, int]:
        """How many times each prompt_id started executing, across restarts."""
        return self._ledger.counts()

    def set_faults(self, **knobs: Any) -> Faults:
        """Change fault knobs now (they survive restarts); unknown names raise BadConfig."""
        return self._faults.update(knobs)

    @property
    def faults(self) -> Faults:
        return self._faults.current

    def _end(self, abrupt: bool) -> None:
        life, self._life = self._life, None
        if life is not None:
            life.end(abrupt)

    def __enter__(self) -> SimulatorHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_simulator(port: int = 0, config: SimConfig | None = None, *, host: str = "127.0.0.1",
                    output_dir: Path | None = None,
                    input_dir: Path | None = None) -> SimulatorHandle:
    """Start a simulated ComfyUI on its own thread; returns once it accepts connections.

    Without ``output_dir``/``input_dir`` it uses a scratch directory, deleted by ``stop()``.
    """
    handle = SimulatorHandle(config or SimConfig(), host, port, output_dir, input_dir)
    return handle.start()



"""A ComfyUI-API-compatible simulator, in-process (tests, ``--simulate``) or as a process.

In-process::

    with start_simulator(config=SimConfig(durations={"HIGH": 0.5})) as sim:
        requests.post(sim.url + "/prompt", json={...})
        sim.kill(); sim.restart()          # a crash: queue and history are gone
        assert sim.counts()[prompt_id] == 1

As a process (crash tests send it SIGKILL)::

    python -m instances.simulator --port 8188 --duration HIGH=1.0 --switch-cost 0.5

The handle owns what outlives a server restart: config, fault knobs, directories and the
execution ledger. Each server life (queue, history, websocket clients, ``number``
counter) runs on its own thread and event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from instances.sim_config import PROGRESS_NODES, Faults, FaultSwitch, JobTag, SimConfig
from instances.sim_files import SimFiles
from instances.sim_server import SimServer
from instances.sim_worker import Ledger
from statemachine.errors import BadConfig

__all__ = ["PROGRESS_NODES", "Faults", "JobTag", "SimConfig", "SimulatorHandle", "main",
           "start_simulator"]

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


SCRATCH_PREFIX = "comfy-sim-"
_SCRATCH_NAME = re.compile(rf"{SCRATCH_PREFIX}(\d+)-")


class Scratch:
    """A simulator's scratch directory in the system temp directory, for the input, output
    and temp directories it was not given. ``remove()`` deletes it (so does garbage
    collection of its owner, or the interpreter's exit). Its name holds this process's id,
    so a simulator killed with SIGKILL leaves a directory the next simulator started on
    this machine recognises as an orphan and deletes (``sweep_orphans``)."""

    def __init__(self, owner: object) -> None:
        sweep_orphans()
        self.path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        self._finalizer = weakref.finalize(owner, shutil.rmtree, self.path, ignore_errors=True)

    def remove(self) -> None:
        self._finalizer()

    @property
    def removed(self) -> bool:
        return not self._finalizer.alive


def sweep_orphans(directory: Path | None = None) -> list[Path]:
    """Delete the scratch directories of simulator processes that are gone; returns them."""
    root = Path(directory or tempfile.gettempdir())
    removed = []
    for entry in root.glob(f"{SCRATCH_PREFIX}*"):
        match = _SCRATCH_NAME.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
        input_dir, output_dir = self._given
        root = self._scratch.path
        return SimFiles(input_dir or root / "input", output_dir or root / "output",
                        root / "temp")

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


# --- process mode --------------------------------------------------------------------------


def _duration(text: str) -> tuple[str, float]:
    kind, sep, seconds = text.partition("=")
    try:
        if not sep or not kind:
            raise ValueError
        return kind, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=SECONDS") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instances.simulator",
                                description="A ComfyUI-API-compatible simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188, help="0 picks a free port")
    p.add_argument("--duration", type=_duration, action="append", default=[],
                   metavar="KIND=SECONDS", help="job duration by kind (repeatable)")
    p.add_argument("--default-duration", type=float, default=SimConfig.default_duration)
    p.add_argument("--switch-cost", type=float, default=0.0,
                   help="seconds added when a job's model differs from the previous one's")
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--progress-node", action="append", default=[], metavar="CLASS",
                   help="another node class with a progress bar (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queue-item-shape", choices=("array", "object"), default="array")
    p.add_argument("--history-message-shape", choices=("pair", "string"), default="pair")
    p.add_argument("--output-dir", type=Path)
    p.add_argument("--input-dir", type=Path)
    p.add_argument("--ledger", type=Path, metavar="FILE",
                   help="append every execution to this JSONL file (survives SIGKILL)")
    return p


def _config(args: argparse.Namespace) -> SimConfig:
    return SimConfig(durations=dict(args.duration), default_duration=args.default_duration,
                     switch_cost=args.switch_cost, seed=args.seed,
                     progress_nodes=PROGRESS_NODES | set(args.progress_node),
                     queue_item_shape=args.queue_item_shape,
                     history_message_shape=args.history_message_shape,
                     faults=Faults(fail_rate=args.fail_rate, hang_rate=args.hang_rate))


async def _serve(config: SimConfig, args: argparse.Namespace, root: Path) -> None:
    """Serve until SIGTERM or SIGINT; the handlers only set the stop event."""
    files = SimFiles(args.input_dir or root / "input", args.output_dir or root / "output",
                     root / "temp")
    server = SimServer(config, files, Ledger(args.ledger), FaultSwitch(config.faults))
    port = await server.open(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"comfy-dual simulator listening on http://{args.host}:{port}", flush=True)
    await stop.wait()
    await server.close(abrupt=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator as a process; exits 0 on SIGTERM/SIGINT."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except BadConfig as ex:
        parser.error(str(ex))
    scratch = Scratch(parser)
    try:
        asyncio.run(_serve(config, args, scratch.path))
    finally:
        scratch.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One simulated ComfyUI server as a process (crash tests send it SIGKILL)::

    python -m simulator --port 8188 --duration HIGH=1.0 --switch-cost 0.5

It serves until SIGTERM or SIGINT and then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

from simulator.config import PROGRESS_NODES, Faults, FaultSwitch, SimConfig
from simulator.files import SimFiles
from simulator.scratch import Scratch
from simulator.server import SimServer
from simulator.worker import Ledger
from statemachine.errors import BadConfig


def _duration(text: str) -> tuple[str, float]:
    kind, sep, seconds = text.partition("=")
    try:
        if not sep or not kind:
            raise ValueError
        return kind, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=SECONDS") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulator",
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
    files = SimFiles.in_scratch(root, args.input_dir, args.output_dir)
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

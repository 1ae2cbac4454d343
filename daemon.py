"""comfy-dual daemon: renders prompt files on ComfyUI servers, durably.

    python daemon.py prompt_files/a.txt b.txt [--dual-instance | --single-instance]
    python daemon.py --simulate examples/prompts/*.txt      # on built-in simulated servers
    python daemon.py --dry-run prompt_files/a.txt           # plan and render, contact nobody
    python daemon.py                                        # service: watch the spool

One-shot mode runs the files to the end, prints a summary and exits 0 only if every
batch succeeded. Run it again after a crash and it resumes from the event log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

import config
from instances.agent import InstanceAgent
from instances.workflow import STOCK_OBJECT_INFO, Workflow, load_workflow
from service.intake import SubmitFile
from service.lock import StateLock
from service.logs import setup_logging
from service.loop import Loop
from service.notify import Notifier
from service.summary import figures, render_summary
from service.web import StatusWeb
from spool.folder import DropFolder
from spool.layout import SpoolLayout
from spool.reading import plan_file
from spool.watcher import SpoolWatcher
from statedir import StateDir
from statemachine.errors import BadConfig, BadInput, ComfyDualError, LogWriteError
from statemachine.log import EventLog
from statemachine.plan import JobKind
from statemachine.rules import Policy
from statemachine.store import Store, read_records
from statemachine.timeline import build_timeline

log = structlog.get_logger("comfy_dual.daemon")

PROJECT_DIR = Path(__file__).resolve().parent
DEMO_DURATIONS = {"HIGH": 0.35, "LOW": 0.35, "COMBINE": 0.08}
# The demo workflows' stand-ins for samplers: the simulator reports progress for them.
DEMO_PROGRESS_NODES = frozenset({"EmptyLatentImage", "ImageBlur", "CreateVideo"})
STATUS_EVERY = 1.0  # seconds between STATUS= updates to systemd
FETCH_DRAIN = 15.0  # seconds for finished videos to finish downloading at exit (< TimeoutStopSec)
EXIT_STORAGE = 75  # EX_TEMPFAIL: the state directory could not be written; systemd retries
READY_AT_LATEST = 30.0  # seconds: READY=1 even if a server never answers a reconciliation


@dataclass(frozen=True, slots=True)
class RunResult:
    batch_ids: tuple[str, ...]
    all_done: bool
    makespan: float
    summary: str
    refused: bool = False  # a file was refused after the start-up check (it changed)


def policy_of(settings: config.Settings) -> Policy:
    return Policy(max_retries=settings.max_retries, retry_delay=settings.retry_delay,
                  retry_delay_max=settings.retry_delay_max,
                  combine_gate=settings.combine_gate,
                  job_durations=settings.job_durations, switch_cost=settings.switch_cost)


def load_workflows(settings: config.Settings) -> dict[JobKind, Workflow]:
    """The workflow of each job kind; relative paths are taken from the project directory."""
    out = {}
    for kind, path in settings.workflows.items():
        p = Path(path).expanduser()
        out[JobKind(kind)] = load_workflow(p if p.is_absolute() else PROJECT_DIR / p)
    return out


# --- one-shot runs -----------------------------------------------------------------------


class Stop:
    """Set by SIGINT/SIGTERM; the loop checks it between turns (handlers only set flags)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.event.set())

    def __call__(self) -> bool:
        return self.event.is_set()


@contextlib.contextmanager
def opened(settings: config.Settings, *, spool: DropFolder | None = None,
           commands: Path | None = None) -> Iterator[Loop]:
    """The state directory locked and replayed, agents running, a loop ready to turn
    (with ``spool`` and ``commands``: the service's drop folder and command folder)."""
    state = StateDir(settings.state_dir)
    with StateLock(state.lock):
        event_log = EventLog(state.log_dir, retention=settings.log_retention)
        if event_log.repaired_bytes:
            log.warning("✂️ cut a torn last line off the event log (a crash mid-write)",
                        bytes=event_log.repaired_bytes)
        web = StatusWeb(settings)  # the status page and /metrics (WEB_ADDRESS)
        store = Store.open(web.metered(event_log), policy_of(settings))
        for problem in event_log.problems:
            log.warning(f"⚠️ damaged snapshot: {problem}")
        web.watch(store)
        inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        workflows = load_workflows(settings)
        agents = {i.instance_id: InstanceAgent(
            i, inbox.put, health_interval=settings.health_interval,
            probe_backoff_max=settings.probe_backoff_max,
            connect_timeout=settings.connect_timeout, read_timeout=settings.request_timeout,
            workflows=[wf for kind, wf in workflows.items() if i.accepts(kind)])
            for i in settings.instances}
        loop = Loop(settings, store, agents, workflows, inbox=inbox,
                    status_path=state.status,
                    daemon_info={"pid": os.getpid(), "started_at": time.time()},
                    spool=spool, commands=commands)
        try:
            with _running(agents.values()), web.serving(loop):
                yield loop
            if loop.log_error is None and store.seq > store.snapshot_seq:
                loop.journal.snapshot()  # a clean stop: the next start replays nothing
        finally:
            loop.write_status(time.time(), force=True)
            event_log.close()


def run_files(settings: config.Settings, files: Sequence[Path], stop: Stop, *,
              force: bool = False) -> RunResult:
    """Render ``files`` to the end (or until ``stop``) and summarise the run. A file that
    is identical to an earlier batch is that batch, unless ``force``."""
    with opened(settings) as loop:
        for index, path in enumerate(files):
            loop.post(SubmitFile(index, path, force))
        loop.run_until(lambda: _files_finished(loop, len(files)), stop=stop)
        loop.store.commit()
        outcomes = [loop.submitted.get(index) for index in range(len(files))]
        tl = build_timeline(read_records(loop.store.log))
    batch_ids = tuple(dict.fromkeys(b for b in outcomes if b))  # a file named twice: once
    refused = [str(path) for path, b in zip(files, outcomes, strict=True) if b is None]
    fig = figures(tl, batch_ids, settings.instances)
    return RunResult(batch_ids, fig.all_done and not refused and not stop(), fig.makespan,
                     render_summary(tl, batch_ids, settings.instances, refused=refused),
                     refused=bool(refused))


def serve(settings: config.Settings, stop: Stop, notifier: Notifier) -> int:
    """Service mode: render whatever arrives in the spool until SIGTERM."""
    layout = StateDir(settings.state_dir).spool
    layout.create()
    for path in layout.sweep_tmp(time.time()):
        log.info("🧹 removed a file a writer left unfinished in the spool", file=path)
    spool = DropFolder(layout, max_bytes=settings.max_file_bytes)
    with opened(settings, spool=spool, commands=layout.commands) as loop, \
            _watching(layout, loop.post):
        log.info("👂 watching the spool", incoming=str(layout.incoming))
        ready, told = False, float("-inf")
        while not stop():
            loop.wait(loop.wait_budget(time.time()))
            now = time.time()
            loop.run_once(now)
            if not ready and (loop.reconciled or now - loop.busy.start > READY_AT_LATEST):
                notifier.ready()
                ready = True
            if now - told >= STATUS_EVERY:
                notifier.status(loop.status_line())
                told = now
            notifier.tick(now)
        notifier.stopping()
        log.info("👋 stopping: renders on the servers go on and are picked up at the next start")
    return 0


@contextlib.contextmanager
def _watching(layout: SpoolLayout, post: Callable[[object], None]) -> Iterator[None]:
    """Watch the spool; without inotify the periodic rescans still find every file."""
    watcher = SpoolWatcher(layout, post)
    try:
        watcher.start()
    except OSError as exc:
        log.warning("⚠️ cannot watch the spool; finding files by rescanning only",
                    error=str(exc))
        yield
        return
    try:
        yield
    finally:
        watcher.stop()


def _files_finished(loop: Loop, count: int) -> bool:
    if len(loop.submitted) < count:
        return False
    return loop.batches_finished([b for b in loop.submitted.values() if b])


@contextlib.contextmanager
def _running(agents: Iterable[InstanceAgent]) -> Iterator[None]:
    started = list(agents)
    for agent in started:
        agent.start()
    try:
        yield
    finally:
        deadline = time.monotonic() + FETCH_DRAIN
        for agent in started:
            agent.drain(max(0.0, deadline - time.monotonic()))
        for agent in started:
            agent.stop()


@contextlib.contextmanager
def simulated(settings: config.Settings, durations: dict[str, float]) -> Iterator[None]:
    """Simulated ComfyUI servers on the configured (loopback) ports; with
    ARTIFACT_TRANSFER = "path" they share ARTIFACT_DIR as their output directory."""
    from simulator import PROGRESS_NODES, SimConfig, start_simulator  # aiohttp:
    # loaded only when a simulator is asked for, not by the production daemon

    for i in settings.instances:
        if i.host not in ("127.0.0.1", "localhost", "::1"):
            raise BadConfig(f"--simulate needs loopback hosts; {i.instance_id} is at {i.host}")
    ports = sorted({i.port for i in settings.instances})
    sim_config = SimConfig(durations=durations,
                           progress_nodes=PROGRESS_NODES | DEMO_PROGRESS_NODES)
    shared = settings.artifact_dir if settings.artifact_transfer == "path" else None
    sims = []
    try:
        for port in ports:
            try:
                sims.append(start_simulator(port, sim_config, output_dir=shared))
            except OSError as exc:
                raise BadConfig(f"--simulate: cannot listen on port {port} "
                                f"({exc.strerror or exc}): stop what uses it, or give "
                                "COMFYUI_INSTANCES other ports") from None
        yield
    finally:
        for sim in sims:
            sim.stop()


# --- dry run -----------------------------------------------------------------------------


def dry_run(settings: config.Settings, files: Sequence[Path],
            object_info_file: Path | None = None) -> int:
    """Plan every file and render every job's workflow into STATE_DIR/dry-run/; check the
    workflows against a saved ``/object_info`` (default: a stock ComfyUI's). Contacts no
    server; input files other jobs write keep their planned names."""
    workflows = load_workflows(settings)
    source = object_info_file or STOCK_OBJECT_INFO
    try:
        object_info = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadConfig(f"--object-info {source}: cannot read it: {exc}") from exc
    server = "stock ComfyUI" if object_info_file is None else str(object_info_file)
    problems = [p for w in workflows.values() for p in w.check(object_info, server=server)]
    for problem in problems:
        print(f"workflow problem: {problem}", file=sys.stderr)
    out = StateDir(settings.state_dir).dry_run
    refused = False
    for n, path in enumerate(files, start=1):
        try:
            _, plan = plan_file(path, settings, batch_id=f"b{n:04d}")
        except BadInput as exc:
            print(f"{path}: refused: {exc}", file=sys.stderr)
            refused = True
            continue
        batch_dir = out / plan.batch_id
        batch_dir.mkdir(parents=True, exist_ok=True)
        plan_json = {**plan.to_dict(), "jobs": [job.to_dict() for job in plan.jobs]}
        (batch_dir / "plan.json").write_text(json.dumps(plan_json, indent=2))
        for job in plan.jobs:
            graph = workflows[job.kind].render(job.params)
            name = job.job_id.replace("/", "_") + ".json"
            (batch_dir / name).write_text(json.dumps(graph, indent=2, ensure_ascii=False))
        print(f"{path}: {plan.batch_id} {plan.name!r}, {len(plan.jobs)} jobs -> {batch_dir}")
    return 2 if refused else 1 if problems else 0


def refusals(settings: config.Settings, files: Sequence[Path]) -> list[str]:
    """What is wrong with each file that cannot be rendered, checked before any work."""
    problems = []
    for path in files:
        try:
            plan_file(path, settings)
        except BadInput as exc:
            problems.append(f"{path}: refused: {exc}")
    return problems


def usable_state_dir(path: Path) -> None:
    """Create STATE_DIR if needed; BadConfig if it cannot be, or cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BadConfig(f"STATE_DIR = {str(path)!r}: exists and is not a directory; "
                        "name a directory (--state-dir)") from None
    except OSError as exc:
        raise BadConfig(f"STATE_DIR = {str(path)!r}: cannot be created "
                        f"({exc.strerror or exc}); name a directory you may write "
                        "(--state-dir)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadConfig(f"STATE_DIR = {str(path)!r}: not writable by this user; name a "
                        "directory you may write (--state-dir)")


# --- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="daemon.py", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="prompt files to render now (one-shot mode); none: watch the "
                             "spool until SIGTERM (service mode)")
    config.add_cli_arguments(parser)
    parser.add_argument("--simulate", action="store_true",
                        help="start simulated ComfyUI servers on the configured ports first")
    parser.add_argument("--sim-duration", action="append", default=[], metavar="KIND=SECONDS",
                        help="simulated job duration (default HIGH=0.35 LOW=0.35 COMBINE=0.08)")
    parser.add_argument("--compare-single", action="store_true",
                        help="with --simulate: run the files again on one server and print "
                             "the speed-up")
    parser.add_argument("--force", action="store_true",
                        help="render files again even if identical to an earlier batch")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the plan and every rendered workflow; contact no server")
    parser.add_argument("--object-info", type=Path, metavar="FILE",
                        help="with --dry-run: check the workflows against this saved "
                             "/object_info of your server instead of a stock ComfyUI's")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def sim_durations(pairs: Sequence[str]) -> dict[str, float]:
    durations = dict(DEMO_DURATIONS)
    for pair in pairs:
        kind, _, seconds = pair.partition("=")
        try:
            durations[kind.upper()] = float(seconds)
        except ValueError:
            raise BadConfig(f"--sim-duration {pair!r}: expected KIND=SECONDS, "
                            "e.g. HIGH=0.5") from None
    return durations


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = config.settings_from_args(args)
        durations = sim_durations(args.sim_duration)
        usable_state_dir(settings.state_dir)
    except BadConfig as exc:
        print(f"comfy-dual: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        setup_logging(None, verbose=args.verbose)
        try:
            return dry_run(settings, args.files, args.object_info)
        except BadConfig as exc:
            print(f"comfy-dual: bad configuration: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"comfy-dual: cannot write the dry run: {exc}", file=sys.stderr)
            return 1
    setup_logging(StateDir(settings.state_dir).logs, verbose=args.verbose)
    stop = Stop()
    stop.install()
    try:
        if args.files:
            return one_shot(args, settings, durations, stop)
        sims = simulated(settings, durations) if args.simulate else contextlib.nullcontext()
        with sims:
            return serve(settings, stop, Notifier.from_env())
    except (LogWriteError, OSError) as exc:  # the state directory failing under us
        log.error(f"comfy-dual stopped: cannot write its state directory ({exc}); start "
                  "it again once the disk has room")
        return EXIT_STORAGE
    except ComfyDualError as exc:
        log.error(f"comfy-dual stopped: {exc}")
        return 1


def one_shot(args: argparse.Namespace, settings: config.Settings,
             durations: dict[str, float], stop: Stop) -> int:
    """Render the files named; exit 2 before any work if one of them cannot be."""
    problems = refusals(settings, args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    sims = simulated(settings, durations) if args.simulate else contextlib.nullcontext()
    with sims:
        result = run_files(settings, args.files, stop, force=args.force)
    print(result.summary)
    if args.compare_single and args.simulate and settings.enable_dual_instance and not stop():
        single = config.load_settings(args.config, {
            "ENABLE_DUAL_INSTANCE": False, "WEB_ADDRESS": "",
            "STATE_DIR": str(StateDir(settings.state_dir).single_instance_comparison)})
        with simulated(single, durations):
            alone = run_files(single, args.files, stop, force=args.force)
        print(f"\nSame files on one server: makespan {alone.makespan:.1f} s; with "
              f"{len(settings.instances)} servers {result.makespan:.1f} s: speed-up "
              f"{alone.makespan / max(result.makespan, 1e-9):.2f}x")
    return 2 if result.refused else 0 if result.all_done else 1


if __name__ == "__main__":
    sys.exit(main())

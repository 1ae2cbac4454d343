"""comfy-dual's command line for people: hand prompt files to the daemon, watch and steer it.

    python submit.py submit prompt_files/a.txt b.toml [--force] [--wait 5]
    python submit.py status [--json]
    python submit.py watch [--interval 1]        # on a terminal: a progress bar per job
    python submit.py cancel b0003
    python submit.py retry b0003
    python submit.py report [BATCH ... | --all] [-o timeline.html | timeline.svg]

Every command also takes ``--config FILE`` and ``--state-dir DIR`` (as ``daemon.py``).
Prompt files and commands reach the daemon through the spool (tmp + fsync + rename), so
the daemon stays the only writer of the event log. This program never writes the log:
when the daemon is down, ``status`` replays it read-only.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

import config
from service import report
from service.status import STATUS_VERSION, BatchViews, status_view
from spool import commands
from spool.layout import MAX_NAME_BYTES
from spool.reading import plan_file
from statedir import StateDir
from statemachine.durable import write_atomic
from statemachine.errors import BadConfig, BadInput, ComfyDualError
from statemachine.job import BATCH_FINAL
from statemachine.log import LogReader
from statemachine.plan import safe_name
from statemachine.store import Store, read_records
from statemachine.timeline import Timeline, build_timeline

STALE_AFTER = 10.0  # seconds: the daemon rewrites status.json every 0.5 s
FINAL_STATES = frozenset(state.value for state in BATCH_FINAL)
CLEAR_SCREEN = "\x1b[H\x1b[J"

# --- the state directory ------------------------------------------------------------------


def daemon_pid(lock: Path) -> str | None:
    """The pid written in ``lock`` if a daemon holds it ("unknown" if it wrote none);
    None when no daemon runs. Takes the flock for an instant and releases it at once."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing drops our lock, if we got it
    return None


# --- reading the state without writing it -------------------------------------------------


def replay_view(settings: config.Settings, state: StateDir) -> dict[str, Any]:
    """The status view rebuilt from the event log, as the daemon would write it."""
    log = LogReader(state.log_dir)
    try:
        store = Store.open(log)
    finally:
        log.close()
    for problem in log.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return status_view(store, settings.instances, now=time.time(), daemon=None,
                       batches=BatchViews(state.outputs))


def read_status_file(path: Path) -> dict[str, Any] | None:
    """``status.json`` if it is there and of the version this program reads."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != STATUS_VERSION:
        return None
    return data


@dataclass(frozen=True, slots=True)
class View:
    """What ``status`` shows and where it came from."""

    data: dict[str, Any]
    daemon_pid: str | None  # None: no daemon running
    replayed: bool  # True: rebuilt from the event log, not the daemon's status.json

    @property
    def source(self) -> str:
        return "event log" if self.replayed else "status.json"

    def batch_ids(self) -> list[str]:
        return [b["batch_id"] for b in self.data["batches"]]


def load_view(settings: config.Settings, state: StateDir) -> View:
    """The running daemon's ``status.json``, or else a replay of the event log."""
    pid = daemon_pid(state.lock)
    data = read_status_file(state.status) if pid is not None else None
    if data is None:
        return View(replay_view(settings, state), pid, replayed=True)
    return View(data, pid, replayed=False)


# --- rendering the view -------------------------------------------------------------------


def cut(text: str | None, limit: int) -> str:
    """One line of at most ``limit`` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def progress_bar(progress: Mapping[str, Any] | None, width: int = 10) -> str:
    """``[#####-----] 5/10`` from a ``{"value", "max"}`` progress, or "" if none."""
    if not progress or not progress.get("max"):
        return ""
    value, maximum = progress["value"], progress["max"]
    filled = min(width, max(0, round(width * value / maximum)))
    return f"[{'#' * filled}{'-' * (width - filled)}] {value}/{maximum}"


def output_files(outputs: Mapping[str, Any] | None) -> list[str]:
    """``subfolder/filename`` of every file in ComfyUI outputs (node -> {images: [...]})."""
    found = []
    for node in (outputs or {}).values():
        lists = node.values() if isinstance(node, Mapping) else ()
        for items in lists:
            for item in items if isinstance(items, list) else ():
                if isinstance(item, Mapping) and item.get("filename"):
                    found.append("/".join(p for p in (item.get("subfolder"), item["filename"])
                                          if p))
    return found


def header(view: View, now: float) -> str:
    if view.daemon_pid is None:
        return "daemon not running: state replayed from the event log"
    if view.replayed:
        return (f"daemon running (pid {view.daemon_pid}) but no status.json yet: "
                f"state replayed from the event log")
    age = max(0.0, now - view.data["updated_at"])
    line = f"daemon running (pid {view.daemon_pid}); status as of {age:.1f} s ago"
    if age > STALE_AFTER:
        line += " (not rewritten since: is the state directory's disk full?)"
    if view.data.get("event_log_error"):
        line += (f"\nEVENT LOG NOT WRITABLE ({view.data['event_log_error']}): dispatch is "
                 "paused until it can be written; jobs already running are still followed")
    return line


def batch_lines(batch: Mapping[str, Any]) -> list[str]:
    failed = batch["failed_jobs"]
    note = "; ".join(f"{f['job_id']}: {f['error']}" for f in failed) or batch["reason"]
    line = (f"  {batch['batch_id']:<7} {cut(batch['name'], 30):<30} {batch['state']:<10} "
            f"{batch['done']:>4}/{batch['total']:<4} {cut(note, 60)}")
    if batch["state"] != "done":
        return [line.rstrip()]
    saved = [f"          saved  {path}" + ("" if Path(path).exists() else " (not fetched yet)")
             for path in batch.get("saved_outputs", [])]
    return [line.rstrip(), *(f"          output {path}"
                             for path in output_files(batch["final_outputs"])), *saved]


def running_line(job: Mapping[str, Any]) -> str:
    attempt = f"attempt {job['attempt']}" if job["attempt"] > 1 else ""
    line = (f"  {job['job_id']:<14} {job['kind']:<8} {job['instance_id'] or '-':<16} "
            f"{job['state']:<12} {progress_bar(job['progress']):<20} {attempt}")
    return line.rstrip()


def instance_line(inst: Mapping[str, Any]) -> str:
    health = {True: "up", False: "down"}.get(inst["up"], "unknown")
    share = inst["busy_share"]
    busy = "-" if share is None else f"{share:.1%}"
    return (f"  {inst['instance_id']:<16} {inst['url']:<24} {health:<8} "
            f"{inst['in_flight']}/{inst['max_concurrent']} in flight  busy {busy:>6}")


def running_bars(jobs: Sequence[Mapping[str, Any]], width: int) -> list[str]:
    """The running jobs for a terminal: one line each with a progress bar drawn by rich
    (colour, sub-character steps); a job without progress yet has an empty bar."""
    table = Table.grid(padding=(0, 1))
    for job in jobs:
        progress = job["progress"] or {}
        value, maximum = progress.get("value", 0), progress.get("max", 0)
        attempt = f"attempt {job['attempt']}" if job["attempt"] > 1 else ""
        table.add_row(f"  {job['job_id']}", job["kind"], job["instance_id"] or "-",
                      job["state"], ProgressBar(total=maximum or 1, completed=value, width=24),
                      f"{value}/{maximum}" if maximum else "", attempt)
    console = Console(file=io.StringIO(), force_terminal=True, width=width, highlight=False)
    console.print(table, end="")
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


def render_status(view: View, now: float, *, tty: bool = False) -> str:
    """The human form of the status view, one block: plain text, or for a terminal
    (``tty``) with a progress bar per running job."""
    data = view.data
    lines = [header(view, now), "Batches"]
    lines += [line for b in data["batches"] for line in batch_lines(b)] or ["  none yet"]
    lines.append("Running")
    if tty and data["running"]:
        lines += running_bars(data["running"], shutil.get_terminal_size().columns)
    else:
        lines += [running_line(j) for j in data["running"]] or ["  nothing in flight"]
    lines.append("Instances")
    lines += [instance_line(i) for i in data["instances"]]
    counts = ", ".join(f"{n} {state}" for state, n in data["counts"].items() if n)
    lines.append(f"Jobs  {counts or 'none'}")
    return "\n".join(lines)


# --- commands -----------------------------------------------------------------------------


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


@dataclass(frozen=True, slots=True)
class Prompt:
    path: Path
    data: bytes
    video: str


def read_prompt(path: Path, settings: config.Settings) -> Prompt:
    """Read and check one prompt file as the daemon will; BadInput says what is wrong."""
    try:
        data, plan = plan_file(path, settings)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    return Prompt(path, data, plan.name)


def spool_name(path: Path, token: str) -> str:
    """``sunset_beach.txt`` -> ``sunset_beach-<token>.txt``: the user's name stays visible,
    the suffix (which picks the format) is kept when it is a plain one, and the whole name
    fits the daemon's limit of MAX_NAME_BYTES."""
    plain = re.fullmatch(r"\.[A-Za-z0-9]{1,16}", path.suffix) is not None
    suffix = path.suffix if plain else ""
    tail = f"-{token}{suffix}"
    stem = safe_name(path.stem if plain else path.name).encode()
    return stem[: MAX_NAME_BYTES - len(tail.encode())].decode(errors="ignore") + tail


def spool_file(state: StateDir, prompt: Prompt, *, force: bool) -> str:
    """Put the file into ``incoming/`` (or ``incoming/force/``) atomically; its new name."""
    directory = state.spool.force if force else state.spool.incoming
    name = spool_name(prompt.path, uuid.uuid4().hex[:8])
    while (directory / name).exists():
        name = spool_name(prompt.path, uuid.uuid4().hex[:8])
    write_atomic(directory / name, prompt.data, tmp=state.spool.tmp / name, make_dirs=True)
    return name


def intake_outcome(state: StateDir, name: str) -> tuple[str, str] | None:
    """("accepted", batch id) or ("rejected", reason) once the daemon has taken ``name``."""
    reason = state.spool.rejected / f"{name}.reason"
    if reason.exists():
        return "rejected", cut(reason.read_text(errors="replace"), 300) or "no reason given"
    tail = f"-{name}"
    try:
        entries = os.listdir(state.spool.accepted)
    except FileNotFoundError:
        return None
    return next((("accepted", e[: -len(tail)]) for e in entries
                 if e.endswith(tail) and len(e) > len(tail)), None)


def report_intake(head: str, outcome: tuple[str, str] | None, wait: float) -> int:
    if outcome is None:
        print(f"{head}: not taken yet after {wait:g} s; it waits in the spool")
        return 0
    verdict, detail = outcome
    if verdict == "rejected":
        error(f"{head}: rejected: {detail}")
        return 1
    print(f"{head}: batch {detail}")
    return 0


def cmd_submit(args: argparse.Namespace, settings: config.Settings, state: StateDir) -> int:
    """Check every file first: if any is bad, say why and spool none of them."""
    prompts, problems = [], []
    for path in args.files:
        try:
            prompts.append(read_prompt(path, settings))
        except BadInput as exc:
            problems.append(str(exc))
    if problems:
        for problem in problems:
            error(problem)
        return 2
    names = [spool_file(state, p, force=args.force) for p in prompts]
    running = daemon_pid(state.lock) is not None
    deadline = time.monotonic() + args.wait
    code = 0
    for prompt, name in zip(prompts, names, strict=True):
        head = f"{prompt.path} -> {name} (video {prompt.video!r})"
        if not running:
            print(f"{head}: the daemon is not running; it will take the file when it starts")
            continue
        outcome = commands.poll(partial(intake_outcome, state, name),
                                deadline - time.monotonic())
        code = max(code, report_intake(head, outcome, args.wait))
    return code


def cmd_status(args: argparse.Namespace, settings: config.Settings, state: StateDir) -> int:
    view = load_view(settings, state)
    if args.json:
        print(json.dumps({**view.data, "source": view.source}))
    else:
        print(render_status(view, time.time()))
    return 0


def draw(text: str, tty: bool) -> None:
    """Redraw in place on a terminal; elsewhere (a pipe, a log) print block after block."""
    print(f"{CLEAR_SCREEN}{text}" if tty else f"{text}\n", flush=True)


def watch(settings: config.Settings, state: StateDir, *, interval: float, tty: bool,
          pause: Callable[[float], None] = time.sleep) -> int:
    """Redraw until every batch unfinished at the start has ended: 0 if all are done."""
    view = load_view(settings, state)
    watched = [b for b in view.data["batches"] if b["state"] not in FINAL_STATES]
    ids = {b["batch_id"] for b in watched}
    while True:
        draw(render_status(view, time.time(), tty=tty), tty)
        ended = {b["batch_id"]: b["state"] for b in view.data["batches"]
                 if b["batch_id"] in ids and b["state"] in FINAL_STATES}
        if len(ended) == len(ids):
            break
        pause(interval)
        view = load_view(settings, state)
    if not ids:
        print("no unfinished batch to watch")
    else:
        print("ended: " + ", ".join(f"{b} {state}" for b, state in ended.items()))
    return 0 if all(state == "done" for state in ended.values()) else 1


def cmd_watch(args: argparse.Namespace, settings: config.Settings, state: StateDir) -> int:
    return watch(settings, state, interval=args.interval, tty=sys.stdout.isatty())


def check_batch(view: View, batch_id: str) -> None:
    known = view.batch_ids()
    if batch_id not in known:
        listed = ", ".join(known[-10:]) if known else "none yet"
        raise BadInput(f"unknown batch {batch_id!r} (known batches: {listed})")


def cmd_command(args: argparse.Namespace, settings: config.Settings, state: StateDir) -> int:
    """cancel or retry: checked here, carried out by the daemon."""
    view = load_view(settings, state)
    check_batch(view, args.batch_id)
    command_id = commands.send(state.spool.commands, args.command, args.batch_id)
    what = f"{args.command} {args.batch_id}"
    if view.daemon_pid is None:
        print(f"{what}: the daemon is not running; the command will run when it starts")
        return 0
    reply = commands.wait_for_reply(state.spool.commands, command_id, args.wait)
    if reply is None:
        print(f"{what}: no answer from the daemon after {args.wait:g} s; the command stays "
              f"queued")
        return 0
    if not reply.ok:
        error(f"{what}: {reply.message or 'refused by the daemon'}")
        return 1
    print(f"{what}: {reply.message or 'done'}")
    return 0


def read_timeline(state: StateDir) -> Timeline:
    """The timeline of the batches accepted in the event log, read without writing."""
    log = LogReader(state.log_dir)
    try:
        return build_timeline(report.accepted_in(read_records(log)))
    finally:
        log.close()


def _first_kept_seq(state: StateDir) -> int:
    """The seq the log's oldest kept line has (1: the whole history is there)."""
    log = LogReader(state.log_dir)
    try:
        return next((orjson.loads(line)["seq"] for _, line in log.history()), 1)
    finally:
        log.close()


def cmd_report(args: argparse.Namespace, settings: config.Settings, state: StateDir) -> int:
    """Draw the timeline of the batches asked for (all by default) into ``args.output``."""
    fmt = report.output_format(args.output)
    if args.all and args.batch_ids:
        raise BadInput("name batches or give --all, not both")
    tl = read_timeline(state)
    chosen = report.select_batches(tl, args.batch_ids)
    now = time.time() if daemon_pid(state.lock) is not None else None
    chart = report.chart(tl, chosen, now)
    out: Path = args.output
    write_atomic(out, report.RENDERERS[fmt](chart).encode(),
                 tmp=out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"), make_dirs=True)
    print(f"{out}: {report.plural(len(chosen), 'batch')}, "
          f"{report.plural(len(chart.attempts), 'attempt')} on "
          f"{report.plural(len(chart.lanes), 'instance')}, makespan {chart.makespan:.1f} s")
    if _first_kept_seq(state) > 1:
        print("note: the event log no longer holds its oldest events (compacted before "
              "segments, or removed by LOG_RETENTION); the "
              "batches they held are not shown", file=sys.stderr)
    return 0


# --- command line -------------------------------------------------------------------------


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --config/--state-dir work before the command and after it; after it they must not
    # reset what was given before, hence SUPPRESS as their default there.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    config.add_cli_arguments(common)
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument("--wait", type=seconds, default=5.0, metavar="SECONDS",
                       help="how long to wait for the daemon's answer (default 5)")
    parser = argparse.ArgumentParser(prog="submit.py", description=__doc__.split("\n")[0])
    config.add_cli_arguments(parser)
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    p = sub.add_parser("submit", parents=[common, waits], help="hand prompt files to the daemon")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--force", action="store_true",
                   help="start a new batch even if an identical file is still unfinished")
    p.set_defaults(run=cmd_submit)
    p = sub.add_parser("status", parents=[common], help="batches, running jobs, instances")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.set_defaults(run=cmd_status)
    p = sub.add_parser("watch", parents=[common], help="live status until the batches end")
    p.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS")
    p.set_defaults(run=cmd_watch)
    for command, text in (("cancel", "cancel a batch"), ("retry", "retry a failed batch")):
        p = sub.add_parser(command, parents=[common, waits], help=text)
        p.add_argument("batch_id", metavar="BATCH")
        p.set_defaults(run=cmd_command, command=command)
    p = sub.add_parser("report", parents=[common],
                       help="timeline of the batches as a Gantt chart per server (.html/.svg)",
                       description="One lane per server, x in seconds since the first batch "
                       "shown was accepted; a bar per attempt coloured by kind (hatched red: "
                       "it did not succeed); a dashed line where each batch's COMBINE gate "
                       "opened. Reads the event log; never writes it.")
    p.add_argument("batch_ids", nargs="*", metavar="BATCH", help="batches to show")
    p.add_argument("--all", action="store_true", help="show every batch (the default)")
    p.add_argument("-o", "--output", type=Path, default=Path("timeline.html"), metavar="FILE",
                   help="where to write it: *.html (a page with the chart and a table of "
                        "the batches) or *.svg (the chart alone); default timeline.html")
    p.set_defaults(run=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit 0: done; 1: it failed; 2: bad input, usage or settings."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = config.settings_from_args(args)
        return args.run(args, settings, StateDir(settings.state_dir))
    except (BadConfig, BadInput) as exc:
        error(str(exc))
        return 2
    except BrokenPipeError:  # `submit.py status | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ComfyDualError, OSError) as exc:
        error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

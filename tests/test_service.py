"""Service mode as users run it: the daemon as a real process watching its spool,
submit.py talking to it, simulated ComfyUI servers over real sockets, SIGTERM, and
sd_notify messages caught on a datagram socket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import wait_for

import submit

PROJECT = Path(__file__).resolve().parent.parent


def prompt(directory: Path, name: str, frames: int = 202) -> Path:
    path = directory / f"{name}.txt"
    path.write_text(f"{name}\n\n{frames}\n\nA video of {name}.\n\nblurry\n")
    return path


class Service:
    """``python daemon.py`` (no files) on a state directory, with a NOTIFY_SOCKET."""

    def __init__(self, tmp: Path, high: int, low: int, **settings: object) -> None:
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        lines = ["HEALTH_INTERVAL = 0.2", "PROBE_BACKOFF_MAX = 0.5", "CONNECT_TIMEOUT = 0.5",
                 "RETRY_DELAY = 0.05", 'WEB_ADDRESS = ""',
                 *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
        for name, port, kind in (("high_priority", high, "HIGH"), ("low_priority", low, "LOW")):
            lines += ["[[COMFYUI_INSTANCES]]", f'instance_id = "{name}"', 'host = "127.0.0.1"',
                      f"port = {port}", f'job_types = ["{kind}"]']
        self.config.write_text("\n".join(lines) + "\n")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.messages: list[str] = []  # everything the daemon told "systemd", in order
        threading.Thread(target=self._listen, daemon=True).start()
        self._proc: subprocess.Popen[str] | None = None

    def _listen(self) -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                self.messages += self.notify.recv(4096).decode().splitlines()

    def start(self) -> Service:
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.getsockname(),
               "WATCHDOG_USEC": "400000"}
        self._proc = subprocess.Popen(
            [sys.executable, str(PROJECT / "daemon.py"), "--config", str(self.config),
             "--state-dir", str(self.state)], cwd=PROJECT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.wait_notify("READY=1")
        return self

    @property
    def proc(self) -> subprocess.Popen[str]:
        """The daemon's process, once started."""
        assert self._proc is not None, "the daemon was not started"
        return self._proc

    def stderr(self) -> str:
        """What the daemon wrote to stderr (all of it once it has exited)."""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def wait_notify(self, wanted: str, timeout: float = 20) -> None:
        wait_for(lambda: wanted in self.messages, wanted, timeout)

    def submit(self, *args: str) -> int:
        return submit.main([args[0], "--state-dir", str(self.state), *args[1:]])

    def status(self) -> dict:
        return json.loads((self.state / "status.json").read_text())

    def batch_state(self, batch_id: str) -> str | None:
        try:
            batches = {b["batch_id"]: b["state"] for b in self.status()["batches"]}
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return batches.get(batch_id)

    def wait_state(self, batch_id: str, state: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self.batch_state(batch_id) == state, f"{batch_id} {state}", timeout)

    def terminate(self) -> None:
        """SIGTERM, and the daemon exits cleanly (the timeout only guards against a hang)."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.stderr()

    def close(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc and self._proc.stderr:
            self._proc.stderr.close()
        self.notify.shutdown(socket.SHUT_RDWR)
        self.notify.close()




@pytest.fixture
def service(tmp_path, sims):
    made: list[Service] = []

    def make(**settings: object) -> Service:
        made.append(Service(tmp_path, sims[0].port, sims[1].port, **settings))
        return made[-1]

    yield make
    for s in made:
        s.close()


def spool_names(svc: Service, folder: str) -> list[str]:
    return sorted(p.name for p in (svc.state / "spool" / folder).iterdir() if p.is_file())


def test_files_dropped_every_way_are_rendered_once_and_systemd_hears_about_it(
        tmp_path, sims, service, capsys):
    svc = service()
    incoming = svc.state / "spool" / "incoming"
    incoming.mkdir(parents=True)
    prompt(tmp_path, "early").rename(incoming / "early.txt")  # while the daemon is down
    svc.start()
    assert svc.submit("submit", str(prompt(tmp_path, "submitted"))) == 0
    assert "batch b000" in capsys.readouterr().out
    prompt(tmp_path, "renamed").rename(incoming / "renamed.txt")
    with open(incoming / "slow.txt", "w") as f:  # written in place, in pieces
        for part in ("slow\n\n", "101\n\n", "A slow writer.\n\n", "blurry\n"):
            f.write(part)
            f.flush()
            time.sleep(0.15)  # a slow writer: the watcher holds the file until it is closed
    wait_for(lambda: len(spool_names(svc, "accepted")) == 4, "four accepted files")
    for n in range(1, 5):
        svc.wait_state(f"b{n:04d}", "done")
    svc.terminate()
    svc.wait_notify("STOPPING=1")
    assert svc.messages.index("READY=1") < svc.messages.index("STOPPING=1")
    assert "WATCHDOG=1" in svc.messages
    assert any(m.startswith("STATUS=") and "batches active" in m for m in svc.messages)
    counts = [n for sim in sims for n in sim.counts().values()]
    assert counts and set(counts) == {1}
    slow = json.loads((svc.state / "status.json").read_text())["batches"]
    assert sorted(b["name"] for b in slow) == ["early", "renamed", "slow", "submitted"]


def test_bad_files_and_duplicates_are_rejected_with_a_reason_and_force_wins(
        tmp_path, service, capsys):
    svc = service().start()
    incoming = svc.state / "spool" / "incoming"
    (incoming / "empty.txt").write_bytes(b"")
    (incoming / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    (incoming / "a_folder").mkdir()
    os.symlink("/etc/passwd", incoming / "link.txt")
    os.mkfifo(incoming / "pipe.txt")
    assert svc.submit("submit", str(prompt(tmp_path, "twice"))) == 0
    assert svc.submit("submit", str(prompt(tmp_path, "twice"))) == 1  # same content
    assert "same content as batch b0001" in capsys.readouterr().err
    assert svc.submit("submit", "--force", str(prompt(tmp_path, "twice"))) == 0
    reasons = {}
    wait_for(lambda: len([n for n in spool_names(svc, "rejected")
                          if n.endswith(".reason")]) == 6, "six reason files")
    for name in spool_names(svc, "rejected"):
        if name.endswith(".reason"):
            reasons[name.split("-")[0].split(".")[0]] = (
                svc.state / "spool" / "rejected" / name).read_text()
    assert "empty" in reasons["empty"]
    assert "UTF-8" in reasons["binary"]
    assert "directory" in reasons["a_folder"]
    assert "link" in reasons["link"]
    assert "FIFO" in reasons["pipe"]
    assert "same content as batch b0001" in reasons["twice"]
    assert svc.proc.poll() is None, "a bad file stopped the daemon"
    wait_for(lambda: svc.batch_state("b0002") == "done", "the forced copy")


def test_cancel_stops_the_servers_work_and_retry_finishes_it(tmp_path, sims, service, capsys):
    high, _low = sims
    high.set_faults(hang=True)  # HIGH jobs never finish until interrupted
    svc = service().start()
    assert svc.submit("submit", str(prompt(tmp_path, "stuck"))) == 0
    assert svc.submit("submit", str(prompt(tmp_path, "queued"))) == 0
    wait_for(lambda: any(r["status"] == "running" for r in high.executions()),
             what="a hung job")
    wait_for(lambda: len(svc.status()["running"]) == 2, "the second job queued")
    assert svc.submit("cancel", "b0002") == 0  # it waits in the server's queue
    assert "b0002 cancelled" in capsys.readouterr().out
    wait_for(lambda: svc.batch_state("b0002") == "cancelled", "b0002 cancelled")
    assert svc.submit("cancel", "b0001") == 0  # it runs (and hangs) on the server
    wait_for(lambda: svc.batch_state("b0001") == "cancelled", "b0001 cancelled")
    wait_for(lambda: any(r["status"] == "interrupted" for r in high.executions()),
             what="the running job interrupted on the server")
    assert [r["job_id"] for r in high.executions()] == ["b0001/H1"], "b0002 ran anyway"
    high.set_faults(hang=False)
    assert svc.submit("retry", "b0001") == 0
    wait_for(lambda: svc.batch_state("b0001") == "done", "retried batch done")
    assert svc.submit("retry", "b0001") == 1  # nothing left to retry
    assert "only failed or cancelled" in capsys.readouterr().err


def test_status_while_running_and_while_the_daemon_is_down(tmp_path, sims, service, capsys):
    svc = service().start()
    assert svc.submit("submit", str(prompt(tmp_path, "watched", 303))) == 0
    capsys.readouterr()
    wait_for(lambda: svc.status()["running"], "a running job")
    assert svc.submit("status") == 0
    live = capsys.readouterr().out
    assert "daemon running" in live and "b0001" in live
    wait_for(lambda: svc.batch_state("b0001") == "done", "done")
    svc.terminate()
    assert svc.submit("status", "--json") == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["source"] == "event log" and replayed["daemon"] is None
    assert [b["state"] for b in replayed["batches"]] == ["done"]


def test_sigterm_mid_run_then_restart_finishes_with_no_duplicate(tmp_path, sims, service):
    high, low = sims
    svc = service().start()
    for name in ("one", "two", "three"):
        assert svc.submit("submit", str(prompt(tmp_path, name, 303))) == 0
    wait_for(lambda: len(high.executions()) + len(low.executions()) >= 4, "progress")
    svc.terminate()
    svc.start()
    for n in range(1, 4):
        svc.wait_state(f"b{n:04d}", "done")
    runs = [r for sim in sims for r in sim.executions() if r["status"] == "success"]
    assert len(runs) == 27 and len({r["job_id"] for r in runs}) == 27


def test_a_finished_video_not_fetched_before_a_stop_is_fetched_after_the_restart(
        tmp_path, sims, service):
    svc = service().start()
    assert svc.submit("submit", str(prompt(tmp_path, "one", 101))) == 0
    video = svc.state / "outputs" / "b0001"
    wait_for(lambda: svc.batch_state("b0001") == "done" and any(video.glob("*")), "video")
    svc.terminate()
    shutil.rmtree(video)  # as if the daemon had stopped between "done" and the download
    svc.start()
    wait_for(lambda: any(video.glob("*")), "the video fetched again")

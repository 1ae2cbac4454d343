"""systemd integration: the sd_notify client against a real datagram socket, and the unit
file, parsed and (where systemd-analyze exists) verified and scored offline."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import daemon
from service import notify
from service.notify import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "comfy-dual.service"
STATE_DIR = "/var/lib/comfy-dual"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 1.2 when written; "OK" ends at 3.9


# --- sd_notify ---------------------------------------------------------------------------


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, bind_to: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(5)
        self.env = {"NOTIFY_SOCKET": env_value}

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def until_stopping(self) -> list[bytes]:
        """Every datagram up to and including STOPPING=1 (the sentinel a test sends)."""
        got = [self.recv()]
        while got[-1] != b"STOPPING=1":
            got.append(self.recv())
        return got


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        lst = Listener(path, path)
    else:
        name = f"comfy-dual-test-{uuid.uuid4().hex}"
        lst = Listener("\0" + name, "@" + name)
    yield lst
    lst.sock.close()


def test_messages_arrive_in_order_as_utf8(listener: Listener) -> None:
    n = Notifier.from_env(listener.env)
    n.ready()
    n.status("渲染 3/10 ✓")
    n.watchdog()
    n.stopping()
    assert listener.until_stopping() == [
        b"READY=1", "STATUS=渲染 3/10 ✓".encode(), b"WATCHDOG=1", b"STOPPING=1"]
    n.close()


def test_status_is_one_line(listener: Listener) -> None:
    """A newline would start a new KEY=value assignment in the datagram."""
    n = Notifier.from_env(listener.env)
    n.status("2 batches\nREADY=1")
    assert listener.recv() == b"STATUS=2 batches READY=1"


def test_status_sends_only_changes(listener: Listener) -> None:
    n = Notifier.from_env(listener.env)
    for text in ("idle", "idle", "1 batch", "1 batch", "idle"):
        n.status(text)
    n.stopping()
    assert listener.until_stopping() == [b"STATUS=idle", b"STATUS=1 batch", b"STATUS=idle",
                                         b"STOPPING=1"]


@pytest.mark.parametrize(("extra", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(extra: dict[str, str], expected: float | None) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "@unused", **extra})
    assert n.watchdog_interval() == expected


def test_no_watchdog_without_notify_socket() -> None:
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


def test_tick_pings_at_most_every_half_timeout(listener: Listener) -> None:
    n = Notifier.from_env({**listener.env, "WATCHDOG_USEC": "30000000"})
    for now in (100.0, 105.0, 114.9, 115.0, 129.9, 200.0, 50.0, 60.0):
        n.tick(now)
    n.stopping()
    # pings at 100, 115, 200, and 50 (the clock went back)
    assert listener.until_stopping() == [b"WATCHDOG=1"] * 4 + [b"STOPPING=1"]


def test_tick_sends_nothing_when_no_watchdog_watches_us(listener: Listener) -> None:
    env = {**listener.env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    n = Notifier.from_env(env)
    for now in (0.0, 1_000.0, 1_000_000.0):
        n.tick(now)
    n.stopping()
    assert listener.until_stopping() == [b"STOPPING=1"]


def test_missing_socket_is_logged_once_per_outage_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs() as logs:
        n.ready()
        n.status("still nobody listening")
        n.watchdog()
        lst = Listener(str(path), str(path))
        n.status("still nobody listening")  # not delivered before, so not a repeat
        n.stopping()
        assert lst.until_stopping() == [b"STATUS=still nobody listening", b"STOPPING=1"]
        lst.sock.close()
        path.unlink()
        n.ready()
        n.ready()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2, logs
    assert all(e["socket"] == str(path) for e in warnings)


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*_args: object) -> None:
        raise AssertionError("a socket was opened without NOTIFY_SOCKET")

    monkeypatch.setattr(notify.socket, "socket", no_socket)
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        n = Notifier.from_env(env)
        with capture_logs() as logs:
            n.ready()
            n.status("x")
            n.watchdog()
            n.tick(0.0)
            n.stopping()
        assert not n.enabled
        assert logs == []


# --- the unit file -----------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value, in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return unit_entries(UNIT.read_text())["Service"]


def test_unit_has_the_required_settings(service: dict[str, list[str]]) -> None:
    required = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
        "Restart": "on-failure", "StateDirectory": "comfy-dual", "User": "comfy-dual",
        "Group": "comfy-dual", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "", "UMask": "0007",
    }
    assert {k: service.get(k, [None])[-1] for k in required} == required
    assert STATE_DIR in service["ReadWritePaths"][-1].split()
    assert "AF_UNIX" in service["RestrictAddressFamilies"][-1].split()  # sd_notify


def test_unit_stop_timeout_leaves_room_for_the_daemons_10s_shutdown(
        service: dict[str, list[str]]) -> None:
    assert int(service["TimeoutStopSec"][-1]) > 10


def test_exec_start_is_a_command_line_the_daemon_accepts(
        service: dict[str, list[str]]) -> None:
    python, script, *args = shlex.split(service["ExecStart"][-1])
    assert Path(script).name == "daemon.py" and Path(python).name.startswith("python")
    ns = daemon.parse_args(args)
    assert ns.files == [] and ns.state_dir == Path(STATE_DIR) and ns.config is not None


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this interpreter and checkout: verify checks that
    the executable exists, and /opt/comfy-dual does not exist here."""
    exec_start = shlex.join([sys.executable, str(REPO / "daemon.py"), "--config",
                             "/etc/comfy-dual/config.toml", "--state-dir", STATE_DIR])
    text = re.sub(r"(?m)^ExecStart=.*$", lambda _: f"ExecStart={exec_start}",
                  UNIT.read_text())
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def foreign(line: str) -> bool:
    """A complaint about one of the host's own unit files, which verify may load as
    dependencies (network-online.target, ...): not ours to fix."""
    match = re.match(r"(\S+?\.(?:service|target|socket|mount|slice|path|timer))(?::\d+)?: ",
                     line)
    return match is not None and UNIT.name not in match.group(1)


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


@needs_analyze
def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    # verify exits 0 on typos ("Failed to parse ..., ignoring"): its stderr is the verdict.
    # User=comfy-dual need not exist on this machine: verify does not look users up.
    done = subprocess.run(["systemd-analyze", "verify", str(runnable_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    ours = [line for line in done.stderr.splitlines() if not foreign(line)]
    assert done.returncode == 0 and ours == [], done.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_stays_low(tmp_path: Path) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           f"--threshold={int(MAX_EXPOSURE * 10)}",
                           str(runnable_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert score is not None, done.stdout + done.stderr
    assert done.returncode == 0 and float(score.group(1)) <= MAX_EXPOSURE, done.stdout

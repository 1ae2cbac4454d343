#!/usr/bin/env python3
"""Check deploy/comfy-dual.service under a real systemd as PID 1 (``make systemd-check``).

Boots a minimal Debian 12 in a ``systemd-nspawn`` container, installs comfy-dual in it as
README.md says ("Install as a systemd service"), starts two simulated ComfyUI servers as
transient units, and checks what an operator relies on:

    ready          ``systemctl enable --now`` returns once the daemon sent READY=1
    status line    systemd's Status: is the daemon's own one-line summary
    state dir      /var/lib/comfy-dual is 2770 comfy-dual:comfy-dual
    group submit   a member of the comfy-dual group submits a file and it renders to done
    sigkill        SIGKILL: restarted after RestartSec, the job in flight recovered, not re-run
    stop time      ``systemctl stop`` returns within a few seconds
    watchdog       a stopped (SIGSTOP) loop trips WatchdogSec and systemd restarts it
    bad config     a bad configuration exits 2 and is not restarted
    security       ``systemd-analyze security`` rates the unit
    reboot         after a reboot the unit is back, and old and new batches render with
                   no job interrupted

One line per check, then a summary; ``--json`` prints the summary as JSON. Exit status 0
if every check passed, 1 if one failed, 77 (skipped) where the container cannot boot
(no namespaces, not root, no systemd-nspawn or debootstrap).

Needs root, ``systemd-nspawn`` (Debian: systemd-container) and ``debootstrap``. The
Debian root is built once and cached in ``~/.cache/comfy-dual/systemd-check/`` (about
50-75 s the first time); each run boots a copy of it, removed at the end, and the container
is powered off (killed if it hangs) even when a check fails or the run is interrupted.

The container has a network of its own (``--private-network``, loopback only): its
simulators on 127.0.0.1:8188/8189 are out of reach of every other process on the host,
and the daemon in it cannot reach a ComfyUI server (or another check's simulator) running
on the host's ports. So comfy-dual is installed from a wheelhouse filled on the host, and
the project itself is cloned from a bundle of the current commit (uncommitted changes are
not in it). On a host whose PID 1 is not systemd, nspawn runs
with ``--register=no --keep-unit`` and commands run inside with ``nsenter -t <PID 1 of
the container> -a``.

The project's test suite (step 2 of the README, ``make test``) is not run in the
container: ``make venv`` makes the same virtualenv the same way in far less time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfy-dual" / \
    "systemd-check"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,make,git,procps"
MACHINE = "comfy-dual-check"
OPT = "/opt/comfy-dual"
STATE = "/var/lib/comfy-dual"
UNIT = "comfy-dual"
SUBMIT = f"{OPT}/.venv/bin/python {OPT}/submit.py --state-dir {STATE}"
SKIPPED = 77

CONFIG = """\
HEALTH_INTERVAL = 0.5
PROBE_BACKOFF_MAX = 1.0
RETRY_DELAY = 0.5

[[COMFYUI_INSTANCES]]
instance_id = "high_priority"
host = "127.0.0.1"
port = 8188
job_types = ["HIGH"]

[[COMFYUI_INSTANCES]]
instance_id = "low_priority"
host = "127.0.0.1"
port = 8189
job_types = ["LOW"]
"""


class Skip(Exception):
    """The container cannot run here; the check is skipped, not failed."""


class CheckFailed(Exception):
    """A check's expectation did not hold."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(cmd: list[str], *, timeout: float = 600, check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise CheckFailed(f"{shlex.join(cmd)} exited {result.returncode}: "
                          f"{(result.stderr or result.stdout).strip()[-800:]}")
    return result


T = TypeVar("T")


def wait_until(what: str, test: Callable[[], T | None], timeout: float, every: float = 0.2
               ) -> T:
    """The first true value `test` returns, polled every `every` s for `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = test()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# --- preparing on the host ------------------------------------------------------------


def preflight() -> None:
    """Root, the tools, and namespaces that nspawn needs; otherwise skip (77)."""
    if os.geteuid() != 0:
        raise Skip("needs root (systemd-nspawn and debootstrap)")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "git"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed (Debian: apt-get install systemd-container "
                       "debootstrap)")
    probe = run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
                 "--mount-proc", "true"], check=False, timeout=30)
    if probe.returncode != 0:
        raise Skip(f"cannot create namespaces here ({probe.stderr.strip()}): nspawn "
                   "cannot boot a container")


def debian_root() -> Path:
    """A minimal Debian root with systemd and Python, built once and cached."""
    rootfs = CACHE / "rootfs"
    if (CACHE / "rootfs.complete").exists():
        return rootfs
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / "rootfs.tmp"
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    say(f"building the Debian {SUITE} root in {rootfs} (once; about a minute)")
    run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(building),
         MIRROR], timeout=1800)
    building.rename(rootfs)
    (CACHE / "rootfs.complete").write_text(f"{SUITE} {PACKAGES}\n")
    return rootfs


def wheelhouse() -> Path:
    """Wheels of every dependency in pyproject.toml (test extras too), pip and setuptools,
    for the container's pip; fetched again only when pyproject.toml changes."""
    wheels = CACHE / "wheels"
    stamp = wheels / ".pyproject"
    pyproject = (ROOT / "pyproject.toml").read_text()
    if stamp.exists() and stamp.read_text() == pyproject:
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    say("filling the wheelhouse")
    project = tomllib.loads(pyproject)["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"],
              "pip", "setuptools>=68"]
    run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(wheels),
         "--only-binary=:all:", *wanted], timeout=900)
    stamp.write_text(pyproject)
    return wheels


def project_bundle(work: Path) -> Path:
    """The current commit as a git bundle, to ``git clone`` inside the container."""
    bundle = work / "comfy-dual.bundle"
    run(["git", "-C", str(ROOT), "bundle", "create", str(bundle), "HEAD"])
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    if dirty.stdout.strip():
        say("note: uncommitted changes are not installed in the container (HEAD is)")
    return bundle


# --- the container ----------------------------------------------------------------------


@dataclass
class Container:
    """A booted copy of the Debian root; ``sh`` runs a command inside it."""

    root: Path
    binds: dict[Path, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    leader: int = 0

    def boot(self, timeout: float = 60) -> None:
        cmd = ["systemd-nspawn", "--quiet", "--boot", f"--directory={self.root}",
               f"--machine={MACHINE}", "--register=no", "--keep-unit", "--private-network",
               "--console=passive",
               *(f"--bind-ro={host}:{inside}" for host, inside in self.binds.items())]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.leader = int(wait_until("the container's PID 1", self._find_leader, 20))
        except CheckFailed:
            if self.proc.poll() is not None:
                raise Skip(f"systemd-nspawn could not boot a container here: "
                           f"{self.log.read_text(errors='replace').strip()[-400:]}") from None
            raise
        wait_until("the container's boot to finish", self._booted, timeout, every=0.5)

    def _find_leader(self) -> int | None:
        """The container's init: a descendant of nspawn that is PID 1 in its namespace."""
        if self.proc is None or self.proc.poll() is not None:
            raise CheckFailed("systemd-nspawn exited: "
                              + self.log.read_text(errors="replace").strip()[-400:])
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines()
                          if line.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == "1":
                return pid
            todo += [int(c) for c in children]
        return None

    def _booted(self) -> bool:
        state = self.sh("systemctl is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def sh(self, script: str, *, check: bool = True, timeout: float = 300,
           user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with sh inside the container (as root, or as ``user``)."""
        inner = ["sh", "-c", script]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        cmd = ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
               "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG=C.UTF-8", "HOME=/root", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *inner]
        return run(cmd, check=check, timeout=timeout)

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shutdown(self) -> None:
        """Power the container off; kill it if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.leader:
            self.sh("systemctl poweroff --no-block", check=False, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# --- installing, as README.md says ------------------------------------------------------


def install(c: Container) -> None:
    """Steps 1-4 of "Install as a systemd service", with pip reading the wheelhouse."""
    c.sh("useradd --system --user-group --home-dir /var/lib/comfy-dual "
         "--shell /usr/sbin/nologin comfy-dual")
    c.sh(f"git clone -q /root/comfy-dual.bundle {OPT}")
    c.sh(f"cd {OPT} && PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels make venv", timeout=600)
    c.sh(f"cd {OPT} && .venv/bin/python -m compileall -q .", timeout=300)
    c.sh("install -d -m 0755 /etc/comfy-dual")
    write_file(c, "/etc/comfy-dual/config.toml", CONFIG)
    c.sh(f"cp {OPT}/deploy/comfy-dual.service /etc/systemd/system/ && systemctl daemon-reload")


def write_file(c: Container, path: str, text: str, mode: str = "0644") -> None:
    c.sh(f"cat > {shlex.quote(path)} <<'EOF'\n{text}EOF\nchmod {mode} {shlex.quote(path)}")


def start_simulators(c: Container) -> None:
    """Two simulated ComfyUI servers as transient units, each with an execution ledger."""
    c.sh("install -d -m 0755 /var/lib/comfy-sim")
    for name, port in (("high", 8188), ("low", 8189)):
        c.sh(f"systemd-run --quiet --unit=comfy-sim-{name} -p WorkingDirectory={OPT} "
             f"{OPT}/.venv/bin/python -m simulator --port {port} "
             f"--duration HIGH=1.5 --duration LOW=1.5 --default-duration 0.3 "
             f"--ledger /var/lib/comfy-sim/{name}.jsonl "
             f"--output-dir /var/lib/comfy-sim/{name}-out")
    for port in (8188, 8189):
        probe = (f"{OPT}/.venv/bin/python -c \"import urllib.request; "
                 f"urllib.request.urlopen('http://127.0.0.1:{port}/system_stats')\"")

        def answers(probe: str = probe) -> bool:
            return c.sh(probe, check=False).returncode == 0

        wait_until(f"the simulator on port {port}", answers, 30, every=0.5)


def ledger(c: Container) -> list[dict[str, Any]]:
    """Every execution the simulators started, across their lives."""
    out = c.sh(f"cd {OPT} && .venv/bin/python -c 'import json,sys; from pathlib import Path; "
               "from simulator import read_ledger; "
               "print(json.dumps([r for n in (\"high\", \"low\") for r in "
               "read_ledger(Path(f\"/var/lib/comfy-sim/{n}.jsonl\"))]))'").stdout
    return json.loads(out)


# --- the checks ---------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    ok: bool
    detail: str
    data: dict[str, object] = field(default_factory=dict)


def main_pid(c: Container) -> int:
    return int(c.show("MainPID")["MainPID"])


def restarts(c: Container) -> int:
    return int(c.show("NRestarts")["NRestarts"])


def status_json(c: Container) -> dict[str, Any]:
    return json.loads(c.sh(f"{SUBMIT} status --json").stdout)


def batch_state(c: Container, batch_id: str) -> str | None:
    batches = status_json(c).get("batches") or []
    return next((b["state"] for b in batches if b["batch_id"] == batch_id), None)


def submit_file(c: Container, name: str, user: str = "root", frames: int = 202) -> str:
    """Write a prompt file (in ``user``'s home) and submit it as ``user``; the batch id."""
    home = "/root" if user == "root" else f"/home/{user}"
    path = f"{home}/{name}.txt"
    c.sh(f"printf '%s\\n\\n%s\\n\\n%s\\n\\nblurry\\n' {name} {frames} "
         f"'A video of {name}.' > {path}", user=None if user == "root" else user)
    out = c.sh(f"{SUBMIT} submit {path}", user=None if user == "root" else user).stdout
    found = re.search(r"batch (b\d+)", out)
    if not found:
        raise CheckFailed(f"submit.py did not name a batch: {out!r}")
    return found.group(1)


def wait_done(c: Container, batch_id: str, timeout: float = 90) -> None:
    wait_until(f"batch {batch_id} done",
               lambda: _ended(batch_state(c, batch_id), batch_id), timeout, every=0.5)


def _ended(state: str | None, batch_id: str) -> bool:
    if state in ("failed", "cancelled"):
        raise CheckFailed(f"batch {batch_id} ended {state}")
    return state == "done"


def check_ready(c: Container) -> Result:
    """``enable --now`` of a Type=notify unit returns when READY=1 arrived."""
    began = time.monotonic()
    c.sh(f"systemctl enable --now {UNIT}", timeout=120)
    took = time.monotonic() - began
    props = c.show("ActiveState", "SubState", "Type")
    ok = props["ActiveState"] == "active" and props["SubState"] == "running"
    return Result("ready", ok, f"enable --now -> {props['ActiveState']}/{props['SubState']} "
                  f"(Type={props['Type']}, READY=1) in {took:.2f} s", {"seconds": round(took, 2)})


def check_status_line(c: Container) -> Result:
    """systemd's Status: line is the daemon's STATUS= summary."""
    text = c.show("StatusText")["StatusText"]
    shown = c.sh(f"systemctl status --no-pager --lines=0 {UNIT}", check=False).stdout
    line = next((s.strip() for s in shown.splitlines() if s.strip().startswith("Status:")), "")
    ok = bool(re.match(r"\d+ batches active; \d+ jobs ready, \d+ in flight", text)) \
        and text in line
    return Result("status line", ok, line or "(no Status: line)", {"status": text})


def check_state_dir(c: Container) -> Result:
    """systemd made the state directory: setgid, group-writable, owned by the service."""
    mode, owner = c.sh(f"stat -c '%a %U:%G' {STATE}").stdout.split()
    ok = (mode, owner) == ("2770", "comfy-dual:comfy-dual")
    return Result("state dir", ok, f"{STATE} {mode} {owner}", {"mode": mode, "owner": owner})


def check_group_submit(c: Container) -> Result:
    """A person in the comfy-dual group submits with submit.py; the video renders to done."""
    c.sh("id alice >/dev/null 2>&1 || useradd --create-home --groups comfy-dual alice")
    began = time.monotonic()
    batch = submit_file(c, "alice_video", user="alice")
    wait_done(c, batch)
    took = time.monotonic() - began
    return Result("group submit", True, f"alice (group comfy-dual) submitted {batch}: done in "
                  f"{took:.1f} s", {"batch": batch, "seconds": round(took, 1)})


def check_sigkill(c: Container) -> Result:
    """SIGKILL while a job runs: systemd restarts the daemon after RestartSec, the job
    in flight is recovered from its server and not rendered a second time."""
    before = restarts(c)
    batch = submit_file(c, "killed_mid_job")
    running = wait_until("a job running", lambda: next(
        (j for j in status_json(c)["running"] if j["state"] == "running"), None), 30, every=0.1)
    job, prompt = running["job_id"], running["prompt_id"]
    old = main_pid(c)
    killed = time.monotonic()
    c.sh(f"kill -KILL {old}")
    wait_until("the restarted daemon", lambda: restarts(c) > before
               and c.show("ActiveState")["ActiveState"] == "active", 30, every=0.1)
    back = time.monotonic() - killed
    wait_done(c, batch)
    runs = [r for r in ledger(c) if r["job_id"] == job]
    prompts = [r["prompt_id"] for r in runs]
    ok = prompts == [prompt] and runs[0]["status"] == "success" and back >= 5
    return Result("sigkill", ok, f"killed {old} while {job} ran; active again after "
                  f"{back:.1f} s (RestartSec=5); {job} ran {len(runs)} time(s) on its server, "
                  f"batch {batch} done", {"restart_seconds": round(back, 1), "runs": len(runs)})


def check_stop_time(c: Container) -> Result:
    """``systemctl stop`` (SIGTERM) returns quickly; started again afterwards."""
    began = time.monotonic()
    c.sh(f"systemctl stop {UNIT}", timeout=60)
    took = time.monotonic() - began
    result = c.show("Result", "ExecMainStatus")
    c.sh(f"systemctl start {UNIT}", timeout=60)
    ok = took < 5 and result["Result"] == "success"
    return Result("stop time", ok, f"systemctl stop took {took:.2f} s (result "
                  f"{result['Result']}, exit {result['ExecMainStatus']})",
                  {"seconds": round(took, 2)})


def check_watchdog(c: Container) -> Result:
    """A daemon stopped with SIGSTOP misses its watchdog pings: killed and restarted."""
    before, old = restarts(c), main_pid(c)
    stopped = time.monotonic()
    c.sh(f"kill -STOP {old}")
    wait_until("the watchdog restart", lambda: restarts(c) > before
               and c.show("ActiveState")["ActiveState"] == "active", 75, every=0.5)
    took = time.monotonic() - stopped
    journal = c.sh(f"journalctl -u {UNIT} --no-pager -o cat -n 50", check=False).stdout
    tripped = "Watchdog timeout" in journal
    new = main_pid(c)
    ok = tripped and new != old and 30 <= took < 60
    return Result("watchdog", ok, f"SIGSTOP {old}: watchdog {'tripped' if tripped else 'silent'},"
                  f" restarted as {new} after {took:.1f} s (WatchdogSec=30, RestartSec=5)",
                  {"seconds": round(took, 1)})


def check_bad_config(c: Container) -> Result:
    """A bad configuration exits 2; RestartPreventExitStatus=2 keeps it down. (A manual
    ``systemctl restart`` sets NRestarts back to 0: the count must stay there.)"""
    good = "/etc/comfy-dual/config.toml"
    c.sh(f"cp {good} {good}.good && echo 'MAX_RETRIES = \"many\"' >> {good}")
    try:
        c.sh(f"systemctl restart {UNIT}", check=False, timeout=60)
        first = c.show("ActiveState", "ExecMainStatus", "NRestarts")
        time.sleep(7)  # longer than RestartSec=5: a restart would have happened by now
        props = c.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    finally:
        c.sh(f"mv {good}.good {good}; systemctl reset-failed {UNIT}; systemctl start {UNIT}",
             check=False, timeout=60)
    ok = (props["ExecMainStatus"] == "2" and props["ActiveState"] == "failed"
          and props["NRestarts"] == first["NRestarts"])
    return Result("bad config", ok, f"exit {props['ExecMainStatus']}, {props['ActiveState']} "
                  f"({props['Result']}); restarts {first['NRestarts']} -> {props['NRestarts']} "
                  "in 7 s", {"exit_status": int(props["ExecMainStatus"]),
                              "restarted": props["NRestarts"] != first["NRestarts"]})


def check_security(c: Container) -> Result:
    """systemd-analyze security rates the unit's sandbox (lower is better)."""
    out = c.sh(f"systemd-analyze security --no-pager {UNIT}", check=False).stdout
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) (\S+)", out)
    if not found:
        raise CheckFailed(f"no exposure level in: {out[-300:]!r}")
    score = float(found.group(1))
    return Result("security", score <= 2.0, f"systemd-analyze security: {score} "
                  f"{found.group(2)}", {"score": score})


def check_reboot(c: Container) -> Result:
    """A reboot with a job in flight: the enabled unit starts at boot, and once the
    simulators are started again both the old batch and a new one render to done with
    no run interrupted (a job lost with its server's restart runs again, as documented)."""
    old_batch = submit_file(c, "across_reboot")
    wait_until("a job running", lambda: any(
        j["state"] == "running" for j in status_json(c)["running"]), 30, every=0.1)
    rebooted_at = time.time()
    c.shutdown()
    c.boot()
    active = c.show("ActiveState", "UnitFileState")
    start_simulators(c)
    new_batch = submit_file(c, "after_reboot")
    wait_done(c, old_batch)
    wait_done(c, new_batch)
    runs = [r for r in ledger(c) if float(r["start"]) >= rebooted_at]
    interrupted = [f"{r['job_id']} ({r['prompt_id']})" for r in runs
                   if r["status"] == "interrupted"]
    ok = active["ActiveState"] == "active" and not interrupted
    return Result("reboot", ok, f"{active['UnitFileState']}, {active['ActiveState']} after "
                  f"boot; {old_batch} and {new_batch} done, {len(runs)} runs since the reboot, "
                  f"{len(interrupted)} interrupted{': ' if interrupted else ''}"
                  f"{', '.join(interrupted)}", {"runs": len(runs), "interrupted": interrupted})


CHECKS = [check_ready, check_status_line, check_state_dir, check_group_submit, check_sigkill,
          check_stop_time, check_watchdog, check_bad_config, check_security,
          check_reboot]


# --- running ----------------------------------------------------------------------------


def run_checks(keep: bool) -> tuple[list[Result], dict[str, float]]:
    times: dict[str, float] = {}
    began = time.monotonic()
    preflight()
    rootfs = debian_root()
    times["debian_root_s"] = round(time.monotonic() - began, 1)
    wheels = wheelhouse()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    container = Container(work / "rootfs", {}, work / "nspawn.log")
    results: list[Result] = []
    try:
        bundle = project_bundle(work)
        run(["cp", "-a", "--reflink=auto", str(rootfs), str(container.root)], timeout=300)
        container.binds = {wheels: "/wheels", bundle: "/root/comfy-dual.bundle"}
        say("booting the container")
        container.boot()
        say(f"booted: PID 1 of the container is {container.leader} on the host; installing")
        step = time.monotonic()
        install(container)
        start_simulators(container)
        times["install_s"] = round(time.monotonic() - step, 1)
        for check in CHECKS:
            name = check.__name__.removeprefix("check_").replace("_", " ")
            try:
                result = check(container)
            except CheckFailed as exc:
                result = Result(name, False, str(exc))
            results.append(result)
            print(f"{'PASS' if result.ok else 'FAIL'}  {result.name:<12} {result.detail}",
                  flush=True)
    finally:
        container.shutdown()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    times["total_s"] = round(time.monotonic() - began, 1)
    return results, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the container's root and log (under the cache directory)")
    args = parser.parse_args(argv)
    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C: the container goes down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results, times = run_checks(args.keep)
    except Skip as exc:
        print(f"SKIP  systemd check: {exc}", flush=True)
        if args.json:
            print(json.dumps({"skipped": True, "reason": str(exc)}))
        return SKIPPED
    summary = {"passed": all(r.ok for r in results) and len(results) == len(CHECKS),
               "checks": {r.name: {"ok": r.ok, "detail": r.detail, **r.data} for r in results},
               **times}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        passed = sum(r.ok for r in results)
        print(f"{passed}/{len(CHECKS)} checks passed in {times['total_s']:.0f} s")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The status page, /api/status and /metrics of a real daemon: ``daemon.py`` in service mode
on two simulated ComfyUI servers, WEB_ADDRESS on a free port, one video rendered and one
empty file rejected. Then /metrics must parse and agree with the event log, /api/status
must be status.json, and the page, drawn by a real headless Chromium, must show every
job of the batch as done."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import log_lines, planned_jobs, wait_for

import submit
from simulator import SimConfig, start_simulator

PROJECT = Path(__file__).resolve().parent.parent
DURATIONS = {"HIGH": 0.1, "LOW": 0.1, "COMBINE": 0.03}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Farm:
    state: Path
    url: str
    proc: subprocess.Popen

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kwargs)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in log_lines(self.state)]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        text = self.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def write_config(path: Path, web: str, high: int, low: int) -> None:
    lines = [f'WEB_ADDRESS = "{web}"', "HEALTH_INTERVAL = 0.2", "PROBE_BACKOFF_MAX = 0.5",
             "CONNECT_TIMEOUT = 0.5", "RETRY_DELAY = 0.05"]
    for name, port, kind in (("high_priority", high, "HIGH"), ("low_priority", low, "LOW")):
        lines += ["[[COMFYUI_INSTANCES]]", f'instance_id = "{name}"', 'host = "127.0.0.1"',
                  f"port = {port}", f'job_types = ["{kind}"]']
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    tmp = tmp_path_factory.mktemp("web")
    state, port = tmp / "state", free_port()
    with start_simulator(0, SimConfig(durations=DURATIONS)) as high, \
            start_simulator(0, SimConfig(durations=DURATIONS)) as low:
        write_config(tmp / "config.toml", f"127.0.0.1:{port}", high.port, low.port)
        proc = subprocess.Popen(
            [sys.executable, str(PROJECT / "daemon.py"), "--config", str(tmp / "config.toml"),
             "--state-dir", str(state)], cwd=PROJECT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        farm = Farm(state, f"http://127.0.0.1:{port}", proc)
        try:
            wait_for(lambda: _answers(farm), "the status page")
            video = tmp / "harbour.txt"
            video.write_text("harbour\n\n202\n\nBoats in a harbour at dawn.\n\nblurry\n")
            assert submit.main(["submit", str(video), "--state-dir", str(state)]) == 0
            (tmp / "empty.txt").write_bytes(b"")
            (tmp / "empty.txt").rename(state / "spool" / "incoming" / "empty.txt")
            wait_for(lambda: _batch(farm, "b0001") == "done", "b0001 done")
            wait_for(lambda: (state / "spool" / "rejected" / "empty.txt.reason").exists(),
                     "the empty file rejected")
            yield farm
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def _answers(farm: Farm) -> bool:
    try:
        return farm.get("/api/status").status_code == 200
    except requests.RequestException:
        return False


def _batch(farm: Farm, batch_id: str) -> str | None:
    batches = {b["batch_id"]: b for b in farm.get("/api/status").json()["batches"]}
    return batches.get(batch_id, {}).get("state")


# --- /metrics -----------------------------------------------------------------------------


def _published(farm: Farm) -> dict | None:
    """/metrics once it reflects every line of the log and the rejected file."""
    found = farm.metrics()
    lines = len(farm.events())
    if (found.get(("comfy_dual_event_log_appends_total", ())) == lines
            and found.get(("comfy_dual_event_log_seq", ())) == lines
            and found.get(("comfy_dual_rejected_files", (("reason", "empty"),))) == 1):
        return found
    return None


def test_metrics_parse_and_count_what_the_event_log_holds(farm: Farm) -> None:
    found = wait_for(lambda: _published(farm), "metrics of the whole log")
    events = farm.events()
    by_type = Counter(e["type"] for e in events)
    for kind, count in by_type.items():
        assert found[("comfy_dual_events_total", (("type", kind),))] == count
    kinds = {job_id: job_id.split("/")[1][0] for job_id in planned_jobs(farm.state, "b0001")}
    kinds = {job_id: {"H": "HIGH", "L": "LOW", "C": "COMBINE"}[k] for job_id, k in kinds.items()}
    jobs = Counter(kinds.values())
    assert jobs == {"HIGH": 2, "LOW": 2, "COMBINE": 2}
    for kind, count in jobs.items():
        assert found[("comfy_dual_jobs", (("kind", kind), ("state", "succeeded")))] == count
        assert found[("comfy_dual_jobs", (("kind", kind), ("state", "waiting")))] == 0
        assert found[("comfy_dual_jobs_ready", (("kind", kind),))] == 0
    assert found[("comfy_dual_batches", (("state", "done"),))] == 1
    started = {e["job_id"] for e in events if e["type"] == "job_started"}
    ran = Counter((kinds[e["job_id"]], _instance(events, e["job_id"])) for e in events
                  if e["type"] == "job_succeeded" and e["job_id"] in started)
    for (kind, instance), count in ran.items():
        labels = (("instance", instance), ("kind", kind))
        assert found[("comfy_dual_job_run_seconds_count", labels)] == count
    assert sum(ran.values()) >= 4  # every render was seen starting
    retries = Counter(kinds[e["job_id"]] for e in events if e["type"] == "job_attempt_failed")
    assert sum(v for (name, _), v in found.items() if name == "comfy_dual_job_retries_total") \
        == sum(retries.values())
    for instance in ("high_priority", "low_priority"):
        assert found[("comfy_dual_instance_up", (("instance", instance),))] == 1
        assert found[("comfy_dual_jobs_in_flight", (("instance", instance),))] == 0
        assert found[("comfy_dual_instance_busy_seconds_total", (("instance", instance),))] > 0
    assert found[("comfy_dual_events_since_snapshot", ())] == len(events)  # no snapshot yet
    assert found[("comfy_dual_event_log_fsync_seconds_count", ())] >= 1


def _instance(events: list[dict], job_id: str) -> str:
    return [e for e in events if e["type"] == "job_dispatch_intent"
            and e["job_id"] == job_id][-1]["instance_id"]


# --- /api/status and the rest ----------------------------------------------------------------


def test_api_status_is_status_json(farm: Farm) -> None:
    """The same bytes, taken between two reads of the file that agree (the daemon rewrites
    it every half second)."""
    def same() -> bool:
        before = (farm.state / "status.json").read_bytes()
        served = farm.get("/api/status").content
        return before == served == (farm.state / "status.json").read_bytes()

    wait_for(same, "/api/status equal to status.json")


def test_the_finished_video_is_served_whole_and_by_ranges(farm: Farm) -> None:
    (video,) = wait_for(lambda: farm.get("/api/board").json()["videos"], "a video link")
    saved = farm.state / "outputs" / video["url"].removeprefix("/outputs/")
    whole = farm.get(video["url"])
    assert whole.status_code == 200 and whole.content == saved.read_bytes()
    assert whole.headers["Content-Type"] == "video/mp4"
    part = farm.get(video["url"], headers={"Range": "bytes=4-11"})
    assert part.status_code == 206 and part.content == saved.read_bytes()[4:12]


@pytest.mark.parametrize("path", ["/outputs/../events.jsonl", "/outputs/%2e%2e/status.json",
                                  "/static/../web.py", "/outputs/b0001", "/nothing"])
def test_nothing_outside_the_page_and_the_videos_is_served(farm: Farm, path: str) -> None:
    assert farm.get(path).status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_every_endpoint_is_read_only(farm: Farm, method: str) -> None:
    for path in ("/", "/api/status", "/metrics", "/api/board"):
        answer = requests.request(method, farm.url + path, timeout=10, data=b"{}")
        assert answer.status_code == 405 and answer.headers["Allow"] == "GET, HEAD"


def test_the_rejected_file_is_listed_with_its_reason(farm: Farm) -> None:
    rejected = farm.get("/api/board").json()["rejected"]
    assert [(r["file"], r["class"]) for r in rejected] == [("empty.txt", "empty")]
    assert rejected[0]["reason"].startswith("file is empty")


# --- the page in a real browser -------------------------------------------------------------


class Cells(HTMLParser):
    """The grid cells (``data-job``, ``data-state``) inside each ``data-batch`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.rejected_text: list[str] = []
        self.links: list[str] = []
        self._batch: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div":
            self._batch.append(a.get("data-batch") or (self._batch[-1] if self._batch else
                                                       None))
        classes = (a.get("class") or "").split()
        job, batch = a.get("data-job"), self._batch[-1] if self._batch else None
        if "cell" in classes and job and batch:
            self.cells.setdefault(batch, {})[job] = a.get("data-state") or ""
        href = a.get("href") or ""
        if tag == "a" and href.startswith("/outputs/"):
            self.links.append(href)

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._batch:
            self._batch.pop()


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium here: install Debian's `chromium` (.ci/run does) to draw "
                    "the page in a real browser")
    return found


def dump_dom(url: str) -> str:
    """The page as Chromium has it after its script ran (a few seconds of virtual time)."""
    with tempfile.TemporaryDirectory(prefix="comfy-dual-chromium-") as profile:
        done = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True, text=True, timeout=90,
            env={**os.environ, "HOME": profile})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_shows_every_job_of_the_finished_batch_as_done(farm: Farm) -> None:
    dom = dump_dom(farm.url + "/")
    page = Cells()
    page.feed(dom)
    expected = set(planned_jobs(farm.state, "b0001"))
    assert page.cells.get("b0001") == dict.fromkeys(expected, "succeeded"), dom[-3000:]
    assert len(expected) == 6
    assert len(page.links) == 1 and page.links[0].startswith("/outputs/b0001/")
    assert "empty.txt" in dom and "file is empty" in dom
    assert 'class="lane"' in dom or "comfy-dual timeline" in dom  # the Gantt was drawn

"""``submit.py report``: the Gantt chart drawn from a real event log, read back as XML."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from support import dispatch, make_plan

import submit
from service import report
from statedir import StateDir
from statemachine import events as ev
from statemachine.log import EventLog, MemoryLog
from statemachine.planner import PromptSpec, plan_batch
from statemachine.rules import Policy, failure_event
from statemachine.store import Store, read_records
from statemachine.timeline import build_timeline

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>alert(1)</script> & "x"'
T0 = 1_700_000_000.0  # when b0001 is accepted


def hostile_plan(batch_id: str) -> ev.BatchAccepted:
    spec = PromptSpec(name=HOSTILE, frames=202, positive="a test")
    sha = hashlib.sha256(batch_id.encode()).hexdigest()
    return ev.BatchAccepted(plan_batch(spec, batch_id=batch_id, sha256=sha, source="x.txt",
                                       frames_per_chunk=101, width=832, height=480))


def run(store: Store, job_id: str, instance: str, start: float, end: float, *,
        ok: bool = True) -> None:
    """One attempt: dispatched a moment before ``start``, started, ended at ``end``."""
    prompt_id = dispatch(store, job_id, instance, T0 + start - 0.05)
    store.record(ev.JobQueued(job_id, prompt_id, 1), T0 + start - 0.05)
    store.record(ev.JobStarted(job_id, prompt_id), T0 + start)
    outcome = ev.JobSucceeded(job_id, prompt_id, {}) if ok else failure_event(
        store.jobs[job_id], "boom", permanent=False, now=T0 + end, policy=store.policy)
    store.record(outcome, T0 + end)


def write_log(state: Path) -> None:
    """b0001 (hostile name): H1 fails once, then every job succeeds; b0002: L1 is lost by
    its server before it starts, then runs; b0003: H1 still running when the log ends. The
    instance "idle" is up but runs nothing."""
    log = EventLog(state)
    store = Store(log, Policy(max_retries=2, retry_delay=0.25))
    store.record(ev.InstanceUp("idle"), T0)
    store.record(hostile_plan("b0001"), T0)
    store.record(ev.BatchAccepted(make_plan("b0002", frames=101)), T0 + 0.5)
    run(store, "b0001/H1", "high", 1, 2, ok=False)
    run(store, "b0002/H1", "high", 2, 3)
    run(store, "b0001/H1", "high", 3, 4)
    lost = dispatch(store, "b0002/L1", "low", T0 + 3.1)
    store.record(ev.JobLost("b0002/L1", lost, "server restarted"), T0 + 3.2)
    run(store, "b0002/L1", "low", 3.3, 4)  # b0002's gate opens at 4
    run(store, "b0002/C1", "high", 4.1, 4.5)
    run(store, "b0001/L1", "low", 4.1, 5)
    run(store, "b0001/H2", "high", 5.1, 6)
    store.record(ev.BatchAccepted(make_plan("b0003", frames=101)), T0 + 6)
    prompt_id = dispatch(store, "b0003/H1", "high", T0 + 6.5)
    store.record(ev.JobStarted("b0003/H1", prompt_id), T0 + 6.5)
    run(store, "b0001/L2", "low", 6.1, 7)  # b0001's gate opens at 7
    run(store, "b0001/C1", "high", 7.1, 7.5)
    run(store, "b0001/C2", "high", 7.6, 8)
    store.commit()
    log.close()


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "var"
    write_log(path)
    return path


def draw(capsys, state: Path, out: Path, *argv: str) -> tuple[int, str, str]:
    code = submit.main(["report", *argv, "--state-dir", str(state), "-o", str(out)])
    printed, errors = capsys.readouterr()
    return code, printed, errors


def svg_of(path: Path) -> ET.Element:
    return svg_of_text(path.read_text())


def svg_of_text(text: str) -> ET.Element:
    """The <svg> element of an SVG file or of the HTML page holding it."""
    return ET.fromstring(text[text.index("<svg"): text.index("</svg>") + len("</svg>")])


def classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def bars(svg: ET.Element) -> list[tuple[str, ET.Element, str]]:
    """(instance, rect, tooltip) of every attempt's bar."""
    return [(lane.attrib["data-instance"], child(g, "rect"), child(g, "title").text or "")
            for lane in svg.iter(f"{SVG}g") if classes(lane) == {"bars"}
            for g in lane.findall(f"{SVG}g")]


def child(element: ET.Element, tag: str) -> ET.Element:
    """The first SVG ``tag`` element below ``element``: there must be one."""
    found = element.find(f"{SVG}{tag}")
    assert found is not None, f"no <{tag}> in {element.attrib}"
    return found


def test_one_lane_per_instance_that_ran_something_and_one_bar_per_attempt(
        capsys, state, tmp_path):
    code, printed, _ = draw(capsys, state, tmp_path / "t.html")
    assert code == 0
    assert "3 batches, 12 attempts on 2 instances" in printed
    svg = svg_of(tmp_path / "t.html")
    lanes = [g.get("data-instance") for g in svg.iter(f"{SVG}g") if classes(g) == {"lane"}]
    assert lanes == ["high", "low"]
    drawn = sorted((inst, rect.attrib["data-job"]) for inst, rect, _ in bars(svg))
    assert drawn == sorted([
        ("high", "b0001/H1"), ("high", "b0001/H1"), ("high", "b0002/H1"),
        ("high", "b0002/C1"), ("high", "b0001/H2"), ("high", "b0003/H1"),
        ("high", "b0001/C1"), ("high", "b0001/C2"), ("low", "b0002/L1"),
        ("low", "b0002/L1"), ("low", "b0001/L1"), ("low", "b0001/L2")])
    kinds = {"H": "HIGH", "L": "LOW", "C": "COMBINE"}
    for _, rect, _ in bars(svg):
        kind = kinds[rect.attrib["data-job"].split("/")[1][0]]
        assert {"bar", kind} <= classes(rect)
        assert not classes(rect) & (set(kinds.values()) - {kind})


def test_attempts_that_did_not_succeed_are_marked_with_their_outcome(capsys, state, tmp_path):
    draw(capsys, state, tmp_path / "t.html")
    marked = {(rect.attrib["data-job"], frozenset(classes(rect) - {"bar", "HIGH", "LOW"})):
              tip for _, rect, tip in bars(svg_of(tmp_path / "t.html"))
              if rect.attrib["data-job"] in ("b0001/H1", "b0002/L1", "b0003/H1")}
    assert set(marked) == {
        ("b0001/H1", frozenset({"bad", "retry"})), ("b0001/H1", frozenset()),
        ("b0002/L1", frozenset({"bad", "lost"})), ("b0002/L1", frozenset()),
        ("b0003/H1", frozenset({"running"}))}
    assert "failed, retried later" in marked["b0001/H1", frozenset({"bad", "retry"})]
    assert "lost by the server" in marked["b0002/L1", frozenset({"bad", "lost"})]
    assert "in flight" in marked["b0003/H1", frozenset({"running"})]


def test_bars_sit_on_the_time_axis_and_overlaps_take_another_track(capsys, state, tmp_path):
    draw(capsys, state, tmp_path / "t.svg")
    found = {(rect.attrib["data-job"], "bad" in classes(rect)): rect
             for _, rect, _ in bars(svg_of(tmp_path / "t.svg"))}
    first, c2 = found["b0001/H1", True], found["b0001/C2", False]
    per_second = (float(c2.attrib["x"]) - float(first.attrib["x"])) / 6.6  # starts at 1 and 7.6
    assert float(first.attrib["x"]) == pytest.approx(report.LEFT + per_second, abs=0.2)
    assert float(first.attrib["width"]) == pytest.approx(per_second - 1, abs=0.2)
    running, c1 = found["b0003/H1", False], found["b0001/C1", False]
    assert running.attrib["y"] != c1.attrib["y"]  # in flight from 6.5 beside C1 at 7.1
    assert float(running.attrib["x"]) + float(running.attrib["width"]) == pytest.approx(
        float(c2.attrib["x"]) + float(c2.attrib["width"]), abs=0.2)  # up to where the log ends


def test_each_batch_gate_is_a_dashed_line_with_its_batch_id(capsys, state, tmp_path):
    draw(capsys, state, tmp_path / "t.svg")
    svg = svg_of(tmp_path / "t.svg")
    gates = {g.get("data-batch"): g for g in svg.iter(f"{SVG}g") if classes(g) == {"gate"}}
    assert set(gates) == {"b0001", "b0002"}  # b0003 has not rendered yet
    for batch_id, g in gates.items():
        assert g.findtext(f"{SVG}text") == batch_id
        assert "COMBINE gate opened" in (child(g, "title").text or "")
    x = {b: float(child(g, "line").attrib["x1"]) for b, g in gates.items()}
    assert x["b0002"] < x["b0001"]


def test_a_hostile_video_name_is_escaped_everywhere(capsys, state, tmp_path):
    draw(capsys, state, tmp_path / "t.html")
    page = (tmp_path / "t.html").read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot;" in page
    tips = [tip for _, rect, tip in bars(svg_of(tmp_path / "t.html"))
            if rect.attrib["data-job"].startswith("b0001/")]
    assert tips and all(f"video {HOSTILE} (batch b0001)" in tip for tip in tips)


def test_named_batches_only_and_time_zero_is_the_first_ones_acceptance(
        capsys, state, tmp_path):
    code, printed, _ = draw(capsys, state, tmp_path / "t.svg", "b0002")
    assert code == 0 and "1 batch, 4 attempts on 2 instances" in printed
    svg = svg_of(tmp_path / "t.svg")
    assert {rect.attrib["data-job"].split("/")[0] for _, rect, _ in bars(svg)} == {"b0002"}
    gates = [g.get("data-batch") for g in svg.iter(f"{SVG}g") if classes(g) == {"gate"}]
    assert gates == ["b0002"]
    h1 = next(rect for _, rect, _ in bars(svg) if rect.attrib["data-job"] == "b0002/H1")
    assert float(h1.attrib["x"]) == pytest.approx(report.LEFT + 1.5 / 4 * report.PLOT_W,
                                               abs=0.2)  # starts 1.5 s into 4 s


def test_a_running_daemons_clock_ends_the_attempts_in_flight(state):
    tl = submit.read_timeline(StateDir(state))
    stopped, running = (report.chart(tl, ["b0003"], now) for now in (None, T0 + 16))
    assert (stopped.makespan, running.makespan) == (pytest.approx(2), pytest.approx(10))
    assert running.busy_share("high") == pytest.approx(9.5 / 10)


def test_the_same_log_gives_the_same_bytes(capsys, state, tmp_path):
    for name in ("a.html", "b.html"):
        assert draw(capsys, state, tmp_path / name, "--all")[0] == 0
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


@pytest.mark.parametrize(("output", "argv", "message"), [
    ("t.html", ["b0002", "b9"],
     "unknown batch 'b9' (batches in the event log: b0001, b0002, b0003)"),
    ("t.html", ["b0001", "--all"], "name batches or give --all, not both"),
    ("t.png", [], "name the file *.html or *.svg"),
])
def test_bad_requests_exit_2_with_a_reason_and_write_nothing(capsys, state, tmp_path, output,
                                                             argv, message):
    code, _, errors = draw(capsys, state, tmp_path / output, *argv)
    assert code == 2 and message in errors
    assert list(tmp_path.iterdir()) == []


def test_an_empty_state_directory_has_nothing_to_report(capsys, tmp_path):
    code, _, errors = draw(capsys, tmp_path / "var", tmp_path / "t.html")
    assert code == 2 and "holds no batch" in errors


def test_after_a_snapshot_every_batch_is_still_drawn_from_the_kept_segments(capsys, tmp_path):
    state = tmp_path / "var"
    write_log(state)
    log = EventLog(state)
    store = Store.open(log)
    store.compact()
    store.record(ev.BatchAccepted(make_plan("b0004", frames=101)), T0 + 9)
    run(store, "b0004/H1", "low", 9.1, 10)
    store.commit()
    log.close()
    assert (state / "events.jsonl").read_bytes().count(b"\n") == store.seq - store.snapshot_seq
    code, printed, errors = draw(capsys, state, tmp_path / "t.svg")
    assert code == 0 and printed.startswith(f"{tmp_path / 't.svg'}: 4 batches")
    assert "no longer holds" not in errors


def test_with_a_retention_only_the_batches_of_the_kept_segments_are_drawn(capsys, tmp_path):
    state = tmp_path / "var"
    write_log(state)
    log = EventLog(state, retention=2)
    store = Store.open(log)
    store.compact()  # the first segment: every line is in this snapshot
    second = store.seq + 1
    store.record(ev.BatchAccepted(make_plan("b0004", frames=101)), T0 + 9)
    run(store, "b0004/H1", "low", 9.1, 10)
    prompt_id = store.jobs["b0003/H1"].flying_prompt_id
    store.record(ev.JobSucceeded("b0003/H1", prompt_id, {}), T0 + 10)  # accepted before
    store.compact()  # two snapshots kept: the first segment goes
    log.close()
    assert [p.name for p in (state / "segments").iterdir()] == [f"events-{second:012d}.jsonl"]
    code, printed, errors = draw(capsys, state, tmp_path / "t.svg")
    assert code == 0 and "1 batch, 1 attempt on 1 instance" in printed
    assert "no longer holds its oldest events" in errors


def test_a_single_attempt_and_two_thousand_jobs_both_draw():
    """One job in flight: an axis and one bar. 2,001 jobs: one bar each, a few MB at most."""
    log = MemoryLog()
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("one", frames=101)), T0)
    dispatch(store, "one/H1", "high", T0)
    store.commit()
    tl = build_timeline(read_records(log))
    svg = ET.fromstring(report.render_svg(report.chart(tl, ["one"])))
    assert [rect.attrib["data-job"] for _, rect, _ in bars(svg)] == ["one/H1"]
    big = Store(MemoryLog())
    for n in range(667):  # 3 jobs each
        big.record(ev.BatchAccepted(make_plan(f"b{n}", frames=101)), T0 + n)
        for step, (job, instance) in enumerate((("H1", "high"), ("L1", "low"),
                                                  ("C1", "high"))):
            run(big, f"b{n}/{job}", instance, n + 0.1 + step / 4, n + 0.3 + step / 4)
    big.commit()
    tl = build_timeline(read_records(big.log))
    text = report.render_html(report.chart(tl, list(tl.batches)))
    assert len(text) < 3_000_000
    assert len(bars(svg_of_text(text))) == 2001


def test_tick_steps_are_round_and_few():
    assert [report.tick_step(s) for s in (0.1, 1, 4, 7.2, 95, 3600)] == pytest.approx(
        [0.01, 0.1, 0.5, 1, 10, 500])
    assert report.tick_text(0.5, 0.5) == "0.5" and report.tick_text(1500, 500) == "1500"

"""``submit.py report``: the event log's timeline drawn as a Gantt chart, one lane per server.

Each dispatch attempt is a bar from when its server started it (or, if no start was seen,
when it was dispatched) to when it ended, coloured by job kind; attempts that did not
succeed are hatched and outlined in red; each batch's COMBINE gate is a dashed vertical
line. The output is one self-contained SVG (its own CSS, no script, no external assets),
alone or inside a small HTML page with a table of the batches. The same timeline and the
same ``now`` give the same bytes, so the output can be compared and tested.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from statemachine import events as ev
from statemachine.errors import BadInput
from statemachine.timeline import Attempt, BatchSpan, Timeline, busy_seconds

FORMATS = {".html": "html", ".htm": "html", ".svg": "svg"}

# Okabe-Ito colours (told apart with the common colour-vision deficiencies); label ink.
KINDS = {"HIGH": ("#E69F00", "#111"), "LOW": ("#0072B2", "#fff"),
         "COMBINE": ("#009E73", "#fff")}
FAILED = "#C62828"
OUTCOMES = {
    "succeeded": "succeeded", "retry": "failed, retried later", "failed": "failed for good",
    "lost": "lost by the server, run again", "cancelled": "cancelled", None: "in flight",
}

LEFT, PLOT_W, RIGHT = 240, 1000, 30  # label column, plot, right margin (px)
PX_PER_ATTEMPT, MAX_PLOT_W = 6, 16000  # a busy chart grows wider, to this much at most
HEADER_H, GATE_ROWS, GATE_ROW_H = 112, 3, 13
TRACK_H, LANE_PAD, AXIS_H = 22, 6, 44
SHARED_PX = 3  # bars overlapping by at most this much share a track
CHAR_W, GATE_CHAR_W = 6.6, 6.5  # width of a character of an 11 px, 10 px label (guess)
TICK_PX = 100  # at most one tick per this many pixels
MIN_SPAN = 0.1  # seconds: the shortest axis drawn (a chart where nothing took time)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(text: object) -> str:
    """Text made safe for XML and HTML content and attribute values."""
    return html.escape(_NOT_XML.sub("\ufffd", str(text)), quote=True)


def output_format(path: Path) -> str:
    """"html" or "svg", from the name of the file to write."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadInput(f"{path}: cannot write that format; name the file *.html or *.svg")
    return fmt


def accepted_in(records: Iterable[ev.Recorded]) -> Iterator[ev.Recorded]:
    """The records of batches whose acceptance is among ``records``. After a compaction the
    log starts with a snapshot, and events of the batches it holds cannot be drawn."""
    batches: set[str] = set()
    jobs: set[str] = set()
    for rec in records:
        e = rec.event
        if isinstance(e, ev.BatchAccepted):
            batches.add(e.batch_id)
            jobs.update(j.job_id for j in e.plan.jobs)
        job_id, batch_id = getattr(e, "job_id", None), getattr(e, "batch_id", None)
        if (job_id is None or job_id in jobs) and (batch_id is None or batch_id in batches):
            yield rec


def select_batches(tl: Timeline, wanted: Sequence[str]) -> list[str]:
    """``wanted`` (in order, without repeats), or every batch if none; BadInput names the
    batch ids the timeline does not know."""
    known = list(tl.batches)
    if not known:
        raise BadInput("the event log holds no batch to report")
    chosen = list(dict.fromkeys(wanted)) or known
    unknown = [b for b in chosen if b not in tl.batches]
    if unknown:
        listed = ", ".join(known[-10:])
        raise BadInput(f"unknown batch {', '.join(map(repr, unknown))} "
                       f"(batches in the event log: {listed})")
    return chosen


# --- what is shown -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chart:
    """The shown part of a timeline. Times are seconds since the epoch; ``start`` is when
    the first shown batch was accepted, ``now`` is where attempts still in flight end."""

    batches: dict[str, BatchSpan]  # in the order asked for
    attempts: tuple[Attempt, ...]
    lanes: tuple[str, ...]  # instances, in the order of their first attempt
    gates: tuple[tuple[str, float], ...]  # (batch id, when its COMBINE gate opened)
    start: float
    end: float
    now: float

    @property
    def makespan(self) -> float:
        return self.end - self.start

    def ended(self, attempt: Attempt) -> float:
        return attempt.ended_at if attempt.ended_at is not None else self.now

    def busy_share(self, instance_id: str) -> float:
        busy = busy_seconds(self.attempts, instance_id, until=self.now)
        return busy / self.makespan if self.makespan > 0 else 0.0

    def all_done(self) -> bool:
        return all(b.state == "done" for b in self.batches.values())


def latest(spans: Iterable[BatchSpan], attempts: Iterable[Attempt],
           gates: Iterable[float]) -> float:
    """The last time any of these recorded."""
    times = [t for s in spans for t in (s.accepted_at, s.ended_at)]
    times += [t for a in attempts for t in (a.dispatched_at, a.started_at, a.ended_at)]
    return max([t for t in times if t is not None] + list(gates))


def chart(tl: Timeline, batch_ids: Sequence[str], now: float | None = None) -> Chart:
    """The chart of ``batch_ids``. ``now`` (a running daemon's clock) ends the attempts in
    flight; without it they end at the last time the timeline recorded, which keeps the
    chart of a stopped daemon's log the same whenever it is drawn."""
    mine = set(batch_ids)
    spans = {b: tl.batches[b] for b in batch_ids}
    attempts = tuple(a for a in tl.attempts if a.batch_id in mine)
    gates = tuple((b, tl.gates[b]) for b in batch_ids if b in tl.gates)
    last = latest(tl.batches.values(), tl.attempts, tl.gates.values())
    clock = last if now is None else max(now, last)
    unfinished = any(a.ended_at is None for a in attempts) or any(
        s.ended_at is None for s in spans.values())
    end = clock if unfinished else latest(spans.values(), attempts, (t for _, t in gates))
    lanes = tuple(dict.fromkeys(a.instance_id for a in attempts))
    start = min(s.accepted_at for s in spans.values())
    return Chart(spans, attempts, lanes, gates, start, end, clock)


# --- drawing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scale:
    """Seconds since the chart's start -> x in pixels."""

    start: float
    span: float
    width: float  # of the plot, in pixels

    @classmethod
    def of(cls, c: Chart) -> Scale:
        """PLOT_W wide, or wider when the busiest lane has many attempts."""
        most = max(Counter(a.instance_id for a in c.attempts).values(), default=0)
        width = min(MAX_PLOT_W, max(PLOT_W, PX_PER_ATTEMPT * most))
        return cls(c.start, max(c.makespan, MIN_SPAN), width)

    def x(self, t: float) -> float:
        return LEFT + (t - self.start) * self.width / self.span


def plural(n: int, noun: str) -> str:
    """``1 batch``, ``2 batches``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{n} {noun}s"


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s"


def tick_step(span: float, most: int = 10) -> float:
    """1, 2 or 5 times a power of ten: the smallest giving at most ``most`` intervals."""
    raw = span / most
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def tick_text(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def tracks(attempts: Sequence[Attempt], ended: dict[int, float], slack: float
           ) -> tuple[dict[int, int], int]:
    """Rows within one lane so that attempts overlapping in time (a job waiting in a
    server's queue beside the running one) do not hide each other: the track of each
    attempt (by ``id``) and how many tracks the lane needs. Overlaps up to ``slack``
    seconds share a track: a server reports the next job started a moment before the
    previous one's success is recorded."""
    track_ends: list[float] = []
    placed: dict[int, int] = {}
    for a in sorted(attempts, key=lambda a: a.busy_from):
        row = next((i for i, e in enumerate(track_ends) if e - slack <= a.busy_from),
                   len(track_ends))
        if row == len(track_ends):
            track_ends.append(0.0)
        track_ends[row] = ended[id(a)]
        placed[id(a)] = row
    return placed, max(1, len(track_ends))


@dataclass(frozen=True, slots=True)
class Lane:
    """Where one server's attempts go: its rows start at ``y`` and take ``height``."""

    instance_id: str
    attempts: tuple[Attempt, ...]
    rows: dict[int, int]  # id(attempt) -> its track
    y: int
    height: int


def layout(c: Chart, scale: Scale, top: int) -> list[Lane]:
    by_lane: dict[str, list[Attempt]] = {lane: [] for lane in c.lanes}
    for a in c.attempts:
        by_lane[a.instance_id].append(a)
    lanes, y = [], top
    for instance_id, attempts in by_lane.items():
        rows, count = tracks(attempts, {id(a): c.ended(a) for a in attempts},
                             slack=SHARED_PX * scale.span / scale.width)
        height = count * TRACK_H + 2 * LANE_PAD
        lanes.append(Lane(instance_id, tuple(attempts), rows, y, height))
        y += height
    return lanes


def render_svg(c: Chart) -> str:
    """The chart as a standalone SVG document: lane backgrounds, then the time grid, then
    the bars and the gates over them."""
    scale = Scale.of(c)
    top = HEADER_H + GATE_ROWS * GATE_ROW_H + 6
    lanes = layout(c, scale, top)
    bottom = lanes[-1].y + lanes[-1].height if lanes else top + TRACK_H
    heads = (lane_head(c, lane, i, scale.width) for i, lane in enumerate(lanes))
    body = [svg_header(c), legend(), *heads, draw_axis(scale, top, bottom),
            *(lane_bars(c, scale, lane) for lane in lanes), draw_gates(c, scale, top, bottom)]
    width, height = LEFT + round(scale.width) + RIGHT, bottom + AXIS_H
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">\n{style()}\n'
            f'{"".join(body)}</svg>\n')


def style() -> str:
    kinds = "".join(f"rect.{k}{{fill:{fill}}}rect.bad.{k}{{fill:url(#hatch-{k})}}"
                    f"text.lbl.{k}{{fill:{ink}}}" for k, (fill, ink) in KINDS.items())
    patterns = "".join(
        f'<pattern id="hatch-{k}" width="7" height="7" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="7" height="7" fill="{fill}"/>'
        f'<rect width="3" height="7" fill="{FAILED}"/></pattern>'
        for k, (fill, _) in KINDS.items())
    return (f"<style>text{{font-size:12px;fill:#222}}rect.bar{{fill:#999}}{kinds}"
            f"rect.bad{{stroke:{FAILED};stroke-width:2}}rect.running{{opacity:.55}}"
            "text.lbl{font-size:11px;pointer-events:none}"
            "text.lbl.bad{fill:#111;paint-order:stroke;stroke:#fff;stroke-width:3px}"
            "text.small{font-size:10px;fill:#555}"
            "text.title{font-size:16px;font-weight:bold}text.lane-id{font-weight:bold}"
            "rect.lane{fill:#f4f4f4}rect.lane.odd{fill:#fbfbfb}line.tick{stroke:#ddd}"
            "line.gate{stroke:#333;stroke-width:1.5;stroke-dasharray:6 4}"
            f"</style><defs>{patterns}</defs>")


def batch_states(c: Chart) -> str:
    counts = Counter(b.state for b in c.batches.values())
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def svg_header(c: Chart) -> str:
    since = datetime.fromtimestamp(c.start, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    bad = sum(1 for a in c.attempts if a.outcome not in ("succeeded", None))
    state = "every batch done" if c.all_done() else batch_states(c)
    busy = "; ".join(f"{lane} {c.busy_share(lane):.1%}" for lane in c.lanes) or "nothing ran"
    lines = [
        (' class="title"', f"comfy-dual timeline: {plural(len(c.batches), 'batch')}, "
                           f"{plural(len(c.attempts), 'attempt')} ({bad} did not succeed)"),
        ("", f"Makespan {c.makespan:.1f} s ({state}); time 0 = {since}"),
        ("", f"Busy share: {busy}"),
    ]
    return "".join(f'<text{cls} x="12" y="{24 + 20 * i}">{esc(text)}</text>'
                   for i, (cls, text) in enumerate(lines))


def legend() -> str:
    y = 82
    swatches = [(f"swatch {k}", k) for k in KINDS]
    swatches += [("swatch HIGH bad", "did not succeed"), ("swatch HIGH running", "in flight")]
    parts = [f'<rect class="{cls}" x="{12 + 150 * i}" y="{y}" width="26" height="12"/>'
             f'<text x="{44 + 150 * i}" y="{y + 11}">{text}</text>'
             for i, (cls, text) in enumerate(swatches)]
    x = 12 + 150 * len(swatches)
    parts.append(f'<line class="gate" x1="{x + 13}" x2="{x + 13}" y1="{y - 2}" y2="{y + 14}"/>'
                 f'<text x="{x + 32}" y="{y + 11}">COMBINE gate opens</text>')
    return "\n".join(parts) + "\n"


def lane_head(c: Chart, lane: Lane, index: int, width: float) -> str:
    """A lane's background and label: the server, its busy share and the jobs it ran."""
    share = c.busy_share(lane.instance_id)
    runs = plural(sum(1 for a in lane.attempts if a.outcome == "succeeded"), "job")
    name, parity = esc(lane.instance_id), " odd" if index % 2 else ""
    return (f'<g class="lane" data-instance="{name}"><title>{name}: busy {share:.1%} of '
            f'{secs(c.makespan)}, {runs} run, {plural(len(lane.attempts), "attempt")}</title>'
            f'<rect class="lane{parity}" x="0" y="{lane.y}" width="{LEFT + width:.0f}" '
            f'height="{lane.height}"/><text class="lane-id" x="12" y="{lane.y + 15}">'
            f'{esc(shorten(lane.instance_id, 30))}</text><text class="small" x="12" '
            f'y="{lane.y + 28}">busy {share:.1%}, {runs}</text></g>\n')


def lane_bars(c: Chart, scale: Scale, lane: Lane) -> str:
    bars = "".join(bar(c, scale, a, lane.y + LANE_PAD + lane.rows[id(a)] * TRACK_H)
                   for a in lane.attempts)
    return f'<g class="bars" data-instance="{esc(lane.instance_id)}">\n{bars}</g>\n'


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bar(c: Chart, scale: Scale, a: Attempt, y: int) -> str:
    """One attempt: a rect (classes: ``bar``, its kind, and ``bad`` plus the outcome if it
    did not succeed, or ``running``), a tooltip, and its job id if there is room."""
    x0, x1 = scale.x(a.busy_from), scale.x(c.ended(a))
    width = max(x1 - x0 - 1, 1.0)  # a pixel between bars that touch
    bad = a.outcome not in ("succeeded", None)
    status = f" bad {esc(a.outcome)}" if bad else " running" if a.outcome is None else ""
    rect = (f'<rect class="bar {esc(a.kind)}{status}" x="{x0:.1f}" y="{y + 1}" '
            f'width="{width:.1f}" height="{TRACK_H - 2}" data-job="{esc(a.job_id)}"/>')
    text = label(a.job_id, width)
    if text:
        text = (f'<text class="lbl {esc(a.kind)}{" bad" if bad else ""}" x="{x0 + 3:.1f}" '
                f'y="{y + TRACK_H - 7}">{esc(text)}</text>')
    return f"<g><title>{esc(tooltip(c, a))}</title>{rect}{text}</g>\n"


def label(job_id: str, width: float) -> str:
    """The job id if it fits in ``width`` pixels, else its part after the batch id, else
    nothing."""
    return next((t for t in (job_id, job_id.rsplit("/", 1)[-1])
                 if len(t) * CHAR_W + 6 <= width), "")


def tooltip(c: Chart, a: Attempt) -> str:
    begin, end = a.busy_from - c.start, c.ended(a) - c.start
    queued = ("" if a.started_at is None else
              f"; {secs(a.started_at - a.dispatched_at)} from dispatch to start")
    until = "now" if a.ended_at is None else secs(end)
    return (f"{a.job_id} ({a.kind}): {OUTCOMES.get(a.outcome, a.outcome)}\n"
            f"video {c.batches[a.batch_id].name} (batch {a.batch_id})\n"
            f"on {a.instance_id}, prompt {a.prompt_id}\n"
            f"{secs(begin)} to {until}, {secs(end - begin)}{queued}")


def draw_axis(scale: Scale, top: int, bottom: int) -> str:
    step = tick_step(scale.span, most=round(scale.width / TICK_PX))
    parts = [f'<line x1="{LEFT}" x2="{LEFT + scale.width}" y1="{bottom}" y2="{bottom}" '
             f'stroke="#888"/>']
    for i in range(int(scale.span / step * (1 + 1e-9)) + 1):
        x = scale.x(scale.start + i * step)
        parts.append(f'<line class="tick" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                     f'y2="{bottom + 5}"/><text x="{x:.1f}" y="{bottom + 18}" '
                     f'text-anchor="middle">{tick_text(i * step, step)}</text>')
    parts.append(f'<text class="small" x="{LEFT + scale.width / 2}" y="{bottom + 36}" '
                 f'text-anchor="middle">seconds since the first batch shown was accepted'
                 f'</text>')
    return "".join(parts) + "\n"


def gate_rows(c: Chart, scale: Scale) -> dict[str, int]:
    """The label row of each gate: the first of GATE_ROWS rows where it does not overlap
    the label before it. Gates left out (where every row is taken) have a line and a
    tooltip but no label."""
    row_ends = [float("-inf")] * GATE_ROWS
    rows = {}
    for batch_id, at in sorted(c.gates, key=lambda gate: gate[1]):
        x = scale.x(at)
        row = next((i for i, end in enumerate(row_ends) if end <= x), None)
        if row is not None:
            rows[batch_id] = row
            row_ends[row] = x + len(batch_id) * GATE_CHAR_W + 8
    return rows


def draw_gates(c: Chart, scale: Scale, top: int, bottom: int) -> str:
    """A dashed line where each batch's COMBINE gate opened, labelled with the batch id."""
    rows = gate_rows(c, scale)
    parts = []
    for batch_id, at in c.gates:
        x, row = scale.x(at), rows.get(batch_id)
        label_y = HEADER_H + ((row or 0) + 1) * GATE_ROW_H
        text = "" if row is None else (
            f'<text class="small" x="{x + 3:.1f}" y="{label_y}">{esc(batch_id)}</text>')
        parts.append(
            f'<g class="gate" data-batch="{esc(batch_id)}"><title>{esc(batch_id)} '
            f'{esc(c.batches[batch_id].name)}: COMBINE gate opened at {secs(at - c.start)}'
            f'</title><line class="gate" x1="{x:.1f}" x2="{x:.1f}" '
            f'y1="{top if row is None else label_y + 2}" y2="{bottom}"/>{text}</g>\n')
    return "".join(parts)


# --- the HTML page -------------------------------------------------------------------------

PAGE_CSS = ("body{font:14px sans-serif;margin:16px;color:#222}.chart{overflow-x:auto}"
            "table{border-collapse:collapse}th,td{padding:2px 12px 2px 0;text-align:left}"
            "td.n{text-align:right}")


def batch_row(c: Chart, b: BatchSpan, gate: float | None) -> str:
    cells = [b.batch_id, b.name, b.state, f"{b.succeeded}/{b.jobs}",
             secs(b.accepted_at - c.start),
             "-" if gate is None else secs(gate - c.start),
             "-" if b.ended_at is None else secs(b.ended_at - c.start),
             "-" if b.ended_at is None else secs(b.ended_at - b.accepted_at)]
    return "<tr>" + "".join(f'<td{" class=n" if i >= 3 else ""}>{esc(v)}</td>'
                            for i, v in enumerate(cells)) + "</tr>\n"


def render_html(c: Chart) -> str:
    """A page holding the SVG and a table of the batches shown."""
    heads = ("batch", "video", "state", "jobs", "accepted", "gate opened", "ended", "took")
    gates = dict(c.gates)
    rows = "".join(batch_row(c, b, gates.get(b.batch_id)) for b in c.batches.values())
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>comfy-dual timeline</title><style>{PAGE_CSS}</style></head>\n<body>\n"
            f'<div class="chart">\n{render_svg(c)}</div>\n<h2>Batches</h2>\n<table>'
            f"<tr>{''.join(f'<th>{h}</th>' for h in heads)}</tr>\n{rows}</table>\n"
            "</body></html>\n")


RENDERERS = {"html": render_html, "svg": render_svg}

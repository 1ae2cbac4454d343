"""The end-of-run summary: per batch its state, jobs and wall time; per instance the jobs
it ran and how busy it was. Everything comes from the event log's timeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from statemachine.timeline import Timeline, busy_seconds


@dataclass(frozen=True, slots=True)
class RunFigures:
    makespan: float
    busy: dict[str, float]  # instance -> share of the makespan spent running jobs
    jobs_run: dict[str, int]
    all_done: bool


def figures(tl: Timeline, batch_ids: Sequence[str], instances: Sequence[Any]) -> RunFigures:
    spans = [tl.batches[b] for b in batch_ids]
    start = min((s.accepted_at for s in spans), default=0.0)
    end = max((s.ended_at or s.accepted_at for s in spans), default=start)
    makespan = max(end - start, 1e-9)
    ids = [i.instance_id for i in instances]
    mine = set(batch_ids)
    attempts = [a for a in tl.attempts if a.batch_id in mine]
    return RunFigures(
        makespan=end - start,
        busy={i: busy_seconds(attempts, i, until=end) / makespan for i in ids},
        jobs_run={i: sum(1 for a in attempts if a.instance_id == i
                         and a.outcome == "succeeded") for i in ids},
        all_done=all(s.state == "done" for s in spans),
    )


def render_summary(tl: Timeline, batch_ids: Sequence[str], instances: Sequence[Any], *,
                   refused: Sequence[str] = ()) -> str:
    fig = figures(tl, batch_ids, instances)
    lines = ["", "Batches"]
    for b in batch_ids:
        s = tl.batches[b]
        wall = (s.ended_at or s.accepted_at) - s.accepted_at
        lines.append(f"  {s.batch_id}  {s.name[:32]:<32} {s.state:<10} "
                     f"{s.succeeded:>3}/{s.jobs:<3} jobs  {wall:7.1f} s")
    lines.append("Instances")
    for i in instances:
        types = ",".join(sorted(i.job_types))
        lines.append(f"  {i.instance_id:<16} {i.host}:{i.port:<6} {types:<17} "
                     f"{fig.jobs_run[i.instance_id]:>4} jobs  busy "
                     f"{fig.busy[i.instance_id]:6.1%}")
    for path in refused:
        lines.append(f"Refused: {path} (the log says why)")
    lines.append(f"Makespan {fig.makespan:.1f} s; "
                 + ("every batch done." if fig.all_done and not refused
                    else "NOT every batch is done."))
    return "\n".join(lines)

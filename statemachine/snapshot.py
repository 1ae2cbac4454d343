"""The state as plain data and back: what ``Store.compact`` writes and ``Store.open``
restores before it replays the log after it. Equal snapshots mean equal states.
"""

from __future__ import annotations

from typing import Any

from statemachine import events as ev
from statemachine.errors import CorruptLog
from statemachine.fold import Fold
from statemachine.job import Batch, BatchState, DoneSummary, Job, JobState
from statemachine.plan import BatchPlan, upcast_v1

SNAPSHOT_VERSION = 3  # 2: plans in the form of event schema 2; 3: done batches summarised

_JOB_SAVED = ("eligible_at", "ready_seq", "attempts", "instance_id", "prompt_id", "number",
              "error", "outputs")


def snapshot_of(fold: Fold) -> dict[str, Any]:
    """The whole state as plain data."""
    return {
        "version": SNAPSHOT_VERSION,
        "seq": fold.seq,
        **fold.health.snapshot(),
        "batches": [_batch_state(b) for b in fold.batches.values()],
        "estimates": fold.estimates.snapshot(),
    }


def restore(fold: Fold, snap: dict[str, Any]) -> None:
    """Fill a new ``fold`` from a snapshot of any supported version."""
    version = snap.get("version")
    if version not in (1, 2, SNAPSHOT_VERSION):
        raise CorruptLog(f"snapshot version {version!r} is not supported")
    indexes = fold.indexes
    for b in snap["batches"]:
        plan = upcast_v1(b["plan"]) if version == 1 else b["plan"]
        if "summary" in b:
            _restore_summary(fold, b, plan)
            continue
        batch = fold.accept(b["accepted_at"], ev.BatchAccepted(BatchPlan.from_dict(plan)), None)
        batch.state, batch.reason = BatchState(b["state"]), b["reason"]
        batch.ended_at = b["ended_at"]
        indexes.batch_moved(batch)
        for job, saved in zip(batch.jobs, b["jobs"], strict=True):
            _restore_job(job, saved)
            indexes.moved(job, JobState.WAITING, job.ready_seq)
        if batch.state is BatchState.DONE:  # an older snapshot listed its jobs
            fold.summarise(batch)
    indexes.line_up()
    fold.health.restore(snap)
    if "estimates" in snap:  # snapshots written before estimates were kept have none
        fold.estimates.restore(snap["estimates"])
    fold.seq = snap["seq"]


def _restore_summary(fold: Fold, saved: dict[str, Any], plan: dict[str, Any]) -> None:
    """A done batch from its summary: no jobs laid out, none made."""
    batch = Batch(BatchPlan.inputs_only(plan), saved["accepted_at"])
    batch.state, batch.reason = BatchState(saved["state"]), saved["reason"]
    batch.ended_at = saved["ended_at"]
    batch.summary = DoneSummary(**saved["summary"])
    fold.add_batch(batch)
    fold.indexes.state_counts[JobState.SUCCEEDED] += batch.summary.jobs


def _batch_state(batch: Batch) -> dict[str, Any]:
    """A batch as plain data: with its jobs, or a done one with its summary instead."""
    state = {
        "plan": batch.plan.to_dict(), "state": batch.state.value, "reason": batch.reason,
        "accepted_at": batch.accepted_at, "ended_at": batch.ended_at,
    }
    if batch.summary is not None:
        return state | {"summary": batch.summary.to_dict()}
    return state | {"jobs": [{"state": j.state.value, **{k: getattr(j, k) for k in _JOB_SAVED}}
                             for j in batch.jobs]}


def _restore_job(job: Job, saved: dict[str, Any]) -> None:
    job.state = JobState(saved["state"])
    for key in _JOB_SAVED:
        setattr(job, key, saved[key])

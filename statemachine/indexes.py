"""What the store keeps beside its jobs and batches so that nobody scans them: the ready
and in-flight jobs, the batches whose COMBINE gate is open, and the counters the rules and
the scheduler read. Kept one move at a time, never rebuilt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from statemachine.job import IN_FLIGHT, JOB_FINAL, Batch, BatchState, Job, JobState
from statemachine.plan import JobKind
from statemachine.scheduler import fifo_of, line_of


def lead_of(batch: Batch) -> dict[JobKind, int]:
    """How many more render jobs of each kind the video has left than of its least kind,
    while it has some of every kind left.

    A video's renders alternate kinds (HIGH 1, LOW 1, HIGH 2, ...): once the HIGH job of
    a chunk has ended, the video has one LOW job more left than HIGH, the one its next
    HIGH job waits for. Summed over the videos, that lead is the offset between the two
    stages of a pipeline, not a backlog: the LOW servers are always that far behind while
    videos go through. Counted as unfinished work it made the LOW servers look short, and
    HIGH servers switched models to take LOW jobs that the LOW servers would have reached
    in time, while their own work came back and waited (bench/makespan.py's W6 in the
    replay of tests/test_scheduler_chains.py: 55.1 units with stealing against 51.4
    without; 51.4 with the lead left out). A video's last LOW job, with no HIGH job left
    behind it, is work like any other."""
    counts = batch.unended
    least = min(counts.values(), default=0)
    if not least:
        return {}
    return {kind: n - least for kind, n in counts.items() if n > least}


class Indexes:
    """The ready and in-flight jobs, the combining batches and the job counters."""

    def __init__(self) -> None:
        self.ready: dict[str, Job] = {}  # insertion order is readiness order
        self.in_flight: dict[str, Job] = {}
        self.combining: dict[str, Batch] = {}  # batches whose COMBINE gate is open
        self.unfinished: Counter[JobKind] = Counter()  # jobs not ended, by kind
        self.lead: Counter[JobKind] = Counter()  # the videos' leads (``lead_of``), summed
        self.state_counts: Counter[JobState] = Counter()  # jobs in each state

    def accepted(self, jobs: Sequence[Job]) -> None:
        """A batch's new jobs: all waiting, none ended."""
        self.unfinished.update(job.kind for job in jobs)
        self.state_counts[JobState.WAITING] += len(jobs)
        if jobs:
            self.lead.update(lead_of(jobs[0].batch))

    def moved(self, job: Job, old: JobState, seq: int, *, live: bool = False) -> None:
        """Keep the ready and in-flight indexes and the counters the rules use (a ready
        job's ``line`` and ``fifo`` only when ``live``: a replay sets them at its end)."""
        new = job.state
        self.state_counts[old] -= 1
        self.state_counts[new] += 1
        if old is JobState.READY:
            del self.ready[job.job_id]
        elif new is JobState.READY:
            job.ready_seq = seq
            if live:
                job.line, job.fifo = line_of(job), fifo_of(job)
            self.ready[job.job_id] = job
        if new in IN_FLIGHT:
            if old not in IN_FLIGHT:
                self.in_flight[job.job_id] = job
        elif old in IN_FLIGHT:
            del self.in_flight[job.job_id]
        if (old in JOB_FINAL) == (new in JOB_FINAL):
            return
        ended = new in JOB_FINAL
        self.unfinished[job.kind] += -1 if ended else 1
        if job.kind.renders:
            self._count_render(job.batch, job.kind, -1 if ended else 1)
        if new is JobState.SUCCEEDED:
            if job.kind.renders:
                job.batch.renders_left -= 1
            else:
                job.batch.combines_left -= 1

    def _count_render(self, batch: Batch, kind: JobKind, change: int) -> None:
        """One render of ``batch`` more (+1) or fewer (-1) not ended; its lead follows
        (``lead_of``, without making a dict: this runs for every render on replay)."""
        counts = batch.unended
        self._add_lead(counts, -1)
        counts[kind] += change
        self._add_lead(counts, 1)

    def _add_lead(self, counts: dict[JobKind, int], sign: int) -> None:
        least = min(counts.values(), default=0)
        if least:
            for kind, n in counts.items():
                if n > least:
                    self.lead[kind] += sign * (n - least)

    def batch_moved(self, batch: Batch) -> None:
        if batch.state is BatchState.COMBINING:
            self.combining[batch.batch_id] = batch
        else:
            self.combining.pop(batch.batch_id, None)

    def line_up(self) -> None:
        """Set every ready job's ``line`` and ``fifo`` once the batches' counters are final
        (after a replay or a restore), in the order they became ready."""
        self.ready = dict(sorted(self.ready.items(), key=lambda kv: kv[1].ready_seq))
        for job in self.ready.values():
            job.line, job.fifo = line_of(job), fifo_of(job)

    # --- what the rules and the scheduler read -----------------------------------------

    @property
    def unfinished_renders(self) -> int:
        return sum(count for kind, count in self.unfinished.items() if kind.renders)

    def coming_work(self) -> dict[str, int]:
        """Jobs not ended per kind that someone can plan on (the scheduler's
        ``unfinished``): the renders of open batches less the videos' leads
        (``lead_of``), COMBINE jobs only behind an open gate."""
        coming = {kind.value: n - self.lead[kind] for kind, n in self.unfinished.items()
                  if kind.renders and n > self.lead[kind]}
        combines = sum(batch.combines_left for batch in self.combining.values())
        return coming | ({JobKind.COMBINE.value: combines} if combines else {})

    def combines_coming(self) -> bool:
        """Whether a COMBINE job is expected to become ready soon: a render of a batch
        with at most two renders left (its last chunk) is in flight. Reads only the jobs
        in flight."""
        return any(j.kind.renders and j.batch.renders_left <= 2
                   for j in self.in_flight.values())

    def combines_in_flight(self) -> int:
        return sum(1 for j in self.in_flight.values() if j.kind is JobKind.COMBINE)

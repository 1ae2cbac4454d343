"""When the event log cannot be written the daemon stops dispatching, says why, sends
nothing that is not durable, and resumes by itself once writing works again."""

from __future__ import annotations

import threading
from typing import ClassVar

from support import wait_for
from test_end_to_end import prompt_file, settings_for

import daemon
from instances.client import ComfyClient
from statemachine import events as ev
from statemachine.errors import LogWriteError
from statemachine.log import EventLog
from statemachine.store import read_records


class FlakyLog(EventLog):
    """An event log on a disk that fills up for a while (commits raise, nothing is written)."""

    full = threading.Event()
    refusals: ClassVar[list[list[bytes]]] = []  # the lines each refused commit held

    def commit(self) -> None:
        if self.full.is_set() and self._pending:
            self.refusals.append(list(self._pending))
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                raise LogWriteError(f"cannot write {self.path}: {exc.strerror}") from exc
        super().commit()


def received(*sims) -> set[str]:
    """Every prompt_id the servers got: executed, running or waiting in their queues."""
    ids = set()
    for sim in sims:
        ids |= {r["prompt_id"] for r in sim.executions()}
        queue = ComfyClient(sim.url).queue()
        ids |= set(queue.running) | set(queue.pending)
    return ids


def durable_intents(state) -> set[str]:
    lines = (state / "events.jsonl").read_bytes().splitlines(keepends=True)
    return {rec.event.prompt_id for rec in map(ev.decode, lines)
            if isinstance(rec.event, ev.JobDispatchIntent)}




def test_a_full_disk_pauses_dispatch_and_the_run_resumes_when_it_frees(tmp_path, sims,
                                                                        monkeypatch):
    high, low = sims
    monkeypatch.setattr(daemon, "EventLog", FlakyLog)
    FlakyLog.refusals.clear()
    not_durable: list[set[str]] = []

    def refused_after_a_job_finished() -> bool:
        """A refused commit held a job's success, and the loop has had a turn since: the
        turn in which it would have posted that job's follower."""
        held = [any(b'"job_succeeded"' in line for line in lines)
                for lines in list(FlakyLog.refusals)]
        return True in held and held.index(True) < len(held) - 1

    def fill_disk_for_a_while():
        wait_for(high.executions, "a job on the HIGH server", timeout=60)
        FlakyLog.full.set()
        try:
            wait_for(refused_after_a_job_finished, "a finished job's success refused",
                     timeout=60)
            not_durable.append(received(high, low) - durable_intents(tmp_path / "state"))
        finally:
            FlakyLog.full.clear()

    filler = threading.Thread(target=fill_disk_for_a_while)
    filler.start()
    try:
        result = daemon.run_files(settings_for(tmp_path / "state", high.port, low.port),
                                  [prompt_file(tmp_path, "v", 303)], daemon.Stop())
    finally:
        filler.join()
    assert FlakyLog.refusals, "the disk never refused a commit"
    assert not_durable == [set()], "a prompt reached a server before its intent was durable"
    assert result.all_done
    assert all(n == 1 for n in high.counts().values()) and all(
        n == 1 for n in low.counts().values())
    records = list(read_records(EventLog(tmp_path / "state")))
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert sum(isinstance(r.event, ev.JobSucceeded) for r in records) == 9

"""Finished videos brought home, into STATE_DIR/outputs/<batch>/, by the agent of the
instance that rendered them; a video not saved when the daemon stopped is fetched once
that instance is heard up again."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from instances.artifacts import final_files, local_path
from service.agents import Agent, Defer
from statemachine import events as ev
from statemachine.job import Batch, BatchState
from statemachine.store import Store


class VideoFetcher:
    def __init__(self, store: Store, agents: Mapping[str, Agent], outputs_dir: Path,
                 defer: Defer) -> None:
        self.agents = agents
        self.outputs_dir = outputs_dir
        self.defer = defer
        self.unfetched = self._unfetched_videos(store)
        store.listeners.append(self._on_event)

    def instance_up(self, instance_id: str) -> None:
        for batch in self.unfetched.pop(instance_id, ()):
            self.fetch(batch)

    def fetch(self, batch: Batch) -> None:
        """Bring the finished video home (in the agent's thread, after the commit)."""
        files = final_files(batch.final_outputs)
        agent = self.agents.get(str(batch.final_instance))
        if files and agent is not None:
            self.defer(partial(agent.fetch_outputs, batch.batch_id, files, self.outputs_dir))

    def _on_event(self, rec: ev.Recorded, subject: Any) -> None:
        if isinstance(rec.event, ev.BatchDone):
            self.fetch(subject)

    def _unfetched_videos(self, store: Store) -> dict[str, list[Batch]]:
        """Finished videos not saved here, by the instance that has them."""
        missing: dict[str, list[Batch]] = {}
        for batch in store.batches.values():
            files = final_files(batch.final_outputs) if batch.state is BatchState.DONE else []
            if any(not local_path(self.outputs_dir, batch.batch_id, f).exists() for f in files):
                missing.setdefault(str(batch.final_instance), []).append(batch)
        return missing

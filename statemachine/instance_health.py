"""Instance health as the log tells it: which instances are up, which prompts each may
still be running after the daemon gave up on them, and so what the scheduler may ask of
each instance (``views``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from statemachine import events as ev
from statemachine.estimates import Estimates
from statemachine.job import Job
from statemachine.scheduler import InstanceView


class InstanceHealth:
    """Up or down per instance, and the prompts abandoned on each."""

    def __init__(self) -> None:
        self.up: dict[str, bool] = {}
        self.abandoned: dict[str, set[str]] = {}  # instance -> prompts it may still run

    def apply(self, event: ev.Event) -> str:
        """An instance went up or down, or withdrew prompts it had been left with."""
        if isinstance(event, ev.PromptsWithdrawn):
            left = self.abandoned.get(event.instance_id, set()) - set(event.prompt_ids)
            if left:
                self.abandoned[event.instance_id] = left
            else:
                self.abandoned.pop(event.instance_id, None)
        elif isinstance(event, ev.InstanceUp | ev.InstanceDown):
            self.up[event.instance_id] = isinstance(event, ev.InstanceUp)
        else:
            raise TypeError(f"{event.type} is not an instance event")
        return event.instance_id

    def abandon(self, instance_id: str, prompt_id: str) -> None:
        """A job left ``instance_id`` without its result: the prompt may still run there."""
        self.abandoned.setdefault(instance_id, set()).add(prompt_id)

    def views(self, instances: Iterable[Any], in_flight: Iterable[Job], estimates: Estimates,
              now: float) -> list[InstanceView]:
        """Scheduler input for configured instances (``instance_id``, ``job_types``,
        ``steal_types``, ``max_concurrent``), estimates included; an instance never
        reported UP counts as DOWN."""
        flying: dict[str, list[tuple[str, str]]] = {i.instance_id: [] for i in instances}
        for job in in_flight:
            if job.instance_id in flying:  # not an instance gone from the configuration
                flying[job.instance_id].append((job.job_id, job.kind.value))
        return [self._view(i, flying[i.instance_id], estimates, now) for i in instances]

    def _view(self, instance: Any, in_flight: Sequence[tuple[str, str]], estimates: Estimates,
              now: float) -> InstanceView:
        instance_id = instance.instance_id
        job_types = frozenset(instance.job_types)
        # an instance that may still run prompts the daemon gave up on takes nothing new
        capacity = 0 if self.abandoned.get(instance_id) else instance.max_concurrent
        return InstanceView(
            instance_id, job_types, capacity,
            self.up.get(instance_id, False), len(in_flight),
            steal_types=frozenset(instance.steal_types),
            last_kind=estimates.sent.get(instance_id),
            busy_for=estimates.busy_for(instance_id, in_flight, now),
            foreign_in_flight=sum(1 for _, kind in in_flight if kind not in job_types))

    def snapshot(self) -> dict[str, Any]:
        return {"instance_up": dict(sorted(self.up.items())),
                "abandoned": {i: sorted(p) for i, p in sorted(self.abandoned.items())}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.up = dict(saved["instance_up"])
        self.abandoned = {i: set(p) for i, p in saved.get("abandoned", {}).items()}

"""The instances as the loop sees them: UP or DOWN, whether the workflows fit them,
fallback, instances lost for good, and prompts they must let go of before new work."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import structlog

from instances.messages import Health, Validated, Withdrawn
from service.agents import Agent, Defer
from statemachine import events as ev
from statemachine.errors import BadConfig
from statemachine.plan import JobKind
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")


class Fleet:
    """Health of every configured instance, recorded as InstanceUp/InstanceDown events."""

    def __init__(self, settings: Any, store: Store, agents: Mapping[str, Agent],
                 defer: Defer) -> None:
        self.settings = settings
        self.store = store
        self.agents = agents
        self.defer = defer
        self.reported: set[str] = set()  # instances heard from since start
        self.down_since: dict[str, float] = {}
        self.sick: set[str] = set()  # DOWN because they would not let go of a prompt
        self.withdrawing: dict[str, float] = {}  # instance -> asked to withdraw prompts at
        self.fallback_kinds: frozenset[str] = frozenset()
        self.unfit: dict[str, tuple[str, ...]] = {}  # instance -> workflow problems there

    @property
    def started(self) -> bool:
        """Every instance has answered (or failed) its first probe: dispatch may begin."""
        return self.reported >= set(self.agents)

    def down(self) -> list[str]:
        return [i for i in self.agents if self.store.instance_up.get(i) is False]

    def heard(self, m: Health, now: float) -> bool:
        """Record a probe's answer; True when the instance is UP and may be used."""
        self.reported.add(m.instance_id)
        if m.up and m.instance_id in self.sick:
            return False  # it answers, but is UP again only once it lets go of its prompts
        self.set_health(m.instance_id, m.up, m.detail, now)
        self._log_fallback()
        return m.up

    def set_health(self, instance_id: str, up: bool, detail: str, now: float) -> None:
        if not up:  # also when the log says DOWN already: after a restart, from now
            self.down_since.setdefault(instance_id, now)
        if self.store.instance_up.get(instance_id) == up:
            return
        config = next(i for i in self.settings.instances if i.instance_id == instance_id)
        if up:
            self.down_since.pop(instance_id, None)
            self.store.record(ev.InstanceUp(instance_id), now)
            log.info(f"✅ Connected to instance {instance_id} at {config.host}:{config.port}",
                     detail=detail)
        else:
            self.store.record(ev.InstanceDown(instance_id, detail), now)
            log.warning(f"❌ Instance {instance_id} at {config.host}:{config.port} is down",
                        detail=detail)
        self._log_fallback()

    def mark_down(self, instance_id: str, detail: str, now: float) -> None:
        self.set_health(instance_id, False, detail, now)

    def on_validated(self, m: Validated, now: float) -> None:
        """The agent checked the workflows against the server's node list before telling
        it is up, so nothing was posted to it yet."""
        if not m.problems:
            self.unfit.pop(m.instance_id, None)
            log.info(f"🧩 workflows fit instance {m.instance_id}")
            return
        self.unfit[m.instance_id] = m.problems
        for problem in m.problems:
            log.error(f"❌ {problem}")

    def stop_if_unfit(self, commit: Callable[[], object]) -> None:
        """Stop once every instance has answered if a workflow does not fit a server (a
        missing custom node or model file): a person has to fix it, and every job would
        fail on it. Before anything was posted at start-up; mid-run, jobs in flight
        elsewhere go on and are picked up at the next start."""
        if not self.unfit or not self.started:
            return
        commit()
        problems = [p for found in self.unfit.values() for p in found]
        raise BadConfig(f"the workflows do not fit {', '.join(sorted(self.unfit))}; fix "
                        "these and start again:\n  " + "\n  ".join(problems))

    def expire(self, now: float) -> None:
        """Jobs on an instance DOWN for INSTANCE_LOST_TIMEOUT go back to ready. A server
        that has not let go of withdrawn prompts within INTERRUPT_GRACE is sick: DOWN, so
        its other jobs move after INSTANCE_LOST_TIMEOUT, until it lets go."""
        s = self.settings
        for instance_id, since in list(self.down_since.items()):
            if now - since < s.instance_lost_timeout:
                continue
            for job in [j for j in self.store.in_flight.values()
                        if j.instance_id == instance_id]:
                self.store.record(ev.JobLost(job.job_id, job.flying_prompt_id,
                                             f"{instance_id} unreachable"), now)
                log.warning("⏱️ moving job off an unreachable instance; if that instance "
                            "comes back with the job queued, it may render it a second time",
                            job=job.job_id, instance=instance_id)
            del self.down_since[instance_id]
        for instance_id, since in self.withdrawing.items():
            if now - since >= s.interrupt_grace and instance_id not in self.sick:
                self.sick.add(instance_id)
                self.set_health(instance_id, False, "it has not let go of prompts it was "
                                f"told to stop for INTERRUPT_GRACE ({s.interrupt_grace:g} s)",
                                now)

    def withdraw_abandoned(self, now: float) -> None:
        """Prompts of jobs that left an instance without succeeding may still be queued or
        running there (a server that was unreachable, hung, or told to stop once): each UP
        instance is asked to withdraw them, and takes no new work until it has."""
        for instance_id, prompts in self.store.abandoned.items():
            agent = self.agents.get(instance_id)
            if agent is None or not self.store.instance_up.get(instance_id) \
                    or instance_id in self.withdrawing:
                continue
            self.withdrawing[instance_id] = now
            self.defer(partial(agent.withdraw, tuple(sorted(prompts))))

    def on_withdrawn(self, m: Withdrawn, now: float) -> None:
        self.withdrawing.pop(m.instance_id, None)
        self.store.record(ev.PromptsWithdrawn(m.instance_id, m.prompt_ids), now)
        if m.instance_id in self.sick:
            self.sick.discard(m.instance_id)
            self.set_health(m.instance_id, True, "it let go of the prompts it was told to "
                            "stop", now)

    def _log_fallback(self) -> None:
        """Fallback runs a type on another instance while all of its own are DOWN (told
        once every instance has answered its first probe, so start-up does not flap)."""
        if not self.settings.fallback or not self.started:
            return
        up = [i for i in self.settings.instances if self.store.instance_up.get(i.instance_id)]
        kinds = frozenset(k.value for k in JobKind if up and not any(i.accepts(k) for i in up))
        for kind in sorted(kinds - self.fallback_kinds):
            log.warning(f"🔀 Fallback on: {kind} jobs go to any instance that is up",
                        instances=[i.instance_id for i in up])
        for kind in sorted(self.fallback_kinds - kinds):
            log.info(f"🔀 Fallback off: {kind} jobs are back on their own instance")
        self.fallback_kinds = kinds

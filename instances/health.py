"""Whether one server is up: probed on a thread of its own, with backoff while it does not
answer, and its workflows checked against its node list on each (re)connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from instances.messages import Health, Validated
from instances.workflow import Workflow
from statemachine.errors import ComfyDualError

POLL_INTERVAL = 1.0  # seconds between /history checks of prompts in flight


class Probes(Protocol):
    """What a HealthWatch asks of a server (``ComfyClient`` has it)."""

    def system_stats(self) -> dict[str, Any]: ...
    def object_info(self) -> dict[str, Any]: ...


class HealthWatch:
    """Probes ``/system_stats`` every ``health_interval`` while the server answers; while
    it does not, after 1, 2, 4... seconds (``probe_backoff_max`` at most); at once when
    ``wake`` is set (a request failed). While it is up, runs ``poll`` every
    ``poll_interval``. Reports ``Health`` when it changes (or was ``doubt``-ed), after
    ``Validated`` on each (re)connection, so nothing is posted to a server before its
    workflows were checked.
    """

    def __init__(self, instance_id: str, url: str, client: Probes,
                 post: Callable[[object], None], poll: Callable[[], None], *,
                 wake: threading.Event, stopping: threading.Event,
                 workflows: Sequence[Workflow], health_interval: float,
                 probe_backoff_max: float, poll_interval: float = POLL_INTERVAL) -> None:
        self.instance_id = instance_id
        self._url = url
        self._client = client
        self._post = post
        self._poll = poll
        self._wake = wake
        self._stopping = stopping
        self._workflows = tuple(workflows)
        self._health_interval = health_interval
        self._probe_backoff_max = probe_backoff_max
        self._poll_interval = poll_interval
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"watch {instance_id}")
        self.up: bool | None = None
        self._doubted = False

    def doubt(self) -> None:
        """A request failed with trouble of the server's own (unreachable, HTTP 5xx), and
        the loop took the server DOWN on it: probe now, and report what the probe finds
        even if it is what this watch already thought (else a server well again by then
        would never be reported UP)."""
        self._doubted = True
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (``stopping`` and ``wake`` set)."""
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        failures = 0
        next_probe = 0.0
        while not self._stopping.is_set():
            if time.monotonic() >= next_probe or self._wake.is_set():
                self._wake.clear()
                failures = 0 if self._probe() else failures + 1
                delay = (self._health_interval if failures == 0
                         else min(self._probe_backoff_max, 2 ** (failures - 1)))
                next_probe = time.monotonic() + delay
            if self.up:
                self._poll()
            self._wake.wait(min(self._poll_interval, max(0.0, next_probe - time.monotonic())))

    def _probe(self) -> bool:
        """Health check; on each (re)connection the workflows are checked against the
        server's node list before it is reported up, so nothing is posted to it before."""
        try:
            stats = self._client.system_stats()
            if self.up is not True:
                self._post(Validated(self.instance_id, self._validate()))
        except ComfyDualError as exc:
            self._set_health(False, str(exc))
            return False
        version = stats.get("system", {}).get("comfyui_version", "unknown version")
        self._set_health(True, f"ComfyUI {version}")
        return True

    def _validate(self) -> tuple[str, ...]:
        if not self._workflows:
            return ()
        info = self._client.object_info()
        server = f"{self.instance_id} ({self._url})"
        return tuple(p for wf in self._workflows for p in wf.check(info, server=server))

    def _set_health(self, up: bool, detail: str) -> None:
        if up != self.up or self._doubted:
            self._doubted = False
            self.up = up
            self._post(Health(self.instance_id, up, detail))

"""One ComfyUI server as the daemon sees it: health probing, checking the workflows
against its node list, posting prompts (after copying in the files they read), following
them over the websocket with ``/history`` polling behind it, stopping them, and fetching
finished videos.

An agent never changes state. It does the network work on its own threads and reports
what it learned as messages (``instances.messages``) through ``post``;
the daemon's loop, the single writer, turns them into events. ``InstanceAgent`` composes
the parts that do each job:

- ``HealthWatch`` (``health``): probes with backoff, validates workflows, drives polling;
- ``StreamFollower`` and ``Poller`` (``following``): the websocket, and lookups behind it,
  of the prompts in ``Following``;
- ``Poster`` and ``Withdrawer`` (``posting``): putting prompts on the queue, taking them off;
- ``OutputFetcher`` (``fetching``): bringing finished videos home.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from instances.artifacts import Handoff, OutputFile
from instances.client import ComfyClient
from instances.fetching import OutputFetcher, Tries
from instances.following import Following, Poller, StreamFollower
from instances.health import POLL_INTERVAL, HealthWatch
from instances.posting import Poster, Withdrawer
from instances.workflow import Workflow


class InstanceSettings(Protocol):
    # Read-only members: the frozen ``config.InstanceConfig`` satisfies them.
    @property
    def instance_id(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def url(self) -> str: ...


class InstanceAgent:
    """Talks to one server for the loop. ``post`` receives every message."""

    def __init__(self, config: InstanceSettings, post: Callable[[object], None], *,
                 health_interval: float, probe_backoff_max: float,
                 connect_timeout: float, read_timeout: float,
                 poll_interval: float = POLL_INTERVAL,
                 workflows: Sequence[Workflow] = ()) -> None:
        self.config = config
        self.instance_id = iid = config.instance_id
        self.client = ComfyClient(config.url, connect_timeout=connect_timeout,
                                  read_timeout=read_timeout)
        self._http = ThreadPoolExecutor(max_workers=4, thread_name_prefix=iid)
        self._stopping = threading.Event()
        self._wake = wake = threading.Event()  # a request failed: probe the health now
        tries = Tries(self._stopping)
        self.following = Following()
        self.follower = StreamFollower(iid, config.url, self.client, self.following, post,
                                       self._http.submit, connect_timeout=connect_timeout)
        self.poller = Poller(iid, self.client, self.following, post, wake.set)
        self.watch = HealthWatch(iid, config.url, self.client, post, self.poller.poll,
                                 wake=wake, stopping=self._stopping, workflows=workflows,
                                 health_interval=health_interval,
                                 probe_backoff_max=probe_backoff_max,
                                 poll_interval=poll_interval)
        self.poster = Poster(iid, self.client, self.follower.client_id, self.following, post,
                             tries, self.watch.doubt)
        self.withdrawer = Withdrawer(iid, self.client, self.following, post, self._stopping,
                                     probe_backoff_max)
        self.fetcher = OutputFetcher(iid, self.download, self._http, tries)

    # --- life --------------------------------------------------------------------------

    def start(self) -> None:
        self.follower.start()
        self.watch.start()

    def stop(self) -> None:
        """Stop threads without touching the server's queue: renders there go on and are
        re-attached by the next start."""
        self._stopping.set()
        self._wake.set()
        self.follower.stop()
        self._http.shutdown(wait=False, cancel_futures=True)
        self.watch.join(timeout=2)
        self.client.close()

    # --- orders from the loop ----------------------------------------------------------

    def submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
               extra_data: Mapping[str, Any], handoffs: Sequence[Handoff] = ()
               ) -> threading.Event:
        """Copy in the files the job reads (``handoffs``), then post it, on an HTTP thread.

        Returns at once with an event set when that thread has taken the job (the loop
        waits for its turn's hand-overs, see ``Dispatcher.hand_over``).
        """
        taken = threading.Event()
        self._http.submit(self.poster.submit, job_id, prompt_id, graph, extra_data,
                          handoffs, taken.set)
        return taken

    def check(self, job_id: str, prompt_id: str) -> None:
        """Find out where ``prompt_id`` stands (after a restart or a reconnection)."""
        self._http.submit(self.poller.check, job_id, prompt_id)

    def withdraw(self, prompt_ids: Sequence[str]) -> None:
        """Make sure none of ``prompt_ids`` runs here (``Withdrawer``), then report
        ``Withdrawn``; the server gets no new work meanwhile."""
        ids = tuple(prompt_ids)
        for prompt_id in ids:
            self.following.forget(prompt_id)
        self._http.submit(self.withdrawer.withdraw, ids)

    def download(self, file: OutputFile) -> bytes:
        """The bytes of a file this server wrote (runs on the caller's thread)."""
        return self.client.view(file.filename, file.subfolder, file.type)

    def fetch_outputs(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path
                      ) -> None:
        """Save a finished batch's files under ``outputs_dir/<batch_id>/``."""
        self.fetcher.fetch(batch_id, files, outputs_dir)

    def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) for finished videos still being fetched."""
        self.fetcher.drain(timeout)

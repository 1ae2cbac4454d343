"""Where everything under ``STATE_DIR`` is (DESIGN.md, "Runtime layout"), named once.

::

    spool/            the drop folder and submit.py's commands (``spool.layout``)
    events.jsonl      the event log's live segment; segments/, snapshots/ and a legacy
                      snapshot.json beside it (names owned by ``statemachine.log``)
    status.json       the status view the daemon rewrites for ``submit.py status``
    daemon.lock       flock held by the running daemon
    outputs/<batch>/  final outputs fetched from the instances
    artifacts/        files handed between instances (ARTIFACT_DIR's default)
    logs/             the daemon's JSON log lines
    dry-run/          ``daemon.py --dry-run``: plans and rendered workflows
    single-instance-comparison/  ``--compare-single``: a state directory of its own

The event log is handed ``log_dir`` and names its own files there; this class only
repeats its names (from ``statemachine.log``) for those who look at them from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spool.layout import SpoolLayout
from statemachine.log import LIVE_SEGMENT, SEGMENT_DIR, SNAPSHOT_DIR


@dataclass(frozen=True, slots=True)
class StateDir:
    """The paths under one state directory; ``StateDir(settings.state_dir)``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def spool(self) -> SpoolLayout:
        return SpoolLayout.under(self.root)

    @property
    def log_dir(self) -> Path:
        """The event log's directory (``EventLog(log_dir)``, ``LogReader(log_dir)``)."""
        return self.root

    @property
    def events(self) -> Path:
        return self.log_dir / LIVE_SEGMENT

    @property
    def segments(self) -> Path:
        return self.log_dir / SEGMENT_DIR

    @property
    def snapshots(self) -> Path:
        return self.log_dir / SNAPSHOT_DIR

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def lock(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def dry_run(self) -> Path:
        return self.root / "dry-run"

    @property
    def single_instance_comparison(self) -> Path:
        return self.root / "single-instance-comparison"

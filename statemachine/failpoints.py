"""Crash points for the crash harness: ``COMFY_DUAL_FAILPOINTS="after_intent:0.05,..."``
makes the process SIGKILL itself at that point with that probability.

Unset (always, outside crash tests) every ``hit`` is a dictionary lookup that finds
nothing. The points name the moments a crash is most likely to break a promise:
``after_intent`` (intent durable, POST not sent), ``mid_append`` (half a group commit
written), ``replay`` (part way through rebuilding state), ``dispatch_combine``.
"""

from __future__ import annotations

import os
import random
import signal


def _parse(spec: str) -> dict[str, float]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, chance = item.partition(":")
        points[name] = float(chance or 1.0)
    return points


_POINTS = _parse(os.environ.get("COMFY_DUAL_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Die here, like a power cut, if the crash harness armed this point."""
    chance = _POINTS.get(name)
    if chance is not None and random.random() < chance:
        os.kill(os.getpid(), signal.SIGKILL)


def armed() -> bool:
    return bool(_POINTS)

"""sd_notify in stdlib: tell systemd we are ready, what we are doing, and that we are alive.

The protocol is one AF_UNIX datagram to ``$NOTIFY_SOCKET`` holding newline-separated
``KEY=value`` lines (a leading ``@`` names an abstract socket). Without ``NOTIFY_SOCKET``
(not under systemd, or ``Type=`` is not ``notify``) every method is a no-op. The
``sdnotify`` package is not used: it encodes latin-1, so a non-Latin ``STATUS=`` raises.
Sending never raises; a failure is logged once per outage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("comfy_dual.notify")


class Notifier:
    """One process's line to systemd. Build it with :meth:`from_env`; one thread (the
    loop's) owns it."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._interval = watchdog_interval
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self._failing = False
        self._status: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog applies to us only when ``WATCHDOG_PID`` is unset or is our pid; we
        ping at half the timeout, as sd_watchdog_enabled(3) advises.
        """
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", str(os.getpid()))
        ours = usec.isdigit() and int(usec) > 0 and pid == str(os.getpid())
        return cls(environ.get("NOTIFY_SOCKET") or None,
                   int(usec) / 2e6 if ours else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog watches us."""
        return self._interval if self.enabled else None

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the line ``systemctl status`` shows (one line: newlines become spaces).

        Cheap to call every loop turn: a text equal to the last one delivered is not sent.
        """
        line = " ".join(text.splitlines())
        if line != self._status and self._send("STATUS=" + line):
            self._status = line

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def tick(self, now: float) -> None:
        """Call every loop turn: pings the watchdog when half its timeout has passed (or
        when ``now`` went backwards: a wall clock set back must not silence the pings)."""
        interval = self.watchdog_interval()
        if interval is None or (self._last_ping is not None
                                and 0 <= now - self._last_ping < interval):
            return
        self._last_ping = now
        self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> bool:
        """True when the datagram went out."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Never block the loop on a reader that fell behind: drop and say so instead.
            self._sock.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            if not self._failing:
                log.warning("sd_notify failed; systemd will not hear from us",
                            socket=self._address.replace("\0", "@"), error=str(exc))
            self._failing = True
            return False
        self._failing = False
        return True

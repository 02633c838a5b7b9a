"""Telling systemd how we are doing: READY, STATUS, WATCHDOG, STOPPING.

Without NOTIFY_SOCKET (a shell, cron, a test) every method returns at once
and nothing is allocated: the socket is created only when systemd gave one.

The watchdog is fed only by code that does the work: the pass calls keepalive()
between files, inside the read loop of a tarball, while it waits for the
index lock and while it parses the index. There is no heartbeat thread, so a
pass that stops making progress (a hung NFS read, a SIGSTOP, a deadlock)
stops pinging and systemd kills it: that is the point of a watchdog.

keepalive() sends at most one WATCHDOG=1 per WATCHDOG_USEC/2, and only when
WATCHDOG_USEC is set and WATCHDOG_PID (if set) names this process: a child
that inherited the environment must not feed its parent's watchdog.
STATUS= is rate-limited too (journald and `systemctl status` need no more
than one update a second).

sdnotify swallows send errors; that suits a notifier that must never break
a pass, but it means tests assert on what the socket received.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import sdnotify

STATUS_INTERVAL_S = 1.0


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket: sdnotify.SystemdNotifier | None = None
        if env.get("NOTIFY_SOCKET"):
            self._socket = sdnotify.SystemdNotifier()
        self.watchdog_interval_s = _watchdog_interval(env)
        self._last_ping = float("-inf")
        self._last_status = float("-inf")

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def _send(self, message: str) -> None:
        if self._socket is not None:
            self._socket.notify(message)

    def ready(self, status: str) -> None:
        """Config is loaded and checked; also the first watchdog ping."""
        self._send(f"READY=1\nSTATUS={status}")
        self._last_status = time.monotonic()
        self.keepalive(force=True)

    def status(self, text: str | Callable[[], str], force: bool = False) -> None:
        """Human progress for `systemctl status`; at most one a second
        unless forced (a change of phase is worth sending at once). A
        callable is formatted only when sent: a pass asks after every tarball."""
        if self._socket is None:
            return
        now = time.monotonic()
        if force or now - self._last_status >= STATUS_INTERVAL_S:
            self._send(f"STATUS={text if isinstance(text, str) else text()}")
            self._last_status = now

    def keepalive(self, force: bool = False) -> None:
        """Work is progressing: feed the watchdog if half its period passed."""
        if self._socket is None or self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if force or now - self._last_ping >= self.watchdog_interval_s:
            self._send("WATCHDOG=1")
            self._last_ping = now

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, or None when there is no watchdog
    for this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())) or usec > 2**63:  # past systemd's uint64: none
        return None
    return usec / 2 / 1e6

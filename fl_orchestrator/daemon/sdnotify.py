"""Readiness, status and watchdog notifications to the service manager.

This is the client side of the ``sd_notify(3)`` protocol, written from its
documentation so the daemon needs no ``libsystemd`` binding: each notification
is one datagram of newline-separated ``KEY=VALUE`` assignments sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``. A name starting with ``@``
lives in the Linux abstract socket namespace.

Outside systemd (``NOTIFY_SOCKET`` unset) every call is a cheap no-op, so the
daemon can notify unconditionally. Notifications are best effort: a failed
send is logged once and never raised, and the socket is non-blocking, because
a stalled service manager must never stall the aggregation loop.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from typing import TYPE_CHECKING, Self

import structlog

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

__all__ = ["SystemdNotifier"]

_log = structlog.get_logger(__name__)

# systemd drops, rather than truncates, a notification larger than PIPE_BUF.
_MAX_DATAGRAM_BYTES = 4096

# A newline would end the STATUS= assignment early and let the rest of the text
# be read as further assignments; systemd rejects datagrams with embedded NULs.
_LINE_BREAKS = re.compile(r"[\r\n]+")


def _clean_status(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text.strip("\r\n")).replace("\0", "")


def _parse_positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip(), 10)
    except ValueError:
        return None
    return number if number > 0 else None


def _socket_address(notify_socket: str) -> bytes | None:
    # Only filesystem paths and abstract names are understood; anything else
    # (a relative path, a newer "vsock:" address, an unencodable name) is
    # reported by the caller and disables notifications.
    try:
        if notify_socket.startswith("/"):
            return os.fsencode(notify_socket)
        if len(notify_socket) > 1 and notify_socket.startswith("@"):
            return b"\0" + os.fsencode(notify_socket[1:])
    except UnicodeError:
        return None
    return None


class SystemdNotifier:
    """Sends ``sd_notify`` messages to the service manager, best effort.

    Build one with :meth:`from_environment`. When the process was not started
    by systemd with ``Type=notify`` (no ``NOTIFY_SOCKET``), the notifier is
    inactive and all methods do nothing. No method ever raises because of a
    failed notification, and none blocks. Methods may be called from any
    thread.
    """

    def __init__(
        self,
        notify_socket: str | None = None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        """Create a notifier for the ``$NOTIFY_SOCKET``-style address ``notify_socket``.

        ``None`` or an empty or unsupported address gives an inactive notifier.
        ``watchdog_usec`` and ``watchdog_pid`` are the parsed ``WATCHDOG_USEC``
        and ``WATCHDOG_PID`` values; prefer :meth:`from_environment`.
        """
        self._address: bytes | None = None
        if notify_socket:
            self._address = _socket_address(notify_socket)
            if self._address is None:
                _log.warning(
                    "sd_notify_unsupported_socket",
                    notify_socket=notify_socket,
                    reason="only absolute paths and @abstract names are supported",
                )
        self._display_address = notify_socket or ""
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._closed = False
        self._warned = False
        # Senders may be the event loop and worker threads at the same time;
        # the lock keeps lazy socket creation and the warn-once flag coherent.
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Create a notifier from the variables the service manager sets.

        Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from
        ``environ`` (default :data:`os.environ`) without modifying it. Without
        ``NOTIFY_SOCKET`` the notifier is inactive.
        """
        env = os.environ if environ is None else environ
        watchdog_usec = _parse_positive_int(env.get("WATCHDOG_USEC"))
        raw_pid = env.get("WATCHDOG_PID")
        watchdog_pid = _parse_positive_int(raw_pid)
        if raw_pid is not None and watchdog_pid is None:
            # An unreadable WATCHDOG_PID cannot be shown to be ours, and pinging
            # on another process's behalf would hide that process hanging.
            watchdog_usec = None
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=watchdog_usec,
            watchdog_pid=watchdog_pid,
        )

    @property
    def enabled(self) -> bool:
        """Whether notifications are sent: a usable socket is set and not closed."""
        return self._address is not None and not self._closed

    def ready(self, status: str | None = None) -> None:
        """Report that start-up finished (``READY=1``), with an optional status."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=``)."""
        self._send(None, text)

    def watchdog(self) -> None:
        """Ping the service watchdog (``WATCHDOG=1``)."""
        self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> None:
        """Report that shutdown began (``STOPPING=1``), with an optional status."""
        self._send("STOPPING=1", status)

    def watchdog_interval_seconds(self) -> float | None:
        """Return how often to call :meth:`watchdog`, in seconds, or ``None``.

        This is half of ``WATCHDOG_USEC``, the margin ``sd_watchdog_enabled(3)``
        recommends. It is ``None`` when no watchdog is configured, or when
        ``WATCHDOG_PID`` names a process other than this one (the variables
        were inherited from a parent). Like ``sd_watchdog_enabled``, it does not
        depend on ``NOTIFY_SOCKET``.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2_000_000

    def close(self) -> None:
        """Close the socket; later notifications are ignored. Safe to call twice."""
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        """Return this notifier; it is closed when the ``with`` block ends."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the notifier."""
        self.close()

    def _send(self, state: str | None, status: str | None) -> None:
        address = self._address
        if address is None or self._closed:
            return
        payload = self._payload(state, status)
        with self._lock:
            if self._closed:
                return
            try:
                if self._sock is None:
                    # Non-blocking: a full receive queue on the manager side must
                    # cost a dropped notification, never a stalled daemon.
                    self._sock = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                    )
                self._sock.sendto(payload, address)
            except (OSError, ValueError) as exc:
                self._report_failure(payload, exc)

    @staticmethod
    def _payload(state: str | None, status: str | None) -> bytes:
        head = b"" if state is None else state.encode("ascii")
        if status is None:
            return head
        separator = b"\n" if head else b""
        prefix = head + separator + b"STATUS="
        # backslashreplace: a lone surrogate (e.g. from a decoded file name)
        # must not turn a status update into an exception.
        body = _clean_status(status).encode("utf-8", "backslashreplace")
        room = _MAX_DATAGRAM_BYTES - len(prefix)
        if len(body) > room:
            body = body[:room].decode("utf-8", "ignore").encode("utf-8")
        return prefix + body

    def _report_failure(self, payload: bytes, exc: BaseException) -> None:
        fields = {
            "notify_socket": self._display_address,
            "notification": payload.split(b"\n", 1)[0][:80].decode("utf-8", "replace"),
            "error": repr(exc),
        }
        # Once per notifier: with the manager gone, every watchdog ping would
        # otherwise add a warning to the log.
        if self._warned:
            _log.debug("sd_notify_send_failed", **fields)
            return
        self._warned = True
        _log.warning(
            "sd_notify_send_failed",
            **fields,
            note="further sd_notify failures are logged at debug level",
        )

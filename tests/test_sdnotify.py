"""Tests for the sd_notify client, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import CapturingLogger

from fl_orchestrator.daemon import sdnotify
from fl_orchestrator.daemon.sdnotify import SystemdNotifier

# sun_path holds 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="abstract AF_UNIX sockets are Linux-only")


def _datagram_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # A bound timeout instead of sleeping: delivery on a local datagram socket
    # is synchronous, so a message that is going to arrive is already queued.
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    """A path for a receiving socket, in tmp_path unless that is too long."""
    candidate = tmp_path / "notify.sock"
    if len(os.fsencode(candidate)) <= _MAX_UNIX_PATH:
        yield candidate
        return
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        yield Path(short) / "n.sock"


@pytest.fixture
def path_receiver(socket_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound at a filesystem path, and its NOTIFY_SOCKET."""
    sock = _datagram_socket()
    sock.bind(os.fsencode(socket_path))
    try:
        yield sock, str(socket_path)
    finally:
        sock.close()


def _abstract_name() -> str:
    return f"fl-orchestrator-test-{uuid.uuid4().hex}"


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, and its NOTIFY_SOCKET."""
    if sys.platform != "linux":
        pytest.skip("abstract AF_UNIX sockets are Linux-only")
    name = _abstract_name()
    sock = _datagram_socket()
    sock.bind(b"\0" + name.encode())
    try:
        yield sock, "@" + name
    finally:
        sock.close()


@pytest.fixture
def captured_log(monkeypatch: pytest.MonkeyPatch) -> CapturingLogger:
    """Record what the module logs, whatever structlog configuration is active."""
    logger = CapturingLogger()
    monkeypatch.setattr(sdnotify, "_log", logger)
    return logger


def _notifier(notify_socket: str, **extra: str) -> SystemdNotifier:
    return SystemdNotifier.from_environment({"NOTIFY_SOCKET": notify_socket, **extra})


def _assert_nothing_queued(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)


def _calls(log: CapturingLogger, method: str) -> list[str]:
    return [str(call.args[0]) for call in log.calls if call.method_name == method]


# --- exact bytes on the wire ---------------------------------------------

SENDS: list[tuple[str, Callable[[SystemdNotifier], None], bytes]] = [
    ("ready", lambda n: n.ready(), b"READY=1"),
    (
        "ready+status",
        lambda n: n.ready("serving job demo"),
        b"READY=1\nSTATUS=serving job demo",
    ),
    ("status", lambda n: n.status("round 3/10"), b"STATUS=round 3/10"),
    ("watchdog", lambda n: n.watchdog(), b"WATCHDOG=1"),
    ("stopping", lambda n: n.stopping(), b"STOPPING=1"),
    (
        "stopping+status",
        lambda n: n.stopping("draining"),
        b"STOPPING=1\nSTATUS=draining",
    ),
    ("utf-8 status", lambda n: n.status("señal ✓"), "STATUS=señal ✓".encode()),
]


@pytest.mark.parametrize(
    ("send", "expected"),
    [pytest.param(send, expected, id=name) for name, send, expected in SENDS],
)
def test_path_socket_receives_exact_bytes(
    path_receiver: tuple[socket.socket, str],
    send: Callable[[SystemdNotifier], None],
    expected: bytes,
) -> None:
    sock, address = path_receiver
    with _notifier(address) as notifier:
        assert notifier.enabled
        send(notifier)
        assert sock.recv(65536) == expected
    _assert_nothing_queued(sock)


@linux_only
@pytest.mark.parametrize(
    ("send", "expected"),
    [pytest.param(send, expected, id=name) for name, send, expected in SENDS],
)
def test_abstract_socket_receives_exact_bytes(
    abstract_receiver: tuple[socket.socket, str],
    send: Callable[[SystemdNotifier], None],
    expected: bytes,
) -> None:
    sock, address = abstract_receiver
    assert address.startswith("@")
    with _notifier(address) as notifier:
        assert notifier.enabled
        send(notifier)
        assert sock.recv(65536) == expected


def test_one_socket_is_reused_for_a_sequence(
    path_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = path_receiver
    notifier = _notifier(address)
    notifier.ready("up")
    notifier.watchdog()
    notifier.status("round 1")
    notifier.stopping()
    received = [sock.recv(65536) for _ in range(4)]
    notifier.close()
    assert received == [
        b"READY=1\nSTATUS=up",
        b"WATCHDOG=1",
        b"STATUS=round 1",
        b"STOPPING=1",
    ]


def test_default_environment_is_os_environ(
    path_receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = path_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with SystemdNotifier.from_environment() as notifier:
        notifier.watchdog()
    assert sock.recv(65536) == b"WATCHDOG=1"
    assert os.environ["NOTIFY_SOCKET"] == address


# --- status text sanitising ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("round 3\nof 10", b"STATUS=round 3 of 10"),
        ("a\r\nb\n\n\nc", b"STATUS=a b c"),
        ("trailing newline\n", b"STATUS=trailing newline"),
        ("\r\nleading", b"STATUS=leading"),
        ("READY=1\nWATCHDOG=1", b"STATUS=READY=1 WATCHDOG=1"),
        ("nul\0byte", b"STATUS=nulbyte"),
        ("", b"STATUS="),
    ],
)
def test_status_is_one_line(path_receiver: tuple[socket.socket, str], text: str, expected: bytes) -> None:
    sock, address = path_receiver
    with _notifier(address) as notifier:
        notifier.status(text)
    assert sock.recv(65536) == expected


def test_newlines_in_ready_status_cannot_inject_assignments(
    path_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = path_receiver
    with _notifier(address) as notifier:
        notifier.ready("ok\nSTOPPING=1")
    assert sock.recv(65536).split(b"\n") == [b"READY=1", b"STATUS=ok STOPPING=1"]


def test_overlong_status_is_cut_to_one_valid_datagram(
    path_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = path_receiver
    with _notifier(address) as notifier:
        notifier.ready("é" * 5000)
    received = sock.recv(65536)
    assert len(received) <= 4096
    text = received.decode("utf-8")  # no split multi-byte character
    assert text.startswith("READY=1\nSTATUS=éé")
    assert set(text.removeprefix("READY=1\nSTATUS=")) == {"é"}


def test_unencodable_status_is_escaped_not_raised(
    path_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = path_receiver
    with _notifier(address) as notifier:
        notifier.status("bad \udcff name")
    assert sock.recv(65536) == b"STATUS=bad \\udcff name"


@linux_only
@settings(max_examples=60, deadline=None)
@given(st.text())
def test_any_status_arrives_as_a_single_clean_assignment(text: str) -> None:
    name = _abstract_name()
    with _datagram_socket() as sock:
        sock.bind(b"\0" + name.encode())
        with _notifier("@" + name) as notifier:
            notifier.status(text)
        received = sock.recv(65536)
    assert len(received) <= 4096
    assert received.startswith(b"STATUS=")
    assert not {ord("\n"), ord("\r"), 0} & set(received)


# --- inactive notifier ---------------------------------------------------


def test_unset_notify_socket_gives_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch, captured_log: CapturingLogger
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for notifier in (
        SystemdNotifier.from_environment({}),
        SystemdNotifier.from_environment(),
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": ""}),
    ):
        assert not notifier.enabled
        notifier.ready("up")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping("bye")
        notifier.close()
        notifier.close()
        assert not notifier.enabled
    assert captured_log.calls == []


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234", "@"])
def test_unsupported_address_is_reported_and_disabled(captured_log: CapturingLogger, address: str) -> None:
    notifier = _notifier(address)
    assert not notifier.enabled
    notifier.ready()
    assert _calls(captured_log, "warning") == ["sd_notify_unsupported_socket"]


def test_close_disables_and_later_sends_are_dropped(
    path_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = path_receiver
    notifier = _notifier(address)
    notifier.watchdog()
    assert sock.recv(65536) == b"WATCHDOG=1"
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.watchdog()
    notifier.stopping()
    _assert_nothing_queued(sock)


# --- watchdog interval ---------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
        ({}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-30000000"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    interval = SystemdNotifier.from_environment(environ).watchdog_interval_seconds()
    if expected is None:
        assert interval is None
    else:
        assert interval == pytest.approx(expected)


def test_watchdog_interval_does_not_need_notify_socket(
    path_receiver: tuple[socket.socket, str],
) -> None:
    _, address = path_receiver
    env = {"WATCHDOG_USEC": "8000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environment(env).watchdog_interval_seconds() == 4.0
    with _notifier(address, **env) as notifier:
        assert notifier.watchdog_interval_seconds() == 4.0


def test_watchdog_pid_is_checked_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_environment(env)
    assert notifier.watchdog_interval_seconds() == 5.0
    # As in a forked child: the watchdog belongs to the parent, not to us.
    monkeypatch.setattr(os, "getpid", lambda: int(env["WATCHDOG_PID"]) + 1)
    assert notifier.watchdog_interval_seconds() is None


@given(st.integers(min_value=1, max_value=2**64 - 1))
def test_watchdog_interval_is_half_the_timeout(usec: int) -> None:
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": str(usec)})
    assert notifier.watchdog_interval_seconds() == usec / 2_000_000


# --- failures never reach the caller -------------------------------------


def test_send_to_a_socket_that_went_away_does_not_raise(
    path_receiver: tuple[socket.socket, str], captured_log: CapturingLogger
) -> None:
    sock, address = path_receiver
    notifier = _notifier(address)
    notifier.ready()
    assert sock.recv(65536) == b"READY=1"

    sock.close()
    Path(address).unlink()
    notifier.watchdog()
    notifier.status("still here")
    notifier.stopping()

    assert notifier.enabled
    assert _calls(captured_log, "warning") == ["sd_notify_send_failed"]
    assert _calls(captured_log, "debug") == ["sd_notify_send_failed"] * 2
    warning = next(c for c in captured_log.calls if c.method_name == "warning")
    assert warning.kwargs["notify_socket"] == address
    assert warning.kwargs["notification"] == "WATCHDOG=1"
    notifier.close()


def test_send_to_a_closed_but_still_present_socket_does_not_raise(
    path_receiver: tuple[socket.socket, str], captured_log: CapturingLogger
) -> None:
    sock, address = path_receiver
    sock.close()  # the file stays: connecting to it is refused
    with _notifier(address) as notifier:
        notifier.ready("up")
        notifier.watchdog()
    assert _calls(captured_log, "warning") == ["sd_notify_send_failed"]


@linux_only
def test_send_to_a_vanished_abstract_socket_does_not_raise(
    abstract_receiver: tuple[socket.socket, str], captured_log: CapturingLogger
) -> None:
    sock, address = abstract_receiver
    sock.close()
    with _notifier(address) as notifier:
        notifier.watchdog()
        notifier.watchdog()
    assert _calls(captured_log, "warning") == ["sd_notify_send_failed"]


def test_send_to_a_path_that_never_existed_does_not_raise(
    tmp_path: Path, captured_log: CapturingLogger
) -> None:
    with _notifier(str(tmp_path / "missing.sock")) as notifier:
        notifier.ready()
    assert _calls(captured_log, "warning") == ["sd_notify_send_failed"]


def test_a_full_receiver_never_blocks_the_sender(
    path_receiver: tuple[socket.socket, str], captured_log: CapturingLogger
) -> None:
    _, address = path_receiver  # never read: its queue fills up
    notifier = _notifier(address)
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            for _ in range(5000):
                notifier.watchdog()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    # A blocking send would hang on the full queue; the thread lets the test
    # fail instead of hanging with it.
    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "sending blocked on a full receive queue"
    assert errors == []
    assert _calls(captured_log, "warning") == ["sd_notify_send_failed"]
    notifier.close()


# --- agreement with systemd's own client ---------------------------------


@pytest.mark.parametrize(
    ("args", "send"),
    [
        pytest.param(["--ready"], lambda n: n.ready(), id="ready"),
        pytest.param(
            ["--ready", "--status=job demo: round 2/5"],
            lambda n: n.ready("job demo: round 2/5"),
            id="ready+status",
        ),
        pytest.param(["--status=draining"], lambda n: n.status("draining"), id="status"),
        pytest.param(["WATCHDOG=1"], lambda n: n.watchdog(), id="watchdog"),
        pytest.param(["STOPPING=1"], lambda n: n.stopping(), id="stopping"),
    ],
)
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_same_datagram_as_systemd_notify(
    request: pytest.FixtureRequest,
    kind: str,
    args: list[str],
    send: Callable[[SystemdNotifier], None],
) -> None:
    binary = shutil.which("systemd-notify")
    if binary is None:
        pytest.skip("systemd-notify not installed (Debian package 'systemd')")
    sock, address = request.getfixturevalue(f"{kind}_receiver")
    reference = subprocess.run(
        [binary, "--no-block", *args],
        env={"NOTIFY_SOCKET": address, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert reference.returncode == 0, reference.stderr
    # Newer systemd-notify versions may add the sender's PID; we never need to.
    expected = [line for line in sock.recv(65536).split(b"\n") if not line.startswith(b"MAINPID=")]
    with _notifier(address) as notifier:
        send(notifier)
    assert sock.recv(65536).split(b"\n") == expected

"""Checks of the shipped systemd unit: its key settings, and systemd's own analysis.

The analysis runs offline on a copy of the template saved as a concrete
instance, so it needs neither systemd as PID 1 nor the unit installed; it
needs the ``systemd-analyze`` binary (Debian package ``systemd``, v250+).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_FILE = Path(__file__).resolve().parents[1] / "systemd" / "fl-orchestratord@.service"
INSTANCE = "fl-orchestratord@demo.service"
INSTALLED_BINARY = "/opt/fl-orchestrator/venv/bin/fl-orchestratord"
MAX_EXPOSURE = 2.5
# --offline for `security` and --recursive-errors for `verify` appeared in 250.
MIN_SYSTEMD_VERSION = 250

_EXPOSURE = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<score>\d+(?:\.\d+)?)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Return each section's assignments in order, keeping repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    """Return the parsed unit file."""
    return _parse_unit(UNIT_FILE.read_text(encoding="utf-8"))


def _values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [value for k, value in unit.get(section, []) if k == key]


def _single(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = _values(unit, section, key)
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
    return values[0]


# --- settings the daemon and operators rely on ---------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "1 78"),
        (
            "ExecStart",
            f"{INSTALLED_BINARY} --config /etc/fl-orchestrator/%i.toml",
        ),
        ("StateDirectory", "fl-orchestrator/%i"),
        ("User", "fl-orchestrator"),
        ("ProtectSystem", "strict"),
        ("PrivateNetwork", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX"),
        ("NoNewPrivileges", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("UMask", "0077"),
        ("CapabilityBoundingSet", ""),
    ],
)
def test_service_setting(unit: dict[str, list[tuple[str, str]]], key: str, expected: str) -> None:
    assert _single(unit, "Service", key) == expected


def test_stop_timeout_leaves_room_for_the_five_second_drain(
    unit: dict[str, list[tuple[str, str]]],
) -> None:
    timeout = _single(unit, "Service", "TimeoutStopSec")
    assert timeout.isdigit(), f"TimeoutStopSec={timeout} should be plain seconds"
    assert 5 < int(timeout) <= 60


def test_syftbox_folder_is_writable_by_default(
    unit: dict[str, list[tuple[str, str]]],
) -> None:
    paths = " ".join(_values(unit, "Service", "ReadWritePaths")).split()
    assert "/var/lib/syftbox" in paths


def test_logs_are_json(unit: dict[str, list[tuple[str, str]]]) -> None:
    assignments = " ".join(_values(unit, "Service", "Environment")).split()
    assert "FL_ORCHESTRATOR_LOG_FORMAT=json" in assignments


def test_installable(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert _single(unit, "Install", "WantedBy") == "multi-user.target"


# --- systemd-analyze ------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """Return the systemd-analyze binary, or skip when it is missing or too old."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip(
            "systemd-analyze not installed: `apt-get install -y systemd` "
            "(CI installs it) to verify the unit and measure its exposure"
        )
    first_line = _run([binary, "--version"]).stdout.splitlines()[0]
    match = re.match(r"systemd (\d+)", first_line)
    if match is None or int(match.group(1)) < MIN_SYSTEMD_VERSION:
        pytest.skip(
            f"systemd-analyze too old for offline analysis ({first_line!r}); "
            f"need systemd {MIN_SYSTEMD_VERSION}+"
        )
    return binary


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def _instance_copy(directory: Path, text: str, name: str = INSTANCE) -> Path:
    """Save ``text`` as the unit ``name`` in ``directory``.

    The shipped ExecStart binary only exists once the package is deployed, and
    verify rejects a missing one, so it is pointed at this interpreter; the
    arguments, and everything else, are kept.
    """
    # "%" starts a unit specifier, so a literal one is doubled.
    interpreter = sys.executable.replace("%", "%%")
    rewritten, count = re.subn(
        rf"^ExecStart={re.escape(INSTALLED_BINARY)}(?=\s)",
        lambda _: f'ExecStart="{interpreter}"',  # quoted: the path may hold spaces
        text,
        flags=re.MULTILINE,
    )
    assert count == 1, "expected exactly one ExecStart of the installed binary"
    path = directory / name
    path.write_text(rewritten, encoding="utf-8")
    return path


def _verify(binary: str, path: Path) -> tuple[int, list[str]]:
    result = _run([binary, "verify", "--man=no", "--recursive-errors=no", str(path)])
    lines = _ANSI.sub("", result.stdout + result.stderr).splitlines()
    # Other units on the machine may produce noise; only ours is judged.
    about_us = [line for line in lines if path.name in line or str(path) in line]
    return result.returncode, about_us


def _exposure(binary: str, path: Path) -> float:
    result = _run([binary, "security", "--offline=true", "--no-pager", str(path)])
    output = _ANSI.sub("", result.stdout + result.stderr)
    match = _EXPOSURE.search(output)
    assert match is not None, f"no exposure score in:\n{output}"
    assert match["unit"] == path.name
    return float(match["score"])


def test_verify_is_clean(systemd_analyze: str, tmp_path: Path) -> None:
    path = _instance_copy(tmp_path, UNIT_FILE.read_text(encoding="utf-8"))
    returncode, about_us = _verify(systemd_analyze, path)
    assert about_us == []
    assert returncode == 0


def test_exposure_is_at_most_target(systemd_analyze: str, tmp_path: Path) -> None:
    path = _instance_copy(tmp_path, UNIT_FILE.read_text(encoding="utf-8"))
    score = _exposure(systemd_analyze, path)
    assert score <= MAX_EXPOSURE, f"exposure {score} of {INSTANCE} > {MAX_EXPOSURE}"


def test_verify_catches_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    """Guard against a check that passes whatever the unit says."""
    broken = UNIT_FILE.read_text(encoding="utf-8").replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    path = _instance_copy(tmp_path, broken)
    returncode, about_us = _verify(systemd_analyze, path)
    assert any("NoNewPrivilege" in line for line in about_us)
    assert returncode != 0


def test_exposure_check_sees_missing_hardening(systemd_analyze: str, tmp_path: Path) -> None:
    """Guard against a score parsed from the wrong place."""
    bare = f"[Service]\nType=notify\nExecStart={INSTALLED_BINARY} --config x\n"
    path = _instance_copy(tmp_path, bare)
    assert _exposure(systemd_analyze, path) > MAX_EXPOSURE

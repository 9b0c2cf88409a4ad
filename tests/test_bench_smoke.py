"""The benchmark harness runs end to end at smoke size: every benchmark's code path, not its timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = (
    "encode",
    "ingest",
    "robust",
    "daemon_rss",
    "detection_latency",
    "round_overhead",
    "flood",
)

pytestmark = pytest.mark.slow


def test_bench_smoke_runs_every_benchmark_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(
        [*command, "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke"
    for name in BENCHMARKS:
        assert name in report, f"{name} missing from the JSON"
        # Skipped is allowed (robust, while its strategies are not importable); an error is not.
        assert report[name]["status"] in ("ok", "skipped"), report[name].get("reason")
        assert report[name]["table"], f"{name} printed no row"
    # The latency benchmark's second variant: the same renames beside a hostile datasite's folders.
    assert "daemon" in report["detection_latency"]["hostile"]
    # The temp folder under --workdir is removed once the run ends.
    assert [p.name for p in tmp_path.iterdir()] == ["smoke.json"]

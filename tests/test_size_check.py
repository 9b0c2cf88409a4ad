"""The largest file a job writes or reads is checked against the SyftBox cap and [limits] before it runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.daemon.size_check import size_problems
from fl_orchestrator.protocols.syft_flwr.envelope import message_file_bound
from fl_orchestrator.wire.messages import model_spec

from support.jobs import job_table, write_job

MIB = 1024 * 1024


def _config(tmp_path: Path, **sections: dict[str, object]) -> JobConfig:
    return load_config(write_job(tmp_path, job_table(3, **sections)))


def _syft_flwr(config: JobConfig, *, encryption: bool) -> JobConfig:
    # Built by hand: the loader wants flwr for this protocol, which this environment does not hold.
    return dataclasses.replace(
        config,
        job=dataclasses.replace(config.job, protocol="syft-flwr"),
        syft_flwr=dataclasses.replace(config.syft_flwr, app_name="app", encryption=encryption),
    )


def _spec(nbytes: int) -> dict[str, tuple[np.dtype[np.float32], tuple[int, ...]]]:
    return dict(model_spec({"w": np.zeros(nbytes // 4, dtype=np.float32)}))


def test_a_native_model_travels_in_parts_under_the_cap_and_unsplit_it_is_refused(tmp_path: Path) -> None:
    assert size_problems(_config(tmp_path), _spec(50 * MIB)) == []
    (problem,) = size_problems(_config(tmp_path / "a", syftbox={"part_bytes": 0}), _spec(50 * MIB))
    assert "syftbox.part_bytes = 0" in problem and f"at most {10 * MIB}" in problem
    (problem,) = size_problems(_config(tmp_path / "b", syftbox={"part_bytes": 20 * MIB}), _spec(50 * MIB))
    assert f"syftbox.part_bytes = {20 * MIB} is over" in problem
    no_cap = _config(tmp_path / "c", syftbox={"part_bytes": 0, "server_max_file_bytes": 0})
    assert size_problems(no_cap, _spec(50 * MIB)) == []


def test_a_syft_flwr_model_must_fit_whole_in_one_message_and_encryption_makes_it_larger(
    tmp_path: Path,
) -> None:
    base = _config(tmp_path)
    plain, sealed = _syft_flwr(base, encryption=False), _syft_flwr(base, encryption=True)
    assert size_problems(plain, _spec(5 * MIB)) == []  # about 7.7 MB of base64
    (problem,) = size_problems(sealed, _spec(5 * MIB))  # about 12.9 MB encrypted
    assert "syft-rpc cannot split a message" in problem and "protocol = 'native'" in problem
    # The size it names is the largest that fits: that many bytes pass, a little more does not.
    room = int(problem.split("a model of at most ")[1].split(" bytes")[0])
    assert size_problems(sealed, _spec(room // 4 * 4)) == []
    assert size_problems(sealed, _spec(room // 4 * 4 + 8192)) != []
    assert message_file_bound([room], encrypted=True) <= 10 * MIB


def test_a_reply_limit_below_what_a_reply_takes_is_refused(tmp_path: Path) -> None:
    config = _syft_flwr(_config(tmp_path, limits={"max_file_bytes": 2 * MIB}), encryption=True)
    problems = size_problems(config, _spec(MIB))
    assert any(p.startswith(f"limits.max_file_bytes = {2 * MIB}") for p in problems)


@pytest.mark.integration  # a real daemon: in make test, not make test-fast
def test_the_installed_daemon_refuses_at_check_and_at_start_with_the_numbers(tmp_path: Path) -> None:
    table = job_table(3, syftbox={"part_bytes": 0})
    table["model"]["arrays"] = {"w": {"shape": [3 * MIB], "init": "zeros"}}  # 12 MiB of float32
    job = write_job(tmp_path, table)
    for extra in (["--check"], []):
        done = subprocess.run(
            [sys.executable, "-m", "fl_orchestrator.cli.daemon_main", "--config", str(job), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 78, done.stderr
        assert done.stderr.startswith("config error: syftbox.part_bytes = 0 never splits the model file")
        assert not (tmp_path / "state").exists()  # refused before anything was written

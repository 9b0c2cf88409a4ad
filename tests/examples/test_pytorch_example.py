"""The PyTorch example, docs/examples/pytorch_cnn/: `make test-examples` runs it with torch installed.

`make test` collects this file too; without torch (the project's .venv) it is skipped whole.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.storage.models import initial_model

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "pytorch_cnn"
TOOL = Path(sys.executable).with_name("fl-orchestrator")


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pytorch_cnn_example", EXAMPLE / "cnn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cnn = _example()


def _start() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    config = load_config(EXAMPLE / "job.toml")
    return initial_model(config.model), dict(config.job.train_config)


def test_the_job_declares_the_cnns_state_dict() -> None:
    arrays, _ = _start()
    state = cnn.TinyCNN().state_dict()
    assert {k: v.shape for k, v in arrays.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(v.dtype == np.float32 for v in arrays.values())


def test_train_keeps_the_arrays_shape_and_lowers_the_loss_on_its_shard() -> None:
    arrays, train_config = _start()
    context = SimpleNamespace(node_config=cnn.partition(1, 4))
    given = {k: v.copy() for k, v in arrays.items()}
    losses, accuracies = [], []
    for rnd in (1, 2, 3, 4):
        new, count, metrics = cnn.train(arrays, {**train_config, "server-round": rnd}, context)
        assert {k: (v.shape, v.dtype) for k, v in new.items()} == {
            k: (v.shape, v.dtype) for k, v in arrays.items()
        }
        assert count == 359 and set(metrics) == {"loss", "accuracy"}  # 80% of a 449-image shard
        losses.append(metrics["loss"])
        accuracies.append(metrics["accuracy"])
        arrays = new
    assert all(np.array_equal(given[k], v) for k, v in _start()[0].items())  # the input is not changed
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0], losses
    assert accuracies[-1] > 0.8, accuracies
    # Seeded: the same call gives the same arrays.
    again = cnn.train(arrays, {**train_config, "server-round": 5}, context)[0]
    once = cnn.train(arrays, {**train_config, "server-round": 5}, context)[0]
    assert all(np.array_equal(again[k], once[k]) for k in once)
    count, scores = cnn.evaluate(arrays, {}, context)
    assert count == 90 and scores["accuracy"] > 0.8, scores


@pytest.mark.slow
def test_simulate_runs_the_example_and_the_accuracy_rises(tmp_path: Path) -> None:
    # As README.md says to run it: from the example's folder, which simulate puts on the path.
    done = subprocess.run(
        [
            str(TOOL),
            "simulate",
            "--config",
            "job.toml",
            "--datasites",
            "4",
            "--train",
            "cnn:train",
            "--evaluate",
            "cnn:evaluate",
            "--partition",
            "cnn:partition",
            "--workdir",
            str(tmp_path / "sim"),
        ],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    head = next(row for row in lines if row[:1] == ["round"])
    rows = [row for row in lines if row[:1] in (["1"], ["2"], ["3"])]
    assert [row[:5] for row in rows] == [[str(r), "4", "4", "0", "0"] for r in (1, 2, 3)], done.stdout
    # Training accuracy over each round's local epoch; measured 0.228, 0.624, 0.806.
    accuracy = [float(row[head.index("accuracy")]) for row in rows]
    assert accuracy == sorted(accuracy) and accuracy[-1] > 0.7, done.stdout
    # The datasites' held-out 20% after each round (federated evaluation); measured 0.678, 0.875, 0.928.
    evaluations = (tmp_path / "sim" / "state" / "evaluations.jsonl").read_text().splitlines()
    held_out = [json.loads(line)["metrics"]["accuracy"] for line in evaluations]
    assert len(held_out) == 3 and held_out[-1] > 0.85, held_out

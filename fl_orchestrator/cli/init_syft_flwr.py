"""`fl-orchestrator init --from-syft-flwr DIR`: a job file and its initial model from an unchanged project.

What the project's ServerApp would run is read by protocols/syft_flwr/project_import.py;
this module writes it: the job file (checked by the daemon's own loader before
anything is written) and ``initial.npz`` beside it, then prints what was
translated and what is left to write by hand.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fl_orchestrator.config import config_from_table
from fl_orchestrator.protocols.syft_flwr.project_import import Translation, read_project
from fl_orchestrator.storage.atomic import atomic_write, atomic_write_text

HEADER = """\
# Written by `fl-orchestrator init --from-syft-flwr {project}`.
# Check it with: fl-orchestratord --config {name} --check
"""
DEFAULT_SYFTBOX_ROOT = "~/SyftBox"


def write_from_project(args: argparse.Namespace) -> tuple[Path, Translation]:
    """Translate the project, validate the job, write it and initial.npz; raise on any failure.

    Raises ImportRefused, ConfigError, FileExistsError or OSError.
    """
    project = Path(os.path.abspath(args.from_syft_flwr))
    translation = read_project(project)
    out = Path(os.path.abspath(args.out or project / "fl-orchestrator.toml"))
    model_path = out.parent / "initial.npz"
    for path in (out, model_path):
        if path.exists() and not args.force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    table = job_table(translation, args, model_path)
    # The loader checks the checkpoint too: validate against the arrays written under a temporary name.
    staging = model_path.with_name(f".{model_path.name}.check.npz")
    try:
        _write_npz(staging, translation.arrays)
        config_from_table(_with_checkpoint(table, staging), base_dir=out.parent)
        os.replace(staging, model_path)
    finally:
        staging.unlink(missing_ok=True)
    atomic_write_text(out, HEADER.format(project=project, name=out) + "\n" + tomli_w.dumps(table))
    return out, translation


def job_table(translation: Translation, args: argparse.Namespace, model_path: Path) -> dict[str, Any]:
    """The job as a TOML-ready table."""
    job: dict[str, Any] = {
        "name": args.name or _job_name(translation.project_name),
        "protocol": "syft-flwr",
        "num_rounds": translation.run_config.get("num-server-rounds", 3),
    }
    job.update(translation.job)
    # The project's own timeout (strategy.start(timeout=...)) wins; a server_fn project has none.
    job.setdefault("round_timeout_seconds", getattr(args, "round_timeout_seconds", 600.0))
    job["train_config"] = translation.train_config
    root = args.syftbox_root or Path(DEFAULT_SYFTBOX_ROOT)
    state = args.state_dir or model_path.parent / "state"
    strategy: dict[str, Any] = {"name": translation.strategy}
    if translation.strategy_params:
        strategy["params"] = translation.strategy_params
    return {
        "job": job,
        "syftbox": {
            "root": os.path.abspath(os.path.expanduser(root)),
            "aggregator_email": translation.aggregator,
            "datasites": translation.datasites,
        },
        "syft_flwr": {"app_name": translation.app_name, "content_format": translation.content_format},
        "model": {"source": "checkpoint", "checkpoint_path": str(model_path)},
        "strategy": strategy,
        "state": {"state_dir": os.path.abspath(os.path.expanduser(state))},
    }


def report(out: Path, translation: Translation) -> str:
    """What was translated, and what to write by hand, as lines for the terminal."""
    arrays = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in translation.arrays.items())
    lines = [f"wrote {out} and {out.parent / 'initial.npz'} ({arrays})", "", "translated:"]
    lines += [f"  {what:<40} -> {how}" for what, how in translation.translated]
    lines.append(f"  {'[tool.syft_flwr]':<40} -> [syftbox] aggregator_email, datasites; [syft_flwr] app_name")
    if translation.by_hand:
        lines += ["", "not translated (write by hand):"]
        lines += [f"  {what:<40} -> {line}" for what, line in translation.by_hand]
    return "\n".join(lines)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def chunks() -> list[bytes]:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return [buffer.getvalue()]

    atomic_write(path, chunks())


def _with_checkpoint(table: dict[str, Any], path: Path) -> dict[str, Any]:
    return {**table, "model": {**table["model"], "checkpoint_path": str(path)}}


def _job_name(project_name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", project_name)[:64].strip("-.")
    return cleaned or "syft-flwr-job"

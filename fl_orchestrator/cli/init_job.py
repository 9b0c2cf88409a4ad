"""`fl-orchestrator init`: write a starter job file that the daemon accepts as is.

The table is checked by the same loader the daemon uses before anything is
written, so a bad value is refused with the daemon's own one-line message (and
exit 78) instead of surfacing later as a failed service start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import tomli_w

from fl_orchestrator.config import EX_CANTCREAT as EX_CANTCREAT  # re-exported: tool_main reads it here
from fl_orchestrator.config import config_from_table
from fl_orchestrator.storage.atomic import atomic_write_text

HEADER = """\
# Starter job written by `fl-orchestrator init`. Every key and its default is in
# the README's "Configuration reference". Check it with:
#   fl-orchestratord --config {name} --check
"""


def array_spec(text: str) -> tuple[str, list[int | str]]:
    """Parse ``name=dim,dim`` (argparse type); dims the loader will reject stay strings."""
    name, sep, dims = text.partition("=")
    if not sep or not name or not dims:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIM[,DIM...], e.g. weight=784,10")
    # Left as text when not an integer, so the loader names the key and what it expected.
    return name, [_int_or_text(d.strip()) for d in dims.split(",")]


def _int_or_text(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _number_or_text(text: str) -> float | int | str:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `fl-orchestrator init`."""
    parser.add_argument(
        "--from-syft-flwr",
        type=Path,
        metavar="PROJECT_DIR",
        help="translate a bootstrapped syft-flwr project (run in its environment); then only"
        " --out, --name, --syftbox-root (default ~/SyftBox), --state-dir and --force apply",
    )
    parser.add_argument("--out", type=Path, help="job file to write (required without --from-syft-flwr)")
    parser.add_argument("--name", help="job name (letters, digits, '.', '-', '_')")
    parser.add_argument("--aggregator", help="the aggregator's email")
    parser.add_argument("--datasite", action="append", dest="datasites", help="a datasite's email (repeat)")
    parser.add_argument("--syftbox-root", type=Path, help="the SyftBox folder")
    parser.add_argument("--state-dir", type=Path, help="the daemon's state folder")
    # Numbers pass through as text when malformed: the loader's message is the one users see.
    parser.add_argument("--num-rounds", type=_number_or_text, default=3)
    parser.add_argument("--round-timeout-seconds", type=_number_or_text, default=600.0)
    parser.add_argument(
        "--min-available-nodes",
        type=_number_or_text,
        default=None,
        help="datasites needed to start a round (default: all listed)",
    )
    parser.add_argument(
        "--min-train-nodes",
        type=_number_or_text,
        default=None,
        help="fewest results a round aggregates (default: 2, or 1 with a single datasite)",
    )
    parser.add_argument(
        "--array",
        action="append",
        type=array_spec,
        default=[],
        metavar="NAME=DIM,DIM",
        help="an array of a randomly initialised model (repeat)",
    )
    parser.add_argument("--checkpoint", type=Path, help="start from this .npz or .msgpack model instead")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def _absolute(path: Path) -> str:
    # Relative paths in a job file resolve against the file's folder, but on the
    # command line the user meant the current folder: write what they meant.
    return str(Path(os.path.abspath(path.expanduser())))


def job_table(args: argparse.Namespace) -> dict[str, Any]:
    """The starter job as a TOML-ready table."""
    datasites: list[str] = list(args.datasites)
    min_available = len(datasites) if args.min_available_nodes is None else args.min_available_nodes
    if args.min_train_nodes is not None:
        min_train = args.min_train_nodes
    elif isinstance(min_available, int):
        min_train = min(2, min_available)
    else:
        min_train = 2  # min_available is malformed: the loader reports that first
    model: dict[str, Any]
    if args.checkpoint is not None:
        model = {"source": "checkpoint", "checkpoint_path": _absolute(args.checkpoint)}
        if args.array:
            # Kept so that the loader refuses the contradiction rather than one flag winning.
            model["arrays"] = {name: {"shape": shape} for name, shape in args.array}
    else:
        model = {
            "source": "random",
            "seed": 0,
            "arrays": {
                name: {"shape": shape, "dtype": "float32", "init": "normal"} for name, shape in args.array
            },
        }
    return {
        "job": {
            "name": args.name,
            "num_rounds": args.num_rounds,
            "round_timeout_seconds": args.round_timeout_seconds,
            "fraction_train": 1.0,
            "min_train_nodes": min_train,
            "min_available_nodes": min_available,
            "available_timeout_seconds": 600.0,
            "max_round_retries": 2,
            "train_config": {},
        },
        "syftbox": {
            "root": _absolute(args.syftbox_root),
            "aggregator_email": args.aggregator,
            "datasites": datasites,
        },
        "model": model,
        "strategy": {"name": "fedavg"},
        "state": {"state_dir": _absolute(args.state_dir)},
    }


REQUIRED = {
    "out": "--out",
    "name": "--name",
    "aggregator": "--aggregator",
    "datasites": "--datasite",
    "syftbox_root": "--syftbox-root",
    "state_dir": "--state-dir",
}


def missing_flags(args: argparse.Namespace) -> list[str]:
    """The flags a starter job needs that were not given (none with --from-syft-flwr)."""
    if args.from_syft_flwr is not None:
        return []
    return [flag for key, flag in REQUIRED.items() if getattr(args, key) in (None, [])]


def write_job_file(args: argparse.Namespace) -> Path:
    """Validate the starter job and write it; raise ConfigError or FileExistsError/OSError."""
    out: Path = args.out
    table = job_table(args)
    config_from_table(table, base_dir=Path(os.path.abspath(out)).parent)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} does not exist")
    text = HEADER.format(name=out) + "\n" + tomli_w.dumps(table)
    atomic_write_text(out, text)
    return out

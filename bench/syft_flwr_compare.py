"""syft-flwr 0.5.3's own server next to fl-orchestratord, driving the same real syft-flwr data owners.

Each run lays out a fresh federation (tests/syftflwr/harness.py: one shared SyftBox root, no
sync, 3 unmodified syft-flwr DOs, the template Flower app bootstrapped with syft_flwr.bootstrap)
and plays the same job twice, each time with fresh DOs: 3 rounds of sample-weighted FedAvg,
evaluation off, one DO raising in round 2.

- "syft-flwr server": the bootstrapped main.py run as the aggregator (SyftGrid; it polls for
  responses every SYFT_FLWR_POLL_INTERVAL seconds, 3 by default). Round times are the gaps
  between the ServerApp's evaluate_fn calls (before round 1, then after every round).
- "fl-orchestratord": our daemon with ``protocol = "syft-flwr"``. Round 1 runs from its
  ``round.dispatched`` to its ``round.completed``, later rounds between ``round.completed`` lines.

Each aggregator runs in encrypted mode (syft-flwr's default, and ours: the DOs run main.py
with no SYFT_FLWR_ENCRYPTION_ENABLED) and, with ``--encryption both`` (the default), in
plaintext too (the DOs with SYFT_FLWR_ENCRYPTION_ENABLED=false, our job with
``encryption = false``), each over its own fresh federation, so no two share an identity.

For each it prints the per-round wall times, the rounds' total, the process's whole wall time
(start to exit: imports, waiting for the DOs, the stop message), lost replies (requests without
a usable response, and DO-side 400 "Error loading request" / 419 answers), whether every DO
exited by itself after the stop message, and how far the final model is from the hand-computed
FedAvg. The aggregators alternate (A B A B ...), so a noisy neighbour slows both.

    make compare-syft-flwr                          # 3 runs, encrypted and plaintext
    .venv/bin/python bench/syft_flwr_compare.py --runs 5 --only syft-flwr
    .venv/bin/python bench/syft_flwr_compare.py --poll-interval 0.5 --json out.json

Writes bench/results/syft_flwr_compare.json (git-ignored) unless --json says otherwise.
Exit status 1 if a run of either aggregator did not finish, or if our daemon lost a reply; the
replies syft-flwr's own server loses are what this measures, not a failure of the script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fl_orchestrator.storage.models import ModelStore  # noqa: E402

from syftflwr.harness import (  # noqa: E402 - tests/ goes on sys.path first
    SYFT_FLWR_VERSION,
    DataOwnerSpec,
    Federation,
    SyftFlwrEnv,
    SyftFlwrUnavailable,
    default_specs,
    ensure_env,
    expected_models,
    grep,
    json_lines,
    make_federation,
    max_relative_error,
)

SYFT_FLWR = "syft-flwr server"
DAEMON = "fl-orchestratord"
MODES = {"on": (True,), "off": (False,), "both": (True, False)}


def _label(name: str, encryption: bool) -> str:
    return f"{name}, {'encrypted' if encryption else 'plaintext'}"


PULLED = re.compile(r"Successfully pulled (\d+) message")


@dataclass
class Outcome:
    """One aggregator's run."""

    aggregator: str
    run: int
    ok: bool
    exit_code: int | None
    round_seconds: list[float]
    process_seconds: float
    requests: int
    usable_replies: int
    lost_replies: int
    do_error_answers: list[str]
    dos_exited: int
    model_error: float | None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds_total(self) -> float:
        """The rounds' wall time, summed."""
        return sum(self.round_seconds)


@dataclass
class Served:
    """What one aggregator's own run gave, before the DO side is looked at."""

    exit_code: int | None
    ok: bool
    round_seconds: list[float]
    process_seconds: float
    requests: int
    usable_replies: int
    final_model: dict[str, np.ndarray] | None
    note: str
    detail: dict[str, Any]


def _timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def play(
    aggregator: str,
    serve: Callable[[Federation], Served],
    *,
    env: SyftFlwrEnv,
    federation_dir: Path,
    run: int,
    args: argparse.Namespace,
    specs: list[DataOwnerSpec],
    encryption: bool,
) -> Outcome:
    """One run of one aggregator over fresh DOs: start them, serve, then what the DOs did and the model."""
    federation = make_federation(
        env, federation_dir, n_dos=args.dos, extra_params=args.params, encryption=encryption
    )
    try:
        federation.start_data_owners(specs, timeout_seconds=60.0)
        served = serve(federation)
        exits = federation.wait_data_owners_exit(timeout_seconds=20.0)
        lost_do = [line for lines in federation.lost_reply_lines().values() for line in lines]
        error = None
        if served.final_model is not None:
            expected = expected_models(federation.model, specs, args.rounds)
            error = max_relative_error(served.final_model, expected[-1])
        return Outcome(
            aggregator=aggregator,
            run=run,
            ok=served.ok,
            exit_code=served.exit_code,
            round_seconds=served.round_seconds,
            process_seconds=served.process_seconds,
            requests=served.requests,
            usable_replies=served.usable_replies,
            lost_replies=served.requests - served.usable_replies,
            do_error_answers=lost_do,
            dos_exited=sum(1 for code in exits.values() if code == 0),
            model_error=error,
            note=served.note,
            detail=served.detail,
        )
    finally:
        federation.close()


def run_syft_flwr(
    env: SyftFlwrEnv,
    workdir: Path,
    run: int,
    args: argparse.Namespace,
    specs: list[DataOwnerSpec],
    encryption: bool,
) -> Outcome:
    """syft-flwr's own server over fresh DOs."""

    def serve(federation: Federation) -> Served:
        server = federation.run_syft_flwr_server(
            timeout_seconds=args.deadline,
            round_timeout_seconds=args.round_timeout,
            poll_interval_seconds=args.poll_interval,
        )
        pulled_lines = grep(server.log_path, ["Successfully pulled"])
        pulled = sum(int(m.group(1)) for line in pulled_lines for m in [PULLED.search(line)] if m)
        ok = server.exit_code == 0 and len(server.round_seconds) == args.rounds
        return Served(
            exit_code=server.exit_code,
            ok=ok,
            round_seconds=server.round_seconds,
            process_seconds=server.seconds,
            requests=args.rounds * args.dos,
            usable_replies=pulled,
            final_model=server.final_model(),
            note="" if ok else f"exit {server.exit_code}; {server.log_path}",
            detail={"server_lost_lines": server.lost_reply_lines()},
        )

    federation_dir = workdir / f"run{run}-syft-flwr-{'enc' if encryption else 'plain'}"
    return play(
        _label(SYFT_FLWR, encryption),
        serve,
        env=env,
        federation_dir=federation_dir,
        run=run,
        args=args,
        specs=specs,
        encryption=encryption,
    )


def run_daemon(
    env: SyftFlwrEnv,
    workdir: Path,
    run: int,
    args: argparse.Namespace,
    specs: list[DataOwnerSpec],
    encryption: bool,
) -> Outcome:
    """Our daemon over fresh DOs."""
    folder = workdir / f"run{run}-daemon-{'enc' if encryption else 'plain'}"

    def serve(federation: Federation) -> Served:
        config = federation.write_daemon_job(
            folder / "job", num_rounds=args.rounds, round_timeout_seconds=args.round_timeout
        )
        daemon = federation.run_daemon(config, timeout_seconds=args.deadline)
        dispatched = [e for e in daemon.named("round.dispatched") if e.get("phase", "train") == "train"]
        completed = sorted(daemon.named("round.completed"), key=lambda e: int(e["round"]))
        ticks = [_timestamp(dispatched[0])] if dispatched else []
        ticks += [_timestamp(e) for e in completed]
        round_seconds = [b - a for a, b in itertools.pairwise(ticks)]
        metrics = list(json_lines(folder / "job" / "state" / "metrics.jsonl"))
        store = ModelStore(folder / "job" / "state", "testjob")
        ok = daemon.exit_code == 0 and len(round_seconds) == args.rounds
        return Served(
            exit_code=daemon.exit_code,
            ok=ok,
            round_seconds=round_seconds,
            process_seconds=daemon.seconds,
            requests=sum(len(m["selected"]) for m in metrics) if metrics else args.rounds * args.dos,
            usable_replies=sum(len(m["succeeded"]) + len(m["failed"]) for m in metrics),
            final_model=store.load(args.rounds) if store.rounds()[-1:] == [args.rounds] else None,
            note="" if ok else f"exit {daemon.exit_code}: " + _last_error(daemon.log_tail(3000)),
            detail={"collect_seconds": [m.get("collect_seconds") for m in metrics]},
        )

    return play(
        _label(DAEMON, encryption),
        serve,
        env=env,
        federation_dir=folder / "federation",
        run=run,
        args=args,
        specs=specs,
        encryption=encryption,
    )


def _progress(outcome: Outcome) -> None:
    print(f"run {outcome.run}: {outcome.aggregator}: {_fmt(outcome.rounds_total)} s", flush=True)


def _last_error(tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    """The per-run table and the medians."""
    rounds = args.rounds
    poll = f"{args.poll_interval:g} s" if args.poll_interval else "3 s (default)"
    size = 15 + args.params
    print(
        f"\nsyft-flwr {SYFT_FLWR_VERSION} DOs ({args.dos}), {rounds} rounds FedAvg,"
        f" {size} float32 parameters, ds1 raises in round 2;"
        f" round timeout {args.round_timeout:g} s; syft-flwr server poll interval {poll}"
    )
    head = ["run", "aggregator", *[f"round {r}" for r in range(1, rounds + 1)]]
    head += ["rounds", "process", "lost", "DO 4xx", "DOs exited", "model err"]
    print("  ".join(f"{h:>10}" if i > 1 else f"{h:<30}" if i == 1 else f"{h:>3}" for i, h in enumerate(head)))
    for o in outcomes:
        cells = [f"{o.run:>3}", f"{o.aggregator:<30}"]
        times = [o.round_seconds[i] if i < len(o.round_seconds) else None for i in range(rounds)]
        cells += [f"{_fmt(t):>10}" for t in times]
        cells += [f"{_fmt(o.rounds_total):>10}", f"{_fmt(o.process_seconds, 2):>10}"]
        cells += [f"{o.lost_replies:>10}", f"{len(o.do_error_answers):>10}"]
        cells += [f"{o.dos_exited}/{args.dos}".rjust(10)]
        cells += [f"{o.model_error:.1e}".rjust(10) if o.model_error is not None else f"{'-':>10}"]
        print("  ".join(cells) + (f"   ! {o.note}" if o.note else ""))
    for name in dict.fromkeys(o.aggregator for o in outcomes):
        done = [o for o in outcomes if o.aggregator == name and o.ok]
        if not done:
            continue
        per_round = [statistics.median(o.round_seconds[i] for o in done) for i in range(rounds)]
        print(
            f"median {name:<30} rounds "
            + "  ".join(f"{s:.3f}" for s in per_round)
            + f"  total {statistics.median(o.rounds_total for o in done):.3f} s,"
            f" process {statistics.median(o.process_seconds for o in done):.2f} s,"
            f" lost replies {sum(o.lost_replies for o in done)} in {len(done)} runs"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; return 1 if a run did not finish or the daemon lost a reply."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each aggregator (default 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dos", type=int, default=3, help="data owners (default 3)")
    parser.add_argument("--round-timeout", type=float, default=20.0, help="seconds (both aggregators)")
    parser.add_argument(
        "--poll-interval", type=float, default=None, help="SYFT_FLWR_POLL_INTERVAL (default: syft-flwr's 3 s)"
    )
    parser.add_argument(
        "--params", type=int, default=0, help="extra float32 parameters in the model (bigger messages)"
    )
    parser.add_argument("--only", choices=("syft-flwr", "daemon"), default=None)
    parser.add_argument(
        "--encryption", choices=tuple(MODES), default="both", help="encrypted runs, plaintext runs, or both"
    )
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds before a run is killed")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "syft_flwr_compare.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    args = parser.parse_args(argv)
    if args.dos < 2:
        parser.error("--dos must be at least 2 (FedAvg's min_train_nodes)")

    try:
        env = ensure_env()
    except SyftFlwrUnavailable as exc:
        print(f"syft-flwr {SYFT_FLWR_VERSION} is not available: {exc}", file=sys.stderr)
        return 1
    specs = default_specs(args.dos, failing=1, fail_round=2)
    workdir = Path(tempfile.mkdtemp(prefix="fl-syft-flwr-compare-"))
    outcomes: list[Outcome] = []
    started = time.monotonic()
    try:
        for run in range(1, args.runs + 1):
            for encryption in MODES[args.encryption]:
                if args.only in (None, "syft-flwr"):
                    outcomes.append(run_syft_flwr(env, workdir, run, args, specs, encryption))
                    print(
                        f"run {run}: {outcomes[-1].aggregator}: {_fmt(outcomes[-1].rounds_total)} s",
                        flush=True,
                    )
                if args.only in (None, "daemon"):
                    outcomes.append(run_daemon(env, workdir, run, args, specs, encryption))
                    print(
                        f"run {run}: {outcomes[-1].aggregator}: {_fmt(outcomes[-1].rounds_total)} s",
                        flush=True,
                    )
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(outcomes, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "syft_flwr_version": SYFT_FLWR_VERSION,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "specs": [asdict(s) for s in specs],
        "outcomes": [{**asdict(o), "rounds_total": o.rounds_total} for o in outcomes],
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    bad = [o for o in outcomes if not o.ok]
    bad += [o for o in outcomes if o.aggregator.startswith(DAEMON) and (o.lost_replies or o.do_error_answers)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

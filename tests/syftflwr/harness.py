"""Real syft-flwr 0.5.3 data owners on one machine, for the daemon's ``protocol = "syft-flwr"``.

What the tests and the comparison script import; it lives in modules beside this one, one
concern each:

- ``environment``: the cached venv with syft-flwr, flwr and the daemon's dependencies
  (``ensure_env``, ``env_or_skip``), and ``run_venv_tests``, which runs the tests that import
  flwr (this folder) with its Python;
- ``fedavg``: the initial model, what each DO's ClientApp does (``DataOwnerSpec``) and the
  FedAvg that must come out, computed by hand;
- ``layout``: one federation's files (shared SyftBox root, a config and a bootstrapped copy
  of ``app_template/`` per party, traces, logs) and reading what the processes left there;
- ``federation``: ``make_federation`` and the processes: the DOs (the unmodified ``main.py``),
  syft-flwr's own server (the same ``main.py`` as the aggregator) and our daemon, with
  teardown (``close``, idempotent, also at interpreter exit);
- ``records``: JSON lines, log greps and the daemon's quarantine records, and what one
  server run left (``ServerRun``, ``DaemonRun``).

Facts about syft-flwr 0.5.3's data-owner side that the tests rely on (read from its source):

- a DO publishes ``<root>/datasites/<DO>/app_data/flwr/<app_name>/rpc/{rpc.schema.json,syft.pub.yaml}``
  and watches ``rpc/messages/**/*.request`` for watchdog *created* and *moved* events only
  (not *modified*); requests already there at start are processed once;
- a request is a syft_rpc ``SyftRequest`` JSON file; the DO reads it once, at the event, and
  if it cannot be parsed (e.g. read while still being written) it answers
  ``400 "Error loading request: ..."`` and never looks at it again: a lost reply;
- the DO writes ``<id>.response`` with ``Path.write_text`` (no temp name, no rename) into
  ``<url's folder>/<request.sender>/``, named by the request's JSON ``id``, not its file name;
- a request whose ``expires`` has passed is answered ``419 "Request expired"``;
- if the ClientApp raises, the reply is a Flower ``Message`` carrying an ``Error`` with code
  ``CLIENT_APP_RAISED_EXCEPTION`` (status 200 at the RPC level);
- a SYSTEM message whose config has ``action = "stop"`` (or whose group_id is ``"final"``)
  makes the DO exit with status 0 after writing an empty 200 response to it.
"""

from __future__ import annotations

from support.records import json_lines, quarantine_records
from syftflwr.environment import (
    REQUIRED_ENV,
    SYFT_FLWR_VERSION,
    SyftFlwrEnv,
    SyftFlwrUnavailable,
    ensure_env,
    env_or_skip,
    run_venv_tests,
)
from syftflwr.fedavg import (
    ARRAY_NAMES,
    DataOwnerSpec,
    default_specs,
    expected_models,
    initial_model,
    max_relative_error,
)
from syftflwr.federation import Federation, make_federation
from syftflwr.records import DaemonRun, ServerRun, grep

__all__ = [
    "ARRAY_NAMES",
    "REQUIRED_ENV",
    "SYFT_FLWR_VERSION",
    "DaemonRun",
    "DataOwnerSpec",
    "Federation",
    "ServerRun",
    "SyftFlwrEnv",
    "SyftFlwrUnavailable",
    "default_specs",
    "ensure_env",
    "env_or_skip",
    "expected_models",
    "grep",
    "initial_model",
    "json_lines",
    "make_federation",
    "max_relative_error",
    "quarantine_records",
    "run_venv_tests",
]

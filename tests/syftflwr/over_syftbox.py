"""Real syft-flwr 0.5.3 data owners and the daemon over real SyftBox 0.4.0 sync.

The shared-folder harness (``federation.py``) gives every party the same SyftBox root. Here
every party has its own SyftBox client (``tests/syftbox/harness.py``): the DO's syft_core
config points ``data_dir`` at that DO's client folder, the daemon's ``[syftbox] root`` at the
aggregator's, and every request and response travels through a SyftBox server on loopback.

``make_synced_federation`` lays it out: a ``SyncedFederation`` is a ``Federation`` whose
``root`` is the aggregator's client folder (what the daemon sees, so ``rpc_dir`` and
``wait_published`` look at the aggregator's copy of each DO's datasite), plus
``own_rpc_dir`` for the DO's own copy. ``close`` also stops the SyftBox network.

syftbox 0.4.0 reads permissions only from ``syftperm.yaml``; the ``syft.pub.yaml`` that
syft-event writes into ``rpc/`` (``**/{{.UserEmail}}/*.request`` writable by that user) is
synced as an ordinary file and means nothing to it. ``grant_aggregator`` writes the
``syftperm.yaml`` that expresses the same grant for 0.4.0 into a DO's own ``rpc/`` folder:
what a DO's operator (or a newer syftbox honouring ``syft.pub.yaml``) would provide.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from support.jobs import AGGREGATOR, site_emails
from syftbox.harness import SyftBoxEnv, SyftBoxNetwork, wait_until
from syftflwr.environment import SyftFlwrEnv
from syftflwr.fedavg import initial_model
from syftflwr.federation import KEEP_ENV, Federation
from syftflwr.layout import Party, bootstrap_app


@dataclass
class SyncedFederation(Federation):
    """A Federation whose parties each have their own SyftBox client folder."""

    network: SyftBoxNetwork | None = None

    @property
    def root(self) -> Path:
        """The aggregator's SyftBox client folder: the daemon's ``[syftbox] root``."""
        assert self.network is not None
        return self.network.party(self.aggregator.email).data_dir

    def own_rpc_dir(self, email: str) -> Path:
        """A DO's RPC folder in its own SyftBox client folder (where its main.py watches)."""
        assert self.network is not None
        base = self.network.party(email).data_dir / "datasites" / email
        return base / "app_data" / "flwr" / self.app_name / "rpc"

    def own_rpc_files(self, email: str) -> list[Path]:
        """Requests and responses in the DO's own copy of its messages folder."""
        folder = self.own_rpc_dir(email) / "messages"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.rglob("*") if p.suffix in (".request", ".response"))

    def wait_own_schema(self, emails: list[str], *, timeout_seconds: float = 60.0) -> float:
        """Wait until each DO has published rpc.schema.json in its own folder."""

        def published() -> bool:
            return all((self.own_rpc_dir(e) / "rpc.schema.json").is_file() for e in emails)

        return wait_until(
            published,
            timeout_seconds=timeout_seconds,
            what="the data owners to publish their schema in their own folders",
            check=lambda: self._check_alive(emails),
        )

    def close(self) -> None:
        """Stop the DOs and the daemon, then the SyftBox network; remove the folders."""
        if self._closed:
            return
        try:
            super().close()
        finally:
            if self.network is not None:
                self.network.close()
            if self.owns_workdir and not os.environ.get(KEEP_ENV):
                shutil.rmtree(self.workdir, ignore_errors=True)


def rpc_permissions(aggregator: str) -> str:
    """syftperm.yaml (0.4.0 format) equivalent to syft-event's syft.pub.yaml, for one aggregator.

    The schema is readable by the aggregator (presence), and the aggregator may create, read
    and write (so also delete) requests and responses in ``messages/<aggregator>/``. One
    explicit user, no ``*`` rule: 0.4.0 lists ``*`` rules to everybody (tests/syftbox gap 1).
    """
    return (
        "- path: rpc.schema.json\n"
        f"  user: '{aggregator}'\n"
        "  permissions: [read]\n"
        f"- path: 'messages/{aggregator}/*'\n"
        f"  user: '{aggregator}'\n"
        "  permissions: [read, create, write]\n"
    )


def grant_aggregator(federation: SyncedFederation, email: str) -> Path:
    """Write rpc/syftperm.yaml into a DO's own datasite, granting the aggregator its messages."""
    folder = federation.own_rpc_dir(email)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "syftperm.yaml"
    path.write_text(rpc_permissions(federation.aggregator.email), encoding="utf-8")
    return path


def make_synced_federation(
    env: SyftFlwrEnv,
    syftbox_env: SyftBoxEnv,
    workdir: Path | None = None,
    *,
    n_dos: int = 3,
    aggregator: str = AGGREGATOR,
    log_dir: Path | None = None,
) -> SyncedFederation:
    """Lay out a federation over a (not yet started) SyftBox network: one client per party.

    Each party's syft_core config has ``data_dir`` = its own SyftBox client folder. Call
    ``federation.network.start()`` before starting any DO.
    """
    owns = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="fl-syft-flwr-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = log_dir or work / "logs"
    dos = site_emails(n_dos)
    (work / "traces").mkdir(parents=True, exist_ok=True)
    network = SyftBoxNetwork(syftbox_env, [aggregator, *dos], workdir=work / "syftbox", log_dir=logs)
    try:
        source, app_name = bootstrap_app(env, work, aggregator, dos)

        def party(email: str) -> Party:
            p = Party(email, work / "parties" / email, network.party(email).data_dir)
            p.write_config()
            shutil.copytree(source, p.project_dir, dirs_exist_ok=True)
            return p

        federation = SyncedFederation(
            env=env,
            workdir=work,
            app_name=app_name,
            aggregator=party(aggregator),
            data_owners={email: party(email) for email in dos},
            log_dir=logs,
            model=initial_model(),
            owns_workdir=owns,
            network=network,
        )
    except BaseException:
        network.close()
        raise
    np.savez(federation.initial_npz, **federation.model)  # type: ignore[arg-type]
    return federation


def wait_schema_synced(federation: SyncedFederation, *, timeout_seconds: float) -> float | None:
    """Seconds until the aggregator's copy holds every DO's rpc.schema.json; None on timeout."""
    started = time.monotonic()
    try:
        federation.wait_published(federation.emails, timeout_seconds=timeout_seconds)
    except TimeoutError:
        return None
    return time.monotonic() - started


def schema_paths(federation: SyncedFederation) -> dict[str, bool]:
    """Per DO, whether the aggregator's copy holds its rpc.schema.json."""
    return {e: (federation.rpc_dir(e) / "rpc.schema.json").is_file() for e in federation.emails}


def dump_json(value: object) -> str:
    """Compact JSON for report lines."""
    return json.dumps(value, sort_keys=True, default=str)

"""Fixtures for the contract tests, which run only inside the syft-flwr environment.

They import the real ``syft_flwr``, ``syft_rpc``, ``syft_event`` and ``flwr``
(harness.run_venv_tests runs them). This folder has no ``__init__.py``: its modules
import as top-level names (``contract_support``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract_support import OWNER, TEMPLATE_DIR


@pytest.fixture
def client(tmp_path: Path) -> Any:
    """A syft_core Client of the data owner over a fresh root (tmp_path/root)."""
    from syft_core import Client, SyftClientConfig

    root = tmp_path / "root"
    (root / "datasites").mkdir(parents=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(
        json.dumps({"email": OWNER, "data_dir": str(root), "server_url": "http://127.0.0.1:9/"}),
        encoding="utf-8",
    )
    return Client(SyftClientConfig.load(config_path))


@pytest.fixture
def client_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The template's ClientApp: delta 0.5, 7 examples, raising in server-round 2."""
    yield from _template_app(monkeypatch, "flt_app.client_app")


@pytest.fixture
def legacy_client_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The same owner as a ClientApp(client_fn=...) with a NumPyClient (legacy records)."""
    yield from _template_app(monkeypatch, "flt_app.legacy_client_app")


def _template_app(monkeypatch: pytest.MonkeyPatch, module: str) -> Iterator[Any]:
    import importlib

    monkeypatch.setenv("FLT_DELTA", "0.5")
    monkeypatch.setenv("FLT_NUM_EXAMPLES", "7")
    monkeypatch.setenv("FLT_FAIL_ROUNDS", "2")
    monkeypatch.delenv("FLT_TRACE", raising=False)
    sys.path.insert(0, str(TEMPLATE_DIR))
    try:
        yield importlib.import_module(module).app
    finally:
        sys.path.remove(str(TEMPLATE_DIR))
        for name in [m for m in sys.modules if m == "flt_app" or m.startswith("flt_app.")]:
            del sys.modules[name]

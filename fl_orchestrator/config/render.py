"""A loaded config back to plain data: for --check and for the run's effective-config.toml."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import tomli_w

from fl_orchestrator.config.schema import JobConfig


def config_to_table(config: JobConfig, *, for_toml: bool = False) -> dict[str, Any]:
    """The resolved config as nested dicts: paths absolute, defaults filled in.

    With ``for_toml`` unset values (None) are dropped, because TOML has no null,
    and the loader-only ``source_path`` is left out so the result loads again.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, bytes) and not for_toml:
            return value.hex()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if not (for_toml and v is None)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    table: dict[str, Any] = plain(asdict(config))
    # Strategy parameters are flat keys of [strategy] in a job file.
    strategy = table["strategy"]
    strategy.update(strategy.pop("params"))
    if for_toml:
        table.pop("source_path", None)
    return table


def config_to_toml(config: JobConfig) -> str:
    """The resolved config as TOML that load_config accepts and that reproduces the run."""
    header = f"# Effective configuration, resolved from {config.source_path or '(no file)'}.\n"
    return header + tomli_w.dumps(config_to_table(config, for_toml=True))

"""Job configuration: schema and the single loader."""

from fl_orchestrator.config.loader import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_USAGE,
    ConfigError,
    config_from_table,
    load_config,
)
from fl_orchestrator.config.schema import JobConfig

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_USAGE",
    "ConfigError",
    "JobConfig",
    "config_from_table",
    "load_config",
]

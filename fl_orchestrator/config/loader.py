"""Load and validate a job file: the one way a JobConfig comes into being."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from fl_orchestrator.config.schema import JobConfig, StrategySection
from fl_orchestrator.config.tiers import check_tiers

EX_CONFIG = 78
# sysexits' EX_USAGE, for bad command-line flags (argparse's own 2 is not a sysexits code).
EX_USAGE = 64
# sysexits.h: an output file cannot be created (exists without --force, or unwritable).
EX_CANTCREAT = 73
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
_APP_NAME = re.compile(r"[A-Za-z0-9@._-]{1,200}")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_CONFIG_SCALARS = (bool, int, float, str, bytes)


class ConfigError(Exception):
    """A job file that cannot run: names the key, the value and what was expected."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(self.line())

    def line(self) -> str:
        """The one line printed before exiting with EX_CONFIG."""
        shown = "(missing)" if self.value is _MISSING else repr(self.value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        key = self.key if self.key.isprintable() else repr(self.key)  # TOML keys may hold newlines
        return f"config error: {key} = {shown}: expected {self.expected}"


_MISSING: Any = object()


def load_config(path: Path | str) -> JobConfig:
    """Read, validate and resolve one job file; raise ConfigError on any defect."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("--config", str(path), f"a readable file ({exc.strerror})") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("--config", str(path), "UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"valid TOML ({exc})") from None
    return config_from_table(table, base_dir=path.resolve().parent, source_path=path.resolve())


def config_from_table(table: dict[str, Any], *, base_dir: Path, source_path: Path | None = None) -> JobConfig:
    """Build a JobConfig from an already parsed table (paths resolve against base_dir)."""
    table = dict(table)
    if "source_path" in table:
        raise ConfigError("source_path", table["source_path"], "no such key (it is set by the loader)")
    config: JobConfig = _build(JobConfig, table, "", base_dir)
    config = dataclasses.replace(config, source_path=source_path)
    _check_cross_fields(config)
    return config


def _build(cls: type[Any], table: object, prefix: str, base_dir: Path) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(prefix.rstrip("."), table, "a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_path"}
    for key in table:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(prefix + key, table[key], f"no such key; known keys: {', '.join(fields)}{hint}")
    hints = typing.get_type_hints(cls)
    if cls is JobConfig and "strategy" in table:
        table = dict(table)
        strategy = _build_strategy(table.pop("strategy"))
    else:
        strategy = None
    values: dict[str, Any] = {} if strategy is None else {"strategy": strategy}
    for name, fld in fields.items():
        key = prefix + name
        if name not in table:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    values[name] = _build(hints[name], {}, key + ".", base_dir)
                    continue
                raise ConfigError(key, _MISSING, f"a value: {fld.metadata.get('doc', name)}")
            continue
        values[name] = _convert(hints[name], table[name], key, base_dir, fld.metadata)
    return cls(**values)


def _build_strategy(table: object) -> StrategySection:
    """[strategy]: a name plus that strategy's own parameters as flat keys."""
    from fl_orchestrator.aggregation.registry import STRATEGIES, canonical_strategy_name, check_params

    if not isinstance(table, dict):
        raise ConfigError("strategy", table, "a table")
    params = dict(table)
    name = params.pop("name", "fedavg")
    if not isinstance(name, str):
        raise ConfigError("strategy.name", name, "a string")
    if ":" in name:
        if not _IMPORT_STRING.fullmatch(name):
            raise ConfigError("strategy.name", name, "a built-in name or 'package.module:Class'")
        checked = {k: check_config_value(v, f"strategy.{k}") for k, v in params.items()}
        error = check_params(name, checked)
        if error:
            raise ConfigError("strategy.name", name, f"a loadable strategy class ({error})")
        return StrategySection(name, checked)
    name = canonical_strategy_name(name)
    info = STRATEGIES.get(name)
    if info is None:
        raise ConfigError(
            "strategy.name",
            name,
            f"one of {', '.join(STRATEGIES)} (or Flower's class name, e.g. FedAvg) or 'package.module:Class'",
        )
    if "strategy" in params and isinstance(params["strategy"], str):
        params["strategy"] = canonical_strategy_name(params["strategy"])  # the strategy DP wraps
    built = _build(info.params_type, params, "strategy.", Path("."))
    error = check_params(name, built)
    if error:
        raise ConfigError("strategy", name, f"valid parameters: {error}")
    values = {f.name: getattr(built, f.name) for f in dataclasses.fields(built)}
    return StrategySection(name, values)


def _convert(tp: Any, value: object, key: str, base_dir: Path, meta: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    doc = meta.get("doc", "") if meta else ""
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, key, base_dir, meta)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", base_dir)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, f"true or false ({doc})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, f"an integer ({doc})")
        _check_range(value, key, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, f"a number ({doc})")
        if not math.isfinite(value):
            raise ConfigError(key, value, f"a finite number ({doc})")
        _check_range(value, key, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, f"a string ({doc})")
        _check_string(value, key, meta)
        return value
    if tp is Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(key, value, f"a path string ({doc})")
        try:
            path = Path(value).expanduser()
            return path if path.is_absolute() else (base_dir / path).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # unknown ~user, symlink loop
            raise ConfigError(key, value, f"a resolvable path ({exc})") from None
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, value, f"a list ({doc})")
        return tuple(_convert(args[0], item, f"{key}[{i}]", base_dir, meta) for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, f"a table ({doc})")
        item_type = args[1]
        if isinstance(item_type, type) and dataclasses.is_dataclass(item_type):
            return {k: _build(item_type, v, f"{key}.{k}.", base_dir) for k, v in value.items()}
        return {k: check_config_value(v, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not user input


def _check_range(value: float, key: str, meta: Any) -> None:
    lo, hi = meta.get("minimum"), meta.get("maximum")
    exclusive = meta.get("exclusive_minimum", False)
    doc = meta.get("doc", "")
    if lo is not None and (value < lo or (exclusive and value == lo)):
        relation = ">" if exclusive else ">="
        upper = f" and <= {hi}" if hi is not None else ""
        raise ConfigError(key, value, f"a value {relation} {lo}{upper} ({doc})")
    if hi is not None and value > hi:
        lower = f">= {lo} and " if lo is not None else ""
        raise ConfigError(key, value, f"a value {lower}<= {hi} ({doc})")


def _check_string(value: str, key: str, meta: Any) -> None:
    doc = meta.get("doc", "")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(key, value, f"one of {', '.join(repr(c) for c in choices)}")
    if meta.get("email") and not _EMAIL.fullmatch(value):
        raise ConfigError(key, value, "an email address like name@example.org")
    if meta.get("import_string") and not _IMPORT_STRING.fullmatch(value):
        raise ConfigError(key, value, f"an import string 'package.module:function' ({doc})")


def check_config_value(value: object, key: str) -> object:
    """Check one value a config table may send to datasites; raise ConfigError if it cannot be sent."""
    if isinstance(value, _CONFIG_SCALARS):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "a finite number")
        return value
    if isinstance(value, list):
        kinds = {type(item) for item in value}
        if len(kinds) > 1 or not kinds <= set(_CONFIG_SCALARS):
            raise ConfigError(
                key, value, "a list whose items are all int, all float, all str, all bool or all bytes"
            )
        if any(isinstance(item, float) and not math.isfinite(item) for item in value):
            raise ConfigError(key, value, "a list of finite numbers")
        return list(value)
    raise ConfigError(key, value, "an int, float, str, bool, bytes or a homogeneous list of one")


def _check_cross_fields(config: JobConfig) -> None:
    job, box, model = config.job, config.syftbox, config.model
    if not _JOB_NAME.fullmatch(job.name):
        raise ConfigError("job.name", job.name, "1-64 of letters, digits, '.', '-', '_'")
    for index, folder in enumerate(job.python_path):
        if not folder.is_dir():
            raise ConfigError(f"job.python_path[{index}]", str(folder), "an existing folder")
    if not box.datasites:
        raise ConfigError("syftbox.datasites", [], "at least one datasite email")
    if len(set(box.datasites)) != len(box.datasites):
        dupes = sorted({d for d in box.datasites if box.datasites.count(d) > 1})
        raise ConfigError("syftbox.datasites", dupes, "each email listed once")
    if box.aggregator_email in box.datasites:
        raise ConfigError(
            "syftbox.aggregator_email", box.aggregator_email, "an email not among the datasites"
        )
    n = len(box.datasites)
    needed = _min_results(config)
    if job.min_train_nodes < needed:
        raise ConfigError(
            "job.min_train_nodes",
            job.min_train_nodes,
            f"at least {needed}: strategy {config.strategy.name} needs that many results per round",
        )
    if job.min_available_nodes > n:
        raise ConfigError(
            "job.min_available_nodes", job.min_available_nodes, f"at most the {n} listed datasites"
        )
    if job.min_train_nodes > job.min_available_nodes:
        raise ConfigError(
            "job.min_train_nodes",
            job.min_train_nodes,
            f"at most job.min_available_nodes ({job.min_available_nodes})",
        )
    if "server-round" in job.train_config:
        raise ConfigError(
            "job.train_config.server-round",
            job.train_config["server-round"],
            "no such key (the server sets it each round)",
        )
    if model.source == "random":
        if not model.arrays:
            raise ConfigError("model.arrays", {}, "at least one array when model.source = 'random'")
        if model.checkpoint_path is not None:
            raise ConfigError(
                "model.checkpoint_path",
                str(model.checkpoint_path),
                "no checkpoint_path when model.source = 'random'",
            )
    else:
        if model.checkpoint_path is None:
            raise ConfigError(
                "model.checkpoint_path", _MISSING, "a .npz or .msgpack file (source = 'checkpoint')"
            )
        if model.arrays:
            raise ConfigError("model.arrays", list(model.arrays), "no arrays when source = 'checkpoint'")
        if not model.checkpoint_path.is_file():
            raise ConfigError("model.checkpoint_path", str(model.checkpoint_path), "an existing file")
        if model.checkpoint_path.suffix not in (".npz", ".msgpack"):
            raise ConfigError(
                "model.checkpoint_path", str(model.checkpoint_path), "a file ending .npz or .msgpack"
            )
    _check_syft_flwr(config)
    tiers = check_tiers(config)
    if tiers is not None:
        raise ConfigError(*tiers)
    if config.region.root_job is not None and not _JOB_NAME.fullmatch(config.region.root_job):
        raise ConfigError("region.root_job", config.region.root_job, "1-64 of letters, digits, '.', '-', '_'")
    for name in model.arrays:
        if not re.fullmatch(r"[A-Za-z0-9_.:/-]{1,128}", name) or ".." in name:
            raise ConfigError(f"model.arrays.{name}", name, "an array name of [A-Za-z0-9_.:/-]")


def _check_syft_flwr(config: JobConfig) -> None:
    app_name = config.syft_flwr.app_name
    if config.job.protocol != "syft-flwr":
        return
    if app_name is None:
        raise ConfigError(
            "syft_flwr.app_name", _MISSING, "the app_name from [tool.syft_flwr] (job.protocol = 'syft-flwr')"
        )
    if not _APP_NAME.fullmatch(app_name) or app_name in (".", ".."):
        raise ConfigError("syft_flwr.app_name", app_name, "1-200 of letters, digits, '@', '.', '-', '_'")
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(
            "job.protocol",
            "syft-flwr",
            "the [syft-flwr] extra installed (pip install 'fl-orchestrator[syft-flwr]'): flwr is missing",
        )
    if config.syft_flwr.encryption and importlib.util.find_spec("syft_crypto") is None:
        raise ConfigError(
            "syft_flwr.encryption",
            True,
            "the [syft-flwr] extra installed (it brings syft-crypto, which encrypted mode needs),"
            " or false where every owner runs with SYFT_FLWR_ENCRYPTION_ENABLED=false",
        )
    if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?", config.syft_flwr.server_url):
        raise ConfigError("syft_flwr.server_url", config.syft_flwr.server_url, "an http(s) URL of a host")


def _min_results(config: JobConfig) -> int:
    from fl_orchestrator.aggregation.registry import STRATEGIES, min_results

    if config.strategy.name not in STRATEGIES:
        return 1
    return min_results(config.strategy.name, dict(config.strategy.params))

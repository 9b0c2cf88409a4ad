"""A strategy-based syft-flwr project, read unchanged: what its ServerApp would run, as a job.

The project's ``pyproject.toml`` gives the parties (``[tool.syft_flwr]``), the
run config (``[tool.flwr.app.config]``) and the ServerApp (``[tool.flwr.app.components]``).
The rest comes from running the project's own code against a capturing
context, in this process (which must hold flwr and the project's
dependencies):

- a ``server_fn`` ServerApp (Flower's older API) is called, and its
  ``ServerAppComponents`` give the strategy and ``num_rounds``;
- a ``@app.main()`` ServerApp is called with a grid that sends nothing, and
  Flower's ``Strategy.start`` is intercepted: its arguments give the strategy,
  the initial arrays, ``num_rounds`` and the train config.

Only what maps onto a built-in strategy is translated. Everything else (a
callback, a custom subclass's additions, a loop of its own) is listed with
the line to write by hand, or refused with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Flower's strategy classes (both APIs) and the built-in strategy each one is.
_BUILT_IN = {
    "FedAvg": "fedavg",
    "FedProx": "fedprox",
    "FedAvgM": "fedavgm",
    "FedAdam": "fedadam",
    "FedYogi": "fedyogi",
    "FedAdagrad": "fedadagrad",
    "FedMedian": "fedmedian",
    "FedTrimmedAvg": "fedtrimmedavg",
    "Krum": "krum",
    "MultiKrum": "multikrum",
    "Bulyan": "bulyan",
}
# Per built-in strategy: its parameters, and where each is found on a Flower strategy object.
_PARAMS: dict[str, dict[str, tuple[str, ...]]] = {
    "fedavg": {},
    "fedprox": {"proximal_mu": ("proximal_mu",)},
    "fedavgm": {"server_learning_rate": ("server_learning_rate",), "server_momentum": ("server_momentum",)},
    "fedadam": {k: (k,) for k in ("eta", "eta_l", "beta_1", "beta_2", "tau")},
    "fedyogi": {k: (k,) for k in ("eta", "eta_l", "beta_1", "beta_2", "tau")},
    "fedadagrad": {k: (k,) for k in ("eta", "eta_l", "tau")},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": ("beta",)},
    "krum": {"num_malicious_nodes": ("num_malicious_nodes", "num_malicious_clients")},
    "multikrum": {
        "num_malicious_nodes": ("num_malicious_nodes", "num_malicious_clients"),
        "num_nodes_to_select": ("num_nodes_to_select", "num_clients_to_keep"),
    },
    "bulyan": {"num_malicious_nodes": ("num_malicious_nodes", "num_malicious_clients")},
}
# The round loop's settings: [job] key, and where it is found (new API first, then the older one).
_JOB_KEYS = {
    "fraction_train": ("fraction_train", "fraction_fit"),
    "fraction_evaluate": ("fraction_evaluate",),
    "min_train_nodes": ("min_train_nodes", "min_fit_clients"),
    "min_evaluate_nodes": ("min_evaluate_nodes", "min_evaluate_clients"),
    "min_available_nodes": ("min_available_nodes", "min_available_clients"),
}
# Callbacks a strategy may carry, and what to write instead.
_CALLBACKS = {
    "evaluate_fn": '[evaluate] global_evaluate = "module:function" (docs/HOOKS.md)',
    "on_fit_config_fn": '[job] configure_round = "module:function" (per-round train config)',
    "on_evaluate_config_fn": '[job] configure_round = "module:function" (per-round evaluate config)',
    "fit_metrics_aggregation_fn": '[job] metrics_aggregation = "module:function"',
    "evaluate_metrics_aggregation_fn": '[job] metrics_aggregation = "module:function"',
    "train_metrics_aggr_fn": '[job] metrics_aggregation = "module:function"',
    "evaluate_metrics_aggr_fn": '[job] metrics_aggregation = "module:function"',
}


class ImportRefused(Exception):
    """The project cannot be turned into a job file; the message says why and what to do."""


@dataclass
class Translation:
    """What a project's ServerApp runs, as job-file values, and what could not be translated."""

    project_name: str
    app_name: str
    aggregator: str
    datasites: list[str]
    run_config: dict[str, Any]
    strategy: str = "fedavg"
    # What the owners' ClientApp reads: [syft_flwr] content_format (flower_codec.CONTENT_FORMATS).
    content_format: str = "message"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    translated: list[tuple[str, str]] = field(default_factory=list)  # (what, how)
    by_hand: list[tuple[str, str]] = field(default_factory=list)  # (what, the line to write)


class _Captured(Exception):
    def __init__(self, strategy: Any, arguments: dict[str, Any]) -> None:
        super().__init__("captured")
        self.strategy = strategy
        self.arguments = arguments


class _CustomLoop(Exception):
    pass


class _SilentGrid:
    """A grid that sends nothing: a ServerApp that uses it directly runs a loop of its own."""

    def __getattr__(self, name: str) -> Any:
        def refuse(*args: object, **kwargs: object) -> Any:
            raise _CustomLoop(name)

        return refuse


@dataclass(frozen=True)
class Project:
    """What a bootstrapped project's pyproject.toml says: the parties, the run config, the ServerApp."""

    folder: Path
    name: str
    app_name: str
    aggregator: str
    datasites: list[str]
    run_config: dict[str, Any]
    server_app: str  # module:attribute
    client_app: str | None = None  # module:attribute, when the project names one


def read_pyproject(project: Path) -> Project:
    """The project's pyproject.toml; ImportRefused if it was never bootstrapped by syft-flwr."""
    try:
        meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ImportRefused(f"{project / 'pyproject.toml'}: {exc}") from None
    tool = meta.get("tool", {})
    syft = tool.get("syft_flwr")
    if not isinstance(syft, dict) or not {"app_name", "aggregator", "datasites"} <= set(syft):
        raise ImportRefused(
            f"{project / 'pyproject.toml'} has no [tool.syft_flwr] with app_name, aggregator and"
            " datasites: run syft_flwr.bootstrap on the project first"
        )
    app = tool.get("flwr", {}).get("app", {})
    component = app.get("components", {}).get("serverapp")
    if not isinstance(component, str) or ":" not in component:
        raise ImportRefused("[tool.flwr.app.components] serverapp = 'module:attribute' is missing")
    return Project(
        folder=project,
        name=str(meta.get("project", {}).get("name", project.name)),
        app_name=str(syft["app_name"]),
        aggregator=str(syft["aggregator"]),
        datasites=[str(d) for d in syft["datasites"]],
        run_config=dict(app.get("config", {})),
        server_app=component,
        client_app=_component(app, "clientapp"),
    )


def read_project(project: Path) -> Translation:
    """Translate a syft-flwr project folder; raise ImportRefused with the reason."""
    meta = read_pyproject(project)
    translation = Translation(
        project_name=meta.name,
        app_name=meta.app_name,
        aggregator=meta.aggregator,
        datasites=meta.datasites,
        run_config=meta.run_config,
    )
    _capture(load_server_app(meta), translation)
    _choose_content_format(meta, translation)
    return translation


def _component(app: Mapping[str, Any], name: str) -> str | None:
    value = app.get("components", {}).get(name)
    return value if isinstance(value, str) and ":" in value else None


def _choose_content_format(meta: Project, translation: Translation) -> None:
    """The records the owners' ClientApp reads: from the ClientApp itself, else from the ServerApp's kind.

    A ``ClientApp(client_fn=...)`` (a NumPyClient) reads Flower's legacy ``fitins.*``
    records; one with ``@app.train()`` handlers reads ``arrays``/``config``.
    """
    how = "from the ServerApp's kind"
    if meta.client_app is not None:
        try:
            client = _load(meta.folder, meta.client_app)
        except ImportRefused:
            client = None
        if getattr(client, "_call", None) is not None:
            translation.content_format, how = "legacy", f"{meta.client_app} is a ClientApp(client_fn=...)"
        elif getattr(client, "_registered_funcs", None):
            translation.content_format, how = "message", f"{meta.client_app} has @app handlers"
    translation.translated.append(
        ("the owners' ClientApp", f"[syft_flwr] content_format = {translation.content_format!r} ({how})")
    )


def load_server_app(meta: Project) -> Any:
    """Import the project's ServerApp object (ImportRefused if that fails)."""
    return _load(meta.folder, meta.server_app)


def flower_context(run_config: Mapping[str, Any], run_id: int = 0) -> Any:
    """The Context a ServerApp is called with."""
    from flwr.app import Context, RecordDict

    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))


def _load(project: Path, component: str) -> Any:
    module_name, _, attribute = component.partition(":")
    with _on_path(project):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ImportRefused(
                f"importing {module_name} failed ({type(exc).__name__}: {exc}): run this command in the"
                " project's environment (for example `uv run fl-orchestrator init ...`)"
            ) from None
    server_app = getattr(module, attribute, None)
    if server_app is None:
        raise ImportRefused(f"{module_name} has no {attribute!r}")
    return server_app


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _capture(server_app: Any, translation: Translation) -> None:
    context = flower_context(translation.run_config)
    main = getattr(server_app, "_main", None)
    server_fn = getattr(server_app, "_server_fn", None)
    if main is not None:
        _capture_main(main, context, translation)
    elif server_fn is not None:
        translation.content_format = "legacy"  # a server_fn's strategy sends fitins/evaluateins
        components = server_fn(context)
        num_rounds = getattr(getattr(components, "config", None), "num_rounds", None)
        _translate(components.strategy, num_rounds, translation)
        initial = getattr(components.strategy, "initial_parameters", None)
        if initial is not None:
            from flwr.common import parameters_to_ndarrays

            arrays = parameters_to_ndarrays(initial)
            translation.arrays = {f"layer_{i}": np.asarray(a) for i, a in enumerate(arrays)}
        on_fit = getattr(components.strategy, "on_fit_config_fn", None)
        if callable(on_fit):
            first, second = on_fit(1), on_fit(2)
            translation.train_config = {k: v for k, v in dict(first).items() if k != "server-round"}
            if {k: v for k, v in dict(second).items() if k != "server-round"} == translation.train_config:
                translation.translated.append(("on_fit_config_fn", "[job] train_config (same every round)"))
            else:
                translation.by_hand.append(
                    ("on_fit_config_fn (varies by round)", _CALLBACKS["on_fit_config_fn"])
                )
    else:
        raise ImportRefused("the ServerApp has neither server_fn nor a @app.main() function")
    if not translation.arrays:
        raise ImportRefused(
            "the strategy has no initial parameters: pass initial_parameters (or initial_arrays to"
            " strategy.start), or write [model] by hand"
        )


def _capture_main(main: Any, context: Any, translation: Translation) -> None:
    from flwr.serverapp.strategy import Strategy

    original = Strategy.start

    def intercept(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = ("grid", "initial_arrays", "num_rounds", "timeout", "train_config", "evaluate_config")
        raise _Captured(self, {**dict(zip(names, args, strict=False)), **kwargs})

    Strategy.start = intercept
    try:
        main(_SilentGrid(), context)
    except _Captured as captured:
        arguments = captured.arguments
        _translate(captured.strategy, arguments.get("num_rounds", 3), translation)
        initial = arguments.get("initial_arrays")
        if initial is not None:
            translation.arrays = {str(k): np.asarray(v.numpy()) for k, v in initial.items()}
        if arguments.get("train_config") is not None:
            translation.train_config = dict(arguments["train_config"])
            translation.translated.append(("train_config", "[job] train_config"))
        if arguments.get("timeout") is not None:
            translation.job["round_timeout_seconds"] = float(arguments["timeout"])
        if arguments.get("evaluate_fn") is not None:
            translation.by_hand.append(("strategy.start(evaluate_fn=...)", _CALLBACKS["evaluate_fn"]))
        return
    except _CustomLoop as loop:
        raise ImportRefused(
            f"main(grid, context) calls grid.{loop.args[0]}() itself: it runs a loop of its own,"
            " which no job file can hold"
        ) from None
    finally:
        Strategy.start = original
    raise ImportRefused("main(grid, context) returned without calling strategy.start()")


def _translate(strategy: Any, num_rounds: Any, translation: Translation) -> None:
    base = next((c for c in type(strategy).__mro__ if _is_flower_strategy(c)), None)
    if base is None:
        raise ImportRefused(
            f"{type(strategy).__name__} is not one of Flower's strategies: built-in ones are"
            f" {', '.join(_BUILT_IN)}"
        )
    name = _BUILT_IN[base.__name__]
    if name == "krum" and _first(strategy, ("num_clients_to_keep",)) not in (None, 0):
        name = "multikrum"  # Flower's older Krum averages num_clients_to_keep: MultiKrum's rule
    translation.strategy = name
    for param, places in _PARAMS[name].items():
        value = _first(strategy, places)
        if value is not None:
            translation.strategy_params[param] = value
    for key, places in _JOB_KEYS.items():
        value = _first(strategy, places)
        if value is not None:
            translation.job[key] = value
    if not translation.job.get("min_evaluate_nodes"):
        translation.job.pop("min_evaluate_nodes", None)  # Flower sets 0 when evaluation is off
    if num_rounds is not None:
        translation.job["num_rounds"] = int(num_rounds)
    if translation.job:
        keys = ", ".join(f"{k} = {v!r}" for k, v in sorted(translation.job.items()))
        translation.translated.append(("the strategy's rounds and node counts", f"[job] {keys}"))
    own = type(strategy)
    how = f"[strategy] name = {name!r}"
    if own is not base:
        added = sorted(k for k in vars(own) if not k.startswith("__"))
        translation.translated.append((own.__name__, f"{how} (its base, Flower's {base.__name__})"))
        translation.by_hand.append(
            (
                f"what {own.__name__} adds ({', '.join(added) or 'nothing'})",
                "not translated: see docs/SYFT_FLWR.md",
            )
        )
    else:
        translation.translated.append((base.__name__, how))
    for callback, line in _CALLBACKS.items():
        if callback == "on_fit_config_fn":
            continue  # handled with the train config
        value = getattr(strategy, callback, None)
        if callable(value) and not _is_flower_default(value):
            translation.by_hand.append((f"{callback}={getattr(value, '__name__', 'a callable')}", line))


def _is_flower_strategy(cls: type) -> bool:
    module = getattr(cls, "__module__", "")
    return cls.__name__ in _BUILT_IN and module.startswith(
        ("flwr.server.strategy", "flwr.serverapp.strategy")
    )


def _is_flower_default(function: Any) -> bool:
    return str(getattr(function, "__module__", "")).startswith("flwr.")


def _first(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None and not callable(value):
            return value.item() if isinstance(value, np.generic) else value
    return None

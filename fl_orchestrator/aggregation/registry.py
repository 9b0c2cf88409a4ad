"""Every built-in strategy, its parameters (Flower's names and defaults) and how to build it.

The ``[strategy]`` table of job.toml names a strategy and gives its parameters
as flat keys. Each parameter dataclass field carries ``spec(...)`` metadata, so
the config loader checks ranges generically; ``check_params`` adds the checks
that span fields. A name of the form ``"package.module:Class"`` loads a custom
strategy class instead.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_orchestrator.aggregation.base import Strategy
from fl_orchestrator.aggregation.dp import DifferentialPrivacyFixedClipping
from fl_orchestrator.aggregation.fedavg import FedAvg, FedProx
from fl_orchestrator.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fl_orchestrator.aggregation.krum import Bulyan, Krum, MultiKrum
from fl_orchestrator.aggregation.robust import FedMedian, FedTrimmedAvg
from fl_orchestrator.core.fields import ConfigScalar, spec

_MALICIOUS = spec("f, the number of Byzantine results to tolerate", minimum=0)


# Every built-in but the DP wrapper itself, which cannot wrap itself.
WRAPPABLE = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)


@dataclass(frozen=True)
class FedAvgParams:
    """FedAvg has no server-side parameters."""


@dataclass(frozen=True)
class FedProxParams:
    """FedProx: FedAvg on the server; mu goes to the clients."""

    proximal_mu: float = field(
        default=0.0, metadata=spec("weight of the proximal term, sent as 'proximal-mu'", minimum=0)
    )


@dataclass(frozen=True)
class FedAvgMParams:
    """FedAvg with server-side momentum."""

    server_learning_rate: float = field(
        default=1.0, metadata=spec("server learning rate η_s", minimum=0, exclusive_minimum=True)
    )
    server_momentum: float = field(default=0.0, metadata=spec("server momentum μ", minimum=0, maximum=1))


def _eta(default: float) -> float:
    return field(default=default, metadata=spec("server learning rate η", minimum=0, exclusive_minimum=True))


def _eta_l(default: float) -> float:
    return field(default=default, metadata=spec("client learning rate (for parity; unused)", minimum=0))


def _beta(default: float, what: str) -> float:
    return field(default=default, metadata=spec(f"{what} decay, below 1", minimum=0, maximum=1))


def _tau() -> float:
    return field(default=1e-3, metadata=spec("adaptivity τ added to √v", minimum=0, exclusive_minimum=True))


@dataclass(frozen=True)
class FedAdamParams:
    """FedAdam, Flower's defaults."""

    eta: float = _eta(0.1)
    eta_l: float = _eta_l(0.1)
    beta_1: float = _beta(0.9, "first-moment")
    beta_2: float = _beta(0.99, "second-moment")
    tau: float = _tau()


@dataclass(frozen=True)
class FedYogiParams:
    """FedYogi, Flower's defaults."""

    eta: float = _eta(0.01)
    eta_l: float = _eta_l(0.0316)
    beta_1: float = _beta(0.9, "first-moment")
    beta_2: float = _beta(0.99, "second-moment")
    tau: float = _tau()


@dataclass(frozen=True)
class FedAdagradParams:
    """FedAdagrad, Flower's defaults."""

    eta: float = _eta(0.1)
    eta_l: float = _eta_l(0.1)
    tau: float = _tau()


@dataclass(frozen=True)
class FedMedianParams:
    """FedMedian has no parameters."""


@dataclass(frozen=True)
class FedTrimmedAvgParams:
    """Trimmed mean."""

    beta: float = field(
        default=0.2, metadata=spec("share cut from each end, below 0.5", minimum=0, maximum=0.5)
    )


@dataclass(frozen=True)
class KrumParams:
    """Krum."""

    num_malicious_nodes: int = field(default=0, metadata=_MALICIOUS)


@dataclass(frozen=True)
class MultiKrumParams:
    """Multi-Krum."""

    num_malicious_nodes: int = field(default=0, metadata=_MALICIOUS)
    num_nodes_to_select: int = field(default=1, metadata=spec("m, the results averaged", minimum=1))


@dataclass(frozen=True)
class BulyanParams:
    """Bulyan: needs at least 4f + 3 results per round."""

    num_malicious_nodes: int = field(default=0, metadata=_MALICIOUS)


@dataclass(frozen=True)
class DPFixedClippingParams:
    """Server-side fixed clipping; no defaults for the privacy knobs, as in Flower."""

    clipping_norm: float = field(
        metadata=spec("C, the L2 bound of each update", minimum=0, exclusive_minimum=True)
    )
    noise_multiplier: float = field(metadata=spec("z; the noise std is z·C/m", minimum=0))
    num_sampled_clients: int = field(
        default=0, metadata=spec("m in the noise std; 0 = the number of results aggregated", minimum=0)
    )
    strategy: str = field(default="fedavg", metadata=spec("the wrapped built-in strategy", choices=WRAPPABLE))
    wrapped: dict[str, ConfigScalar] = field(
        default_factory=dict, metadata=spec("parameters of the wrapped strategy")
    )


@dataclass(frozen=True)
class StrategyInfo:
    """A built-in strategy: its name, parameter dataclass and factory (params, seed) -> Strategy."""

    name: str
    params_type: type
    factory: Callable[[Any, int], Strategy]


def _dp(params: DPFixedClippingParams, seed: int) -> Strategy:
    return DifferentialPrivacyFixedClipping(
        build_strategy(params.strategy, dict(params.wrapped), seed=seed),
        clipping_norm=params.clipping_norm,
        noise_multiplier=params.noise_multiplier,
        num_sampled_clients=params.num_sampled_clients,
        seed=seed,
    )


def _simple(name: str, params_type: type, cls: Callable[..., Strategy]) -> StrategyInfo:
    """A strategy whose constructor takes exactly its parameter fields as keywords."""
    return StrategyInfo(name, params_type, lambda params, seed: cls(**_as_dict(params)))


STRATEGIES: dict[str, StrategyInfo] = {
    info.name: info
    for info in (
        _simple("fedavg", FedAvgParams, FedAvg),
        _simple("fedprox", FedProxParams, FedProx),
        _simple("fedavgm", FedAvgMParams, FedAvgM),
        _simple("fedadam", FedAdamParams, FedAdam),
        _simple("fedyogi", FedYogiParams, FedYogi),
        _simple("fedadagrad", FedAdagradParams, FedAdagrad),
        _simple("fedmedian", FedMedianParams, FedMedian),
        _simple("fedtrimmedavg", FedTrimmedAvgParams, FedTrimmedAvg),
        _simple("krum", KrumParams, Krum),
        _simple("multikrum", MultiKrumParams, MultiKrum),
        _simple("bulyan", BulyanParams, Bulyan),
        StrategyInfo("dp_fixed_clipping", DPFixedClippingParams, _dp),
    )
}
assert set(WRAPPABLE) == set(STRATEGIES) - {"dp_fixed_clipping"}

# Flower's class names whose lower-case spelling is not the built-in name.
_FLOWER_ALIASES = {"differentialprivacyserversidefixedclipping": "dp_fixed_clipping"}


def canonical_strategy_name(name: str) -> str:
    """The built-in name for a strategy name as written: ours or Flower's class name, any case.

    ``FedAvg``, ``fedavg`` and ``FEDAVG`` are one strategy, as are
    ``DifferentialPrivacyServerSideFixedClipping`` and ``dp_fixed_clipping``.
    A name that is neither is returned as written, for the caller to refuse.
    """
    folded = name.lower()
    folded = _FLOWER_ALIASES.get(folded, folded)
    return folded if folded in STRATEGIES else name


_REQUIRED_METHODS = (
    "begin_round",
    "fold",
    "aggregate_all",
    "finish",
    "round_config",
    "state_dict",
    "load_state_dict",
)


def _as_dict(params: object) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}  # type: ignore[arg-type]


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(name: str, params: object | None) -> object:
    """Defaults for None, the dataclass for a mapping; TypeError names the bad keys."""
    params_type = STRATEGIES[name].params_type
    if params is None:
        params = {}
    if isinstance(params, params_type):
        return params
    if not isinstance(params, Mapping):
        raise TypeError(f"parameters of {name} must be a mapping or {params_type.__name__}")
    known = {f.name for f in dataclasses.fields(params_type)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(f"unknown parameter(s) of strategy {name}: {', '.join(unknown)}")
    missing = [f.name for f in dataclasses.fields(params_type) if _required(f) and f.name not in params]
    if missing:
        raise TypeError(f"strategy {name} needs parameter(s): {', '.join(missing)}")
    return params_type(**params)


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


def _check_fields(name: str, params: object) -> str | None:
    """The per-field type and spec checks, for callers that bypass the config loader (and nested tables)."""
    for f in dataclasses.fields(params):  # type: ignore[arg-type]
        value = getattr(params, f.name)
        expected = _SCALAR_TYPES.get(str(f.type))
        if expected is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            return f"{name}.{f.name} = {value!r} must be of type {f.type}"
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            return f"{name}.{f.name} = {value!r} must be one of {', '.join(choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        meta = f.metadata
        low, high = meta.get("minimum"), meta.get("maximum")
        if low is not None and (value < low or (meta.get("exclusive_minimum") and value == low)):
            relation = ">" if meta.get("exclusive_minimum") else ">="
            return f"{name}.{f.name} = {value!r} must be {relation} {low}"
        if high is not None and value > high:
            return f"{name}.{f.name} = {value!r} must be <= {high}"
    return None


def _check_cross(name: str, params: object) -> str | None:
    """The checks that the per-field ranges cannot express."""
    for beta in ("beta_1", "beta_2"):
        if getattr(params, beta, 0.0) >= 1.0:
            return f"{name}.{beta} must be below 1 (the moments would never decay)"
    if name == "fedtrimmedavg" and getattr(params, "beta", 0.0) >= 0.5:
        return "fedtrimmedavg.beta must be below 0.5: cutting half from each end leaves nothing"
    if name == "multikrum" and getattr(params, "num_nodes_to_select", 1) < 1:
        return "multikrum.num_nodes_to_select must be at least 1"
    if isinstance(params, DPFixedClippingParams):
        if params.strategy not in WRAPPABLE:
            allowed = ", ".join(WRAPPABLE)
            return f"dp_fixed_clipping.strategy must be one of {allowed}, not {params.strategy!r}"
        try:
            inner = _coerce(params.strategy, dict(params.wrapped))
        except TypeError as exc:
            return f"dp_fixed_clipping.wrapped: {exc}"
        return _check_fields(params.strategy, inner) or _check_cross(params.strategy, inner)
    return None


def check_params(name: str, params: object | None) -> str | None:
    """Why these parameters cannot build strategy ``name``, or None when they can."""
    if ":" in name:
        try:
            load_custom(name)
        except (ImportError, AttributeError, ValueError) as exc:
            return f"cannot load custom strategy {name!r}: {exc}"
        return None
    if name not in STRATEGIES:
        return f"unknown strategy {name!r}; built-in ones are {', '.join(STRATEGIES)}"
    try:
        coerced = _coerce(name, params)
    except TypeError as exc:
        return str(exc)
    return _check_fields(name, coerced) or _check_cross(name, coerced)


def min_results(name: str, params: object | None = None) -> int:
    """The fewest results a round needs for ``name`` (Bulyan: 4f + 3; others 1)."""
    if name == "bulyan":
        coerced = _coerce(name, params)
        return 4 * int(getattr(coerced, "num_malicious_nodes", 0)) + 3
    if name == "dp_fixed_clipping":
        coerced = _coerce(name, params)
        assert isinstance(coerced, DPFixedClippingParams)
        return min_results(coerced.strategy, dict(coerced.wrapped))
    return 1


def load_custom(path: str) -> type:
    """The class named by 'package.module:Class'."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError("expected 'package.module:Class'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not isinstance(target, type):
        raise ValueError(f"{path} is not a class")
    return target


def build_strategy(name: str, params: object | None = None, *, seed: int = 0) -> Strategy:
    """A ready strategy: built-in by name, or a custom 'package.module:Class'.

    ``params`` is None (defaults), the strategy's parameter dataclass or a
    mapping of its fields. A custom class is called as ``Class()`` or
    ``Class(**params)``. ``seed`` feeds any randomness (the DP noise).
    Raises ValueError for bad parameters and TypeError for a custom class
    that lacks part of the Strategy interface.
    """
    if ":" in name:
        try:
            cls = load_custom(name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load custom strategy {name!r}: {exc}") from exc
        if params is not None and not isinstance(params, Mapping):
            raise TypeError("parameters of a custom strategy must be a mapping")
        strategy = cls(**dict(params or {}))
        missing = [attr for attr in ("name", "streaming", *_REQUIRED_METHODS) if not hasattr(strategy, attr)]
        if missing:
            raise TypeError(f"{name} is not a strategy: it lacks {', '.join(missing)}")
        built: Strategy = strategy
        return built
    error = check_params(name, params)
    if error is not None:
        raise ValueError(error)
    return STRATEGIES[name].factory(_coerce(name, params), seed)

"""The model and the data owners' behaviour, and the FedAvg they must produce, computed by hand.

The initial model comes from the template's ``flt_app/model.py`` (numpy only); a
``DataOwnerSpec`` says what one DO's ClientApp does (the ``FLT_*`` variables);
``expected_models`` is sample-weighted FedAvg over those specs, round by round, in numpy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from support.jobs import site_emails
from syftflwr.environment import TEMPLATE_DIR

ARRAY_NAMES = ("w0", "w1")


def load_template_model() -> Any:
    """The template's flt_app/model.py (numpy only), loaded by path: the initial model's source."""
    spec = importlib.util.spec_from_file_location("_flt_app_model", TEMPLATE_DIR / "flt_app" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_model(extra_params: int = 0) -> dict[str, np.ndarray]:
    """The fixed initial model, by name: w0 (4, 3) and w1 (3,) float32, and w2 (extra_params,) if > 0.

    w2 only makes the messages bigger (for the comparison's --params); it is deterministic too.
    """
    arrays = load_template_model().default_arrays()
    model = dict(zip(ARRAY_NAMES, arrays, strict=True))
    if extra_params > 0:
        model["w2"] = ((np.arange(extra_params) % 7).astype(np.float32) - np.float32(3.0)) / np.float32(4.0)
    return model


@dataclass(frozen=True)
class DataOwnerSpec:
    """What one DO's ClientApp does: arrays + delta, weight num_examples, raise in fail_rounds."""

    email: str
    delta: float
    num_examples: int
    fail_rounds: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        """The FLT_* variables that make the template's ClientApp behave so."""
        return {
            "FLT_DELTA": repr(self.delta),
            "FLT_NUM_EXAMPLES": str(self.num_examples),
            "FLT_FAIL_ROUNDS": ",".join(str(r) for r in self.fail_rounds),
            "FLT_NAME": self.email,
        }


def default_specs(count: int = 3, *, failing: int | None = 1, fail_round: int = 2) -> list[DataOwnerSpec]:
    """ds{i}@example.org with distinct deltas and weights; DO ``failing`` raises in ``fail_round``."""
    deltas = (0.25, -0.5, 1.0, 0.125, -2.0)
    return [
        DataOwnerSpec(
            email,
            deltas[i % len(deltas)],
            10 * (i + 1),
            (fail_round,) if failing == i else (),
        )
        for i, email in enumerate(site_emails(count))
    ]


def expected_models(
    initial: Mapping[str, np.ndarray], specs: Sequence[DataOwnerSpec], num_rounds: int
) -> list[dict[str, np.ndarray]]:
    """Round 0..num_rounds global models of sample-weighted FedAvg, computed by hand.

    In round r every DO that does not fail in r returns (model + delta) with weight
    num_examples; the average is taken in float64 and stored in the arrays' dtype.
    """
    model = {k: np.array(v) for k, v in initial.items()}
    out = [model]
    for rnd in range(1, num_rounds + 1):
        counted = [s for s in specs if rnd not in s.fail_rounds]
        total = sum(s.num_examples for s in counted)
        nxt = {}
        for name, value in model.items():
            acc = np.zeros(value.shape, dtype=np.float64)
            for spec in counted:
                update = (value + np.asarray(spec.delta, dtype=value.dtype)).astype(value.dtype)
                acc += update.astype(np.float64) * spec.num_examples
            nxt[name] = (acc / total).astype(value.dtype)
        model = nxt
        out.append(model)
    return out


def max_relative_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    """The largest |got - want| / max(1, |want|max) over all arrays (inf if names or shapes differ)."""
    if set(got) != set(want):
        return float("inf")
    worst = 0.0
    for name, value in want.items():
        if np.shape(got[name]) != np.shape(value):
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(value))))
        diff = np.abs(np.asarray(got[name], dtype=np.float64) - np.asarray(value, dtype=np.float64))
        worst = max(worst, float(np.max(diff)) / scale)
    return worst

"""The demo's model and data: softmax regression on scikit-learn's bundled digits.

The data set ships inside scikit-learn (8x8 images, 1,797 samples), so nothing
is downloaded. A fixed 25% hold-out is the central validation set; the rest is
split across datasites with a Dirichlet(alpha) label skew, so partitions are
non-IID. Each datasite process picks its partition from its context's
node_config, which `fl-orchestrator simulate` sets.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

# Imported here, not lazily: the runner imports this module at start-up, so the
# first round does not pay scikit-learn's import time against the round timeout.
from sklearn.datasets import load_digits

NUM_FEATURES = 64
NUM_CLASSES = 10
SPLIT_SEED = 2024
HOLDOUT_FRACTION = 0.25


@lru_cache(maxsize=1)
def _dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    cut = int(len(labels) * HOLDOUT_FRACTION)
    test, train = order[:cut], order[cut:]
    return features[train], labels[train], features[test], labels[test]


def partition(index: int, count: int, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Datasite `index` of `count`: a label-skewed (non-IID) share of the training data."""
    features, labels, _, _ = _dataset()
    rng = np.random.default_rng(SPLIT_SEED + 1)
    owners = np.empty(len(labels), dtype=np.int64)
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(count, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for owner, chunk in enumerate(np.split(members, cuts)):
            owners[chunk] = owner
    mine = np.flatnonzero(owners == index)
    return features[mine], labels[mine]


def _logits(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    result: np.ndarray = features @ arrays["weight"] + arrays["bias"]
    return result


def accuracy(arrays: dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray) -> float:
    """Share of correct predictions."""
    return float(np.mean(np.argmax(_logits(arrays, features), axis=1) == labels))


def sgd(
    arrays: dict[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Mini-batch SGD on softmax cross-entropy; returns new arrays and the last epoch's loss."""
    weight = arrays["weight"].astype(np.float64)
    bias = arrays["bias"].astype(np.float64)
    onehot = np.eye(NUM_CLASSES)[labels]
    rng = np.random.default_rng(seed)
    loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        losses = []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = features[batch] @ weight + bias
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            losses.append(-np.mean(np.log(probs[np.arange(len(batch)), labels[batch]] + 1e-12)))
            grad = (probs - onehot[batch]) / len(batch)
            weight -= learning_rate * (features[batch].T @ grad)
            bias -= learning_rate * grad.sum(axis=0)
        loss = float(np.mean(losses))
    return {"weight": weight.astype(np.float32), "bias": bias.astype(np.float32)}, loss


def train(
    arrays: dict[str, np.ndarray], config: dict[str, Any], context: Any = None
) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """The data owner's train function, as the datasite runner calls it.

    Its share of the data is ``partition-id`` of ``num-partitions`` in the
    context's node_config, as `fl-orchestrator simulate` (and so the demo) sets it.
    """
    node = dict(getattr(context, "node_config", None) or {})
    index = int(node.get("partition-id", 0))
    count = int(node.get("num-partitions", 1))
    rnd = int(config["server-round"])
    features, labels = partition(index, count)
    new_arrays, loss = sgd(
        arrays,
        features,
        labels,
        epochs=int(config["local_epochs"]),
        learning_rate=float(config["learning_rate"]),
        batch_size=int(config["batch_size"]),
        seed=rnd * 1000 + index,
    )
    return (
        new_arrays,
        len(labels),
        {"train_loss": loss, "train_accuracy": accuracy(new_arrays, features, labels)},
    )


def evaluate(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Central validation on the held-out quarter of the data."""
    _, _, features, labels = _dataset()
    return {"accuracy": accuracy(arrays, features, labels), "num_examples": float(len(labels))}

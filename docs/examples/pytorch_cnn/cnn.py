"""A tiny PyTorch CNN as a data owner's code: train, evaluate and, for simulate, partition.

The data are scikit-learn's bundled digits (8x8 grey images, 1,797 of them, shipped inside
the package): nothing is downloaded. Each datasite's shard is a slice of one seeded shuffle of
them, named by ``shard-start`` and ``shard-stop`` in its ``context.node_config`` (all of the
data if unset); its first 80% is trained on and the rest is held out for ``evaluate``.

The model travels as named numpy arrays: the CNN's ``state_dict`` names and shapes, declared in
``job.toml``. ``train`` loads them into the CNN, trains one local epoch with SGD and returns the
new state_dict in the dtype it was given. Torch is needed on the datasites only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional

SPLIT_SEED = 2024
HOLDOUT_FRACTION = 0.2


class TinyCNN(nn.Module):
    """conv 1->4 3x3 (same padding), ReLU, 2x2 max-pool, linear 64->10: 690 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)  # 1x8x8 -> 4x8x8
        self.pool = nn.MaxPool2d(2)  # -> 4x4x4
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(images))), 1))


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 1, 8, 8) scaled to [0, 1] and their labels, in one seeded shuffle."""
    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    images = (digits.images[order] / 16.0).astype(np.float32)[:, None, :, :]
    return torch.from_numpy(images), torch.from_numpy(digits.target[order].astype(np.int64))


def partition(partition_id: int, num_partitions: int) -> dict[str, Any]:
    """`fl-orchestrator simulate --partition`: datasite ``partition_id``'s shard, as node_config."""
    bounds = np.linspace(0, len(_digits()[1]), num_partitions + 1).astype(int)
    return {"shard-start": int(bounds[partition_id]), "shard-stop": int(bounds[partition_id + 1])}


def _shard(context: Any, part: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Where this datasite's shard starts, and its training or held-out images and labels."""
    node = dict(getattr(context, "node_config", None) or {})
    images, labels = _digits()
    start, stop = int(node.get("shard-start", 0)), int(node.get("shard-stop", len(labels)))
    cut = start + int((stop - start) * (1 - HOLDOUT_FRACTION))
    rows = slice(start, cut) if part == "train" else slice(cut, stop)
    return start, images[rows], labels[rows]


def _model(arrays: dict[str, np.ndarray]) -> TinyCNN:
    """The CNN holding the job's arrays; a name or shape that differs raises, naming it."""
    torch.set_num_threads(1)  # one datasite, one core: and the same sums in the same order every run
    model = TinyCNN()
    state = {name: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for name, a in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model


def train(
    arrays: dict[str, np.ndarray], config: dict[str, Any], context: Any = None
) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """One local epoch of mini-batch SGD on this datasite's shard; the epoch's loss and accuracy."""
    start, images, labels = _shard(context, "train")
    model = _model(arrays)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.1)))
    batch_size = int(config.get("batch_size", 8))
    # The batch order is seeded by round and shard: the same job gives the same models every run.
    seed = int(config.get("server-round", 0)) * 10_000 + start
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    total_loss, correct = 0.0, 0
    model.train()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad()
        logits = model(images[batch])
        loss = functional.cross_entropy(logits, labels[batch])
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        correct += int((logits.argmax(dim=1) == labels[batch]).sum())
    new_arrays = {
        name: tensor.detach().numpy().astype(arrays[name].dtype)
        for name, tensor in model.state_dict().items()
    }
    count = len(labels)
    return new_arrays, count, {"loss": total_loss / count, "accuracy": correct / count}


def evaluate(
    arrays: dict[str, np.ndarray], config: dict[str, Any], context: Any = None
) -> tuple[int, dict[str, float]]:
    """The model's loss and accuracy on this datasite's held-out 20%."""
    _, images, labels = _shard(context, "holdout")
    model = _model(arrays)
    model.eval()
    with torch.no_grad():
        logits = model(images)
        loss = float(functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return len(labels), {"loss": loss, "accuracy": accuracy}

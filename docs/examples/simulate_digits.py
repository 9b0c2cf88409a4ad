"""A partition function for `fl-orchestrator simulate`: non-IID shares of a data set shipped locally.

The digits data set ships inside scikit-learn (the ``[demo]`` extra): nothing is downloaded.
Each simulated datasite gets a label-skewed share, named in its ``context.node_config``:

    fl-orchestrator simulate --config config/demo.toml --datasites 8 \\
        --train fl_orchestrator.demo.digits:train --partition simulate_digits:partition

(with this folder on PYTHONPATH, or the command run from it). The demo's train function reads
``partition-id`` and ``num-partitions`` from its context and trains on that share; this
function adds the share's size and its label mix, so each datasite's log says what it holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_orchestrator.demo.digits import partition as digits_share


def partition(partition_id: int, num_partitions: int) -> dict[str, Any]:
    """node_config settings for one simulated datasite: which share, how big, which labels."""
    _, labels = digits_share(partition_id, num_partitions)
    counts = np.bincount(labels, minlength=10)
    return {
        "share-rows": int(labels.size),
        "share-labels": ",".join(str(label) for label in np.flatnonzero(counts)),
    }

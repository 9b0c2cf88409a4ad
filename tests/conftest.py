"""Shared fixtures: the test helpers' folder is importable by datasite subprocesses too."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# tests/syftflwr/ holds the syft-flwr harness, a Flower app and tests that import flwr: those
# run only inside the syft-flwr environment (tests/test_syft_flwr.py starts them there).
collect_ignore = ["syftflwr"]

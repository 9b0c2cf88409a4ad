"""Loading user code named by import strings ("package.module:function")."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class HookError(Exception):
    """An import string that does not name a callable."""


def use_python_path(folders: Iterable[Path]) -> None:
    """Put the job's ``[job] python_path`` folders first on the import path (once each, in order)."""
    for folder in reversed(list(folders)):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def load_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """Import 'package.module:attribute' and check that it is callable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise HookError(f"{what} = {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HookError(f"{what} = {spec!r}: cannot import {module_name}: {exc}") from exc
    target: object = getattr(module, attribute, None)
    if not callable(target):
        raise HookError(f"{what} = {spec!r}: {module_name} has no callable {attribute!r}")
    return target

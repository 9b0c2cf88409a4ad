"""Constraints on configuration fields, shared by the job config and the strategies' parameters.

Pure metadata: each field says what it holds and what values are allowed;
the config loader checks a value against it and names the key, the value
and what was expected when it does not fit.
"""

from __future__ import annotations

from typing import Any

# Values a train-config table may carry to clients; lists must be homogeneous.
ConfigScalar = int | float | str | bool | bytes
ConfigValue = ConfigScalar | list[int] | list[float] | list[str] | list[bool] | list[bytes]


def spec(
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    choices: tuple[str, ...] | None = None,
    email: bool = False,
    import_string: bool = False,
) -> dict[str, Any]:
    """Build the metadata the loader checks a field against."""
    return {
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "choices": choices,
        "email": email,
        "import_string": import_string,
    }

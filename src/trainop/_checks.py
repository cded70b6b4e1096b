"""Argument checks shared by the public functions."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_count(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Raises a ValueError naming `name` unless `value` is an integer >= `minimum` (or None).

    NumPy integers count; booleans do not.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(
            f"`{name}` must be {expected}{' or None' if allow_none else ''}. "
            f"Received: {name}={value!r}"
        )


def is_number(value: Any) -> bool:
    """Whether `value` is a real Python or NumPy number (booleans are not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))

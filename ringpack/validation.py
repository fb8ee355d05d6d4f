"""Argument checks shared by every public entry point: each returns the clean value or raises a ValueError that
names the argument, what it got and what is allowed.

Python coerces quietly (``bool("False")`` is True, ``int(2.7)`` is 2, a bool is an int); a typo handed to a
training job must fail at the call, not turn into another mask or another length.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (anything with ``__index__`` but a bool), within ``[minimum, maximum]``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be an integer {' and '.join(x for x in (low, high) if x)}, got {number}")
    return number


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool (numpy's included); a string such as ``"False"`` is refused, not read as True."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")


def real(name: str, value, *, minimum: float | None = None, positive: bool = False,
         maximum: float | None = None) -> float:
    """``value`` as a finite ``float`` (an int or float, not a bool or a string), ``>= minimum`` or ``> 0``, and
    ``<= maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and type(value).__name__ not in (
            "float64", "float32", "float16"):
        raise ValueError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be > 0, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {number:g}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {number:g}")
    return number


def integers(name: str, values, *, minimum: int | None = None, maximum: int | None = None) -> list[int]:
    """``values`` (a sequence, or a 1-D tensor or array) as a list of ints, each checked by :func:`integer`, so a
    float, a bool or a string among them is refused rather than truncated or read as 0 or 1."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of integers, got {type(values).__name__}")
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    if not isinstance(items, list):
        raise ValueError(f"{name} must be a sequence of integers, got a single value {items!r}")
    return [integer(f"{name}[{i}]", x, minimum=minimum, maximum=maximum) for i, x in enumerate(items)]

"""Argument checks shared by the package's constructors and functions.

Each raises ``ValueError`` naming the argument, in one style: ``"<name> must be ..., got <value>"``
(callers prefix the class name where that helps). Booleans are not accepted as numbers: a ``True``
batch size or learning rate is a mistake, not a 1.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from numbers import Integral, Real


def is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_positive(name: str, value: int, minimum: int | None = 1) -> None:
    """``value`` is an integer (not a bool), ``>= minimum`` unless ``minimum`` is None."""
    if not is_integer(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")


def check_optional_positive(name: str, value: int | None, minimum: int = 1) -> None:
    """As :func:`check_positive`, with ``None`` allowed."""
    if value is not None and (not is_integer(value) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def check_number(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` is a finite real number (not a bool, NaN or inf) within the given bounds."""
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:  # NaN and inf lie in no interval
            raise ValueError(f"{name} must lie{_interval(low, high, low_open, high_open)}, got {value!r}")
        raise ValueError(f"{name} must be a finite number{_interval(low, high, low_open, high_open)}, got {value!r}")


def check_noise(noise_std: float) -> None:
    check_number("noise_std", noise_std, low=0.0)


def check_choice(name: str, value: object, choices: Collection) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_flag(name: str, value: object) -> None:
    """``value`` is ``True`` or ``False`` (a string such as ``"false"`` would count as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def index_list(name: str, value: int | Sequence[int]) -> list[int]:
    """A list of integer indices from one integer or a sequence of them (no strings, floats or bools)."""
    values = [value] if is_integer(value) else value
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(map(is_integer, values)):
        raise ValueError(f"{name} must be an integer or a sequence of integers, got {value!r}")
    return [int(v) for v in values]

"""Argument checks shared by every public class, so that a wrong value fails in ``__init__`` with its name.

Each check raises :class:`ValueError` with a message that starts with the argument's name, says what is valid,
and repeats the value given: ``r must be an int >= 1, got 1.5``. Booleans are not numbers here (``True`` for
``r`` is a mistake, not 1), NaN and infinity are refused unless a check says otherwise, and a string of names
(``"query"``) is accepted wherever a list of names is. Written by hand: torch.optim checks ranges but lets NaN
and strings through to the first step, and no library ships a small checker of this kind.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_names", "check_number", "check_str"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    lo = ("(" if low_open or low == -math.inf else "[") + f"{low}"
    hi = f"{high}" + (")" if high_open or high == math.inf else "]")
    return f"{lo}, {hi}"


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, optional: bool = False, finite: bool = True) -> None:
    """A real number in the interval (``[low, high]``; ``low_open``/``high_open`` exclude an end); ``optional``
    also accepts None, ``finite=False`` also accepts infinity (never NaN)."""
    if optional and value is None:
        return
    ok = _is_number(value) and not math.isnan(value) and (not finite or math.isfinite(value))
    ok = ok and low <= value <= high and not (low_open and value == low) and not (high_open and value == high)
    if not ok:
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be a number in {_interval(low, high, low_open, high_open)}{none}, "
                         f"got {value!r}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              optional: bool = False) -> None:
    """An int (not a bool, not a float) with ``low <= value <= high`` where given; ``optional`` accepts None."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = " in [{}, {}]".format(low, high) if low is not None and high is not None else (
            f" >= {low}" if low is not None else (f" <= {high}" if high is not None else ""))
        raise ValueError(f"{name} must be an int{bounds}{' or None' if optional else ''}, got {value!r}")


def check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    """True or False (not 0/1, not "yes"); ``optional`` accepts None (torch.optim's ``foreach=None``)."""
    if (optional and value is None) or isinstance(value, bool):
        return
    raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """One of ``choices`` (compared with ``==``; a bool never matches an int choice)."""
    choices = tuple(choices)
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_str(name: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty string (a module or attribute name, a path); ``optional`` accepts None."""
    if (optional and value is None) or (isinstance(value, str) and value):
        return
    raise ValueError(f"{name} must be a non-empty string{' or None' if optional else ''}, got {value!r}")


def check_names(name: str, value: Any, *, optional: bool = False, allow_empty: bool = False) -> None:
    """A name pattern or a list of them (peft's ``target_modules``); ``optional`` accepts None,
    ``allow_empty`` an empty list (exclude nothing)."""
    if optional and value is None:
        return
    if isinstance(value, str):
        ok = bool(value)
    else:
        ok = isinstance(value, Sequence) and (allow_empty or len(value) > 0) and all(
            isinstance(v, str) and v for v in value)
    if not ok:
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be a module-name pattern or a {'' if allow_empty else 'non-empty '}list of "
                         f"them{none}, got {value!r}")

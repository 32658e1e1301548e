"""Argument checks shared by every layer above the kernels, so that a bad argument gets the same error
everywhere: a TypeError when its type is wrong, a ValueError when its value is, and always its name.

Each check returns the value converted to the plain Python type the caller works with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

# The dtypes every kernel reads and writes (math is fp32 in registers).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_int(name: str, value, minimum: int | None = 1) -> int:
    """An int (numpy and 0-d integer tensors too, never a bool) at least ``minimum`` (None: no bound)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_optional_int(name: str, value, minimum: int | None = 1) -> int | None:
    return None if value is None else check_int(name, value, minimum)


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """A real number (int, float, 0-d tensor; never a bool or NaN) within the given bounds."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC check below (bool is not)
        value = float(value)
    else:
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence):
    """One of ``choices`` (compared by equality); the message lists them."""
    if not isinstance(value, str | int) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_callable(name: str, value: Callable) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_texts(name: str, texts, *, allow_empty: bool = False) -> list[str]:
    """A sequence of strings (not one string), as a list."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(text).__name__}")
    return texts

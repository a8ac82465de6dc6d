"""Checks of what a user hands the library, each written once: slice index, slice content, fat-threshold method.

The Slicer module, the command line and the library's own entry points all call these, so the same bad
input gets the same message everywhere. Every refusal is an :class:`~ParaspinalSegLib.errors.InputError`.
numpy only (runs in Slicer's Python without torch).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from .errors import InputError

__all__ = [
    "MIN_SLICE_SIDE",
    "THRESHOLD_METHODS",
    "ThresholdMethod",
    "check_slice_index",
    "validate_slice",
    "parse_threshold_method",
]

#: Smallest slice side accepted (anything smaller is not an MRI slice).
MIN_SLICE_SIDE = 8

#: Named fat-threshold methods (``measurements.fat_threshold``); a number is a manual threshold.
THRESHOLD_METHODS: tuple[str, ...] = ("auto", "otsu", "otsu-region")

# Older spellings of "auto" (tables record the auto method as "auto-gmm").
_THRESHOLD_ALIASES = {"auto-gmm": "auto", "gmm": "auto"}

#: A parsed fat-threshold method: one of :data:`THRESHOLD_METHODS` or a manual threshold.
ThresholdMethod = Union[str, float]


def check_slice_index(k: Any, num_slices: int, volume_name: Optional[str] = None) -> int:
    """``k`` as an int if it is a whole number in ``0 .. num_slices - 1``, else an :class:`InputError`."""
    where = f"volume '{volume_name}'" if volume_name else "the volume"
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InputError(f"slice index must be a whole number, got {k!r}")
    if not 0 <= int(k) < num_slices:
        raise InputError(f"slice index {int(k)} is out of range: {where} has slices 0..{num_slices - 1}")
    return int(k)


def validate_slice(a: Any, where: str = "") -> np.ndarray:
    """Return ``a`` as a real 2-D array, raising :class:`InputError` for what cannot be segmented.

    Refused: not 2-D, too small, not numeric, NaN/infinite values, and an empty slice (all pixels
    equal, e.g. all zero — nothing to segment, typically a padding slice). ``where`` (e.g.
    ``"slice 3 of 'T2 axial'"``) starts the message.
    """
    arr = np.asarray(a)
    problem = _slice_problem(arr)
    if problem:
        raise InputError(f"{where}: {problem}" if where else problem)
    return arr


def _slice_problem(arr: np.ndarray) -> str:
    if arr.ndim != 2:
        return f"expected a 2-D slice, got an array of shape {arr.shape}"
    if min(arr.shape) < MIN_SLICE_SIDE:
        return f"slice of shape {arr.shape} is too small to segment (at least {MIN_SLICE_SIDE} pixels a side)"
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        return f"slice must hold real numbers (integer or float), got dtype {arr.dtype}"
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            return (
                f"slice contains {int(bad.sum())} NaN or infinite pixel value(s) of {arr.size}; "
                "fix or mask them before segmenting"
            )
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        return f"slice is empty: every pixel has the value {lo.item()!r} (nothing to segment)"
    return ""


def parse_threshold_method(method: Any) -> ThresholdMethod:
    """A fat-threshold method as typed or passed: one of :data:`THRESHOLD_METHODS` or a manual threshold (float).

    Accepts names in any case with surrounding blanks, numbers and numeric text (``"350"`` from a field or
    the command line). Anything else is an :class:`InputError` naming the choices.
    """
    if isinstance(method, (int, float, np.integer, np.floating)) and not isinstance(method, (bool, np.bool_)):
        value = float(method)
    elif isinstance(method, str):
        name = method.strip().lower()
        name = _THRESHOLD_ALIASES.get(name, name)
        if name in THRESHOLD_METHODS:
            return name
        try:
            value = float(name)
        except ValueError:
            value = None  # type: ignore[assignment]
    else:
        value = None  # type: ignore[assignment]
    if value is not None and not np.isfinite(value):
        raise InputError(f"a manual fat threshold must be a finite number, not {method!r}")
    if value is None:
        raise InputError(f"unknown fat threshold method {method!r}: use {', '.join(THRESHOLD_METHODS)} or a number")
    return value

"""Values made ready for ``json.dumps(..., allow_nan=False)``: the one JSON cleaner of the library and trainer.

Used for weights configs (``weights.save_weights``), training histories and cross-validation reports.
Imports nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["json_ready"]


def json_ready(obj: Any) -> Any:
    """``obj`` with mappings → dicts with string keys, tuples → lists, numpy/torch scalars → Python numbers,
    paths → strings and non-finite floats (NaN, ±inf: "not measured") → ``None``.

    Strict JSON has no NaN, so a metric that could not be measured is written as ``null``.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

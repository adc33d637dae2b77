"""Strict JSON for everything probe writes: the one place where non-finite numbers become null.

JSON has no NaN or Infinity. A quantity that is undefined (the SE of one sample, a radius where the
curvature is 0) or was not computable (a sweep point where the model overflowed) is stored as null
and printed as "n/a"; numpy and torch scalars and arrays become plain numbers and lists; dataclasses
become dicts (fields that are None are left out: None means "not computed", NaN means "undefined").
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, numpy/torch values as Python ones and dataclasses as dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_safe(v) for f in dataclasses.fields(obj) if (v := getattr(obj, f.name)) is not None}
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return json_safe(obj.tolist())
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return str(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`json_safe`)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)

"""The ``RESULT {...}`` line every example ends with: strict JSON, always.

A value that is not a finite number (a diverged loss, the train loss of a resumed job with no
epoch left to run) is written as ``null``: Python's ``json.dumps`` would write ``NaN``, which is not
JSON and which strict parsers (``jq``, ``JSON.parse``, Go, Rust) refuse.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite replaced by None, in nested dicts,
    lists and tuples too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def result_line(result: dict[str, Any], sort_keys: bool = False) -> str:
    """``RESULT {...}``: ``result`` as strict JSON (non-finite numbers as ``null``)."""
    return "RESULT " + json.dumps(finite_or_none(result), sort_keys=sort_keys, allow_nan=False)

"""The one JSON convention of every file and API event: strict JSON, with non-finite floats written as `null`.

A diverged step keeps its meaning through `StepRecord.diverged`; `null` is what every JSON reader (a browser's
included) understands, where `NaN` is not JSON at all.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """`value` as plain JSON data: non-finite floats become None, tuples lists, mapping keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = None) -> str:
    """Strict JSON text of `plain(value)`."""
    return json.dumps(plain(value), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """Write `value` as indented strict JSON."""
    out = Path(path)
    out.write_text(dumps(value, indent=2) + "\n", encoding="utf-8")
    return out

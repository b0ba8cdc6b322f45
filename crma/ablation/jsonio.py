"""The one JSON convention of every file and API event — strict JSON, with non-finite floats written as `null` — and
the one way a run's files are written (atomically: a reader never sees half a file).

A diverged step keeps its meaning through `StepRecord.diverged`; `null` is what every JSON reader (a browser's
included) understands, where `NaN` is not JSON at all.
"""

from __future__ import annotations

import json
import math
import os
import uuid
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` through a temp file and a rename: a reader never sees half a file."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """Write `value` as indented strict JSON (atomically)."""
    return atomic_write_text(path, dumps(value, indent=2) + "\n")

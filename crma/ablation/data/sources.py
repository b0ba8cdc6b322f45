"""Data sources: which file or data set a name means, its path-free identity, and a validated slice of its rows."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import DataError, check_text, short_repr
from .readers import FileFormat, read_slice

BUNDLED_PATH = Path(__file__).resolve().parents[3] / "assets" / "bundled_instructions.jsonl"
BUNDLED_NAME = "bundled data set"  # what messages call it: its absolute path is the server's business
ALPACA_REPO = "tatsu-lab/alpaca"
REQUIRED_COLUMNS = ("instruction", "output")
COLUMNS = ("instruction", "input", "output")
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv")
# Uploads above this are refused. It holds the whole Stanford Alpaca release (alpaca_data.json, about 22 MB) with
# room to spare, while a run reads at most a few thousand rows: a bigger file only costs the Space upload time, disk
# and a full pass to hash it (`describe_source`). Pass it as gradio's `max_file_size` and as `max_bytes` here.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024

SourceKind = Literal["bundled", "alpaca", "file"]
# The directory part of an absolute path ("/home/x/.cache/" in "/home/x/.cache/f"), not of a URL.
_DIRECTORY = re.compile(r"(?<![\w:/\\.])(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/]*)+[\\/]")


@dataclass(frozen=True)
class SourceInfo:
    """Path-free identity of a data source, for `config.json`, summaries and the UI.

    Args:
        kind (`str`): `bundled`, `alpaca` (the Hub data set) or `file` (a local or uploaded file).
        name (`str`): the file name without any directory (`tatsu-lab/alpaca` for the Hub data set).
        sha256 (`str | None`): hex digest of the file's bytes; `None` for the Hub data set, which is not fetched.
        size_bytes (`int | None`): the file's size; `None` for the Hub data set.
    """

    kind: SourceKind
    name: str
    sha256: str | None
    size_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def describe_source(source: str, *, display_name: str | None = None) -> SourceInfo:
    """Identify a data source without naming where it lies on this machine.

    The file is hashed in 1 MiB chunks, so memory stays flat for any size.

    Args:
        source (`str`): as for `load_instruction_rows`.
        display_name (`str | None`): the name to record and to use in messages (for an upload: the file name the
            visitor chose); only its last path component is kept. Defaults to the file name of `source`.

    Returns:
        `SourceInfo`: kind, file name, sha256 and size.

    Raises:
        `DataError`: an empty source, or a file that is missing or unreadable.
    """
    kind, path, name = _resolve(source, display_name)
    if path is None:
        return SourceInfo(kind="alpaca", name=ALPACA_REPO, sha256=None, size_bytes=None)
    digest, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise DataError(f"cannot read {name}: {exc.strerror or type(exc).__name__}") from None
    # A browser may send "C:\\Users\\me\\data.json" as the file name: keep its last component on any OS.
    file_name = re.split(r"[\\/]", display_name)[-1] if display_name else path.name
    return SourceInfo(kind=kind, name=file_name, sha256=digest.hexdigest(), size_bytes=size)


def load_instruction_rows(
    source: str, *, start: int, rows: int, display_name: str | None = None, max_bytes: int | None = None
) -> list[dict[str, str]]:
    """Load rows `[start, start + rows)` of an instruction data set in the Alpaca schema.

    A .jsonl or .csv file is streamed: reading stops after the slice's last row, so memory grows with the slice, not
    the file. A .json array is parsed whole (JSON lines saved as .json are read as JSON lines). Either way rows
    outside the slice are not validated.

    Args:
        source (`str`): `"bundled"` (the project's own `assets/bundled_instructions.jsonl`), `"alpaca"` (the Hub data
            set `tatsu-lab/alpaca`, split `train`; needs the Hub or its local cache), or a path to a local `.json` (a
            list of objects, or JSON lines), `.jsonl` or `.csv` file.
        start (`int`): first row, 0-based.
        rows (`int`): number of rows; the slice must fit inside the data set (it is never silently shortened).
        display_name (`str | None`): how messages name a local file (for an upload: the visitor's file name, so no
            server path shows). Defaults to `source` as given. The bundled set is always "bundled data set".
        max_bytes (`int | None`): refuse a local file bigger than this many bytes (see `MAX_UPLOAD_BYTES`); `None`
            reads any size.

    Returns:
        `list[dict[str, str]]`: each dict has exactly the keys `instruction`, `input` (`""` when the file has none)
        and `output`.

    Raises:
        `DataError`: missing, unreadable or too big file, unsupported extension, missing columns, invalid JSON or CSV
        up to the slice's end (anywhere in a .json array), empty, non-string or non-text values in the selected rows,
        or a slice that does not fit.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise DataError(f"`start` must be an integer >= 0; got {start!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        raise DataError(f"`rows` must be a positive integer (zero rows selected); got {rows!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise DataError(f"`max_bytes` must be a positive integer or None; got {max_bytes!r}")
    kind, path, name = _resolve(source, display_name)
    if path is None:
        return _load_alpaca(start, rows)
    fmt = _file_format(path, name)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DataError(
                f"{name} is {_size_text(size)}, over the limit of {_size_text(max_bytes)} for data files; "
                "keep only the rows you need (a .jsonl file is read fastest)"
            )
        with path.open("rb") as stream:
            found = read_slice(stream, fmt=fmt, name=name, start=start, rows=rows, required_columns=REQUIRED_COLUMNS)
    except OSError as exc:
        raise DataError(f"cannot read {name}: {exc.strerror or type(exc).__name__}") from None
    if found.total is not None:
        _check_slice(found.total, start, rows, name)
    return [_validate_row(record, start + i, name) for i, record in enumerate(found.records)]


def _resolve(source: str, display_name: str | None) -> tuple[SourceKind, Path | None, str]:
    # (kind, path or None for the Hub data set, the name messages use)
    if not isinstance(source, str) or not source.strip():
        raise DataError(
            f"the data set must be 'bundled', 'alpaca' or a path to a .json/.jsonl/.csv file; got {source!r}"
        )
    key = source.strip()
    if key.lower() == "alpaca" or key == ALPACA_REPO:
        return "alpaca", None, f"Hub data set {ALPACA_REPO}"
    if key.lower() == "bundled":
        if not BUNDLED_PATH.is_file():
            raise DataError(f"the {BUNDLED_NAME} is missing: restore assets/{BUNDLED_PATH.name} from git")
        return "bundled", BUNDLED_PATH, BUNDLED_NAME
    name = display_name if display_name else key
    path = Path(key).expanduser()
    if not path.exists():
        raise DataError(
            f"data file not found: {name!r} (the data set must be 'bundled', 'alpaca', or a path to a .json, "
            ".jsonl or .csv file)"
        )
    if not path.is_file():
        raise DataError(f"data path {name!r} is not a file")
    return "file", path, name


def _file_format(path: Path, name: str) -> FileFormat:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported data file extension {path.suffix!r} for {name}: use .json, .jsonl or .csv")
    return suffix[1:]  # type: ignore[return-value]


def _size_text(n: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def _check_slice(n: int, start: int, rows: int, name: str) -> None:
    if n == 0:
        raise DataError(f"{name} has no rows")
    if start >= n:
        raise DataError(f"start {start} is past the end: the data set has {n} rows ({name})")
    if start + rows > n:
        raise DataError(
            f"rows {start}..{start + rows - 1} do not fit: only {n - start} rows are available from start {start}, "
            f"the data set has {n} rows ({name})"
        )


def _validate_row(record: Any, index: int, name: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(
            f"{name} row {index} must be an object with 'instruction' and 'output'; got {type(record).__name__}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
        keys = sorted(map(str, record))
        shown = keys if len(keys) <= 8 else [*keys[:8], f"... {len(keys) - 8} more"]
        raise DataError(f"{name} row {index} is missing column(s) {missing}; it has {shown}")
    row = {c: record.get(c) for c in COLUMNS}
    if row["input"] is None:  # a missing or null `input` means "no input", as in Alpaca
        row["input"] = ""
    for column, value in row.items():
        if not isinstance(value, str):
            raise DataError(
                f"{name} row {index} column '{column}' must be a string; got {type(value).__name__} "
                f"{short_repr(value)}"
            )
        check_text(value, f"{name} row {index} column '{column}'")
    for column in REQUIRED_COLUMNS:
        if not row[column].strip():
            raise DataError(f"{name} row {index} has an empty '{column}'")
    return row


def _load_alpaca(start: int, rows: int) -> list[dict[str, str]]:
    name = f"Hub data set {ALPACA_REPO}"
    try:
        import datasets  # lazy: importing datasets costs about a second

        dataset = datasets.load_dataset(ALPACA_REPO, split="train")
    except Exception as exc:  # offline mode, no network, no cache: all mean the same thing to the user
        # The reason may name the server's cache folder: keep file names, drop directories.
        reason = _DIRECTORY.sub("", " ".join(str(exc).split()))[:160] or type(exc).__name__
        raise DataError(
            f"the 'alpaca' data set needs the Hugging Face Hub ({ALPACA_REPO}), which is not reachable or offline "
            f"mode is on ({reason}); use 'bundled' or a local .json/.jsonl/.csv file instead"
        ) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(f"{name} is missing column(s) {missing}; it has {dataset.column_names}")
    _check_slice(len(dataset), start, rows, name)
    # Only the slice is converted to Python objects: the full set has 52k rows.
    columns = dataset[start : start + rows]
    return [_validate_row({c: columns[c][i] for c in COLUMNS if c in columns}, start + i, name) for i in range(rows)]

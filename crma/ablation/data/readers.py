"""Readers: rows `[start, start + rows)` of a .jsonl or .csv file without reading the rest, and of a .json file.

JSON lines and CSV stream, so memory is O(slice), not O(file): a reader stops as soon as the slice is complete, rows
before `start` are passed over one at a time (JSON lines are not even parsed there, only told apart from blank
lines), and rows after the slice are never read, so a bad row there cannot fail a good slice. A .json file is parsed
whole with `json.loads` (uploads are capped at 64 MB; a big file is read fastest as .jsonl), unless it holds JSON
lines, which are read as such. The total row count is known only when the file ends before the slice does, which is
exactly when a "does not fit" message needs it.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from .errors import DataError

FileFormat = Literal["jsonl", "json", "csv"]

_CHUNK = 1 << 16  # bytes per read while passing over a JSON line before the slice, however long the line is
_BOM = codecs.BOM_UTF8  # spreadsheet exports often start with one
_SKIPPED = object()  # stands for a row before the slice that was counted but not parsed
_TOO_DEEP = "nested too deeply to read (hundreds of levels of [ or {); a data row is one flat object"
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # a line break in a classic-Mac CSV (csv wants one string per line)


@dataclass
class RecordSlice:
    """What a reader found.

    Args:
        records (`list[Any]`): the decoded records of the slice (or of its part that exists), in file order; each a
            dict of all the header's columns for CSV, any JSON value otherwise (validation is the caller's job).
        total (`int | None`): number of rows in the file when it ended before the slice was complete, else `None`
            (the reader stopped early and did not count the rest).
    """

    records: list[Any]
    total: int | None


def read_slice(
    stream: BinaryIO, *, fmt: FileFormat, name: str, start: int, rows: int, required_columns: Sequence[str] = ()
) -> RecordSlice:
    """Read rows `[start, start + rows)` of an open binary stream, stopping right after the last one.

    Args:
        stream (`BinaryIO`): the file, opened in binary mode at its beginning.
        fmt (`str`): `jsonl` (one JSON value per line; blank lines ignored), `json` (an array of values or a single
            object, parsed whole, or JSON lines) or `csv` (a header row, then one row per record; quoted cells may
            span lines).
        name (`str`): how messages name the file.
        start (`int`): first row, 0-based.
        rows (`int`): number of rows.
        required_columns (`Sequence[str]`): columns a CSV header must have (checked before any row is read).

    Returns:
        `RecordSlice`: the records found and, if the file ended first, the row count.

    Raises:
        `DataError`: text that is not UTF-8, a row that is not valid JSON or CSV, or JSON nested too deeply, in the
        part of the file that was read (all of a .json array).
    """
    readers = {"jsonl": _jsonl_records, "json": _json_records, "csv": _csv_records}
    if fmt not in readers:
        raise DataError(f"`fmt` must be 'jsonl', 'json' or 'csv'; got {fmt!r}")
    records: list[Any] = []
    seen = 0
    for record in readers[fmt](stream, name, start, tuple(required_columns)):
        if seen >= start:
            records.append(record)
            if len(records) == rows:
                return RecordSlice(records, total=None)
        seen += 1
    return RecordSlice(records, total=seen)


# --------------------------------------------------------------------------------------------------------------------
# JSON lines


def _jsonl_records(stream: BinaryIO, name: str, skip: int, _required: tuple[str, ...]) -> Iterator[Any]:
    index = 0
    for line_no in itertools.count(1):
        if index < skip:
            has_content, at_eof = _pass_line(stream, first=line_no == 1)
            if has_content:
                yield _SKIPPED
                index += 1
            if at_eof:
                return
            continue
        raw = stream.readline()
        if not raw:
            return
        line = _decode_line(raw, line_no, name)
        if not line.strip(" \t\r\n"):
            continue
        yield _loads_line(line, line_no, index, name)
        index += 1


def _pass_line(stream: BinaryIO, *, first: bool) -> tuple[bool, bool]:
    # A row before the slice: only whether it is blank matters, so it is read in bounded pieces and dropped.
    has_content = False
    while True:
        piece = stream.readline(_CHUNK)
        if not piece:
            return has_content, True
        if first and piece.startswith(_BOM):
            piece = piece[len(_BOM) :]
        first = False
        has_content = has_content or bool(piece.strip(b" \t\r\n"))
        if piece.endswith(b"\n"):
            return has_content, False


def _loads_line(line: str, line_no: int, index: int, name: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name} line {line_no} is not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{name} line {line_no} (row {index}) is {_TOO_DEEP}") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(f"{name} line {line_no} (row {index}) is not readable JSON: {_first_clause(exc)}") from None


def _first_clause(exc: Exception) -> str:
    return str(exc).split(";")[0].split("\n")[0]


# --------------------------------------------------------------------------------------------------------------------
# JSON: an array, one object, or JSON lines saved as .json


def _json_records(stream: BinaryIO, name: str, skip: int, required: tuple[str, ...]) -> Iterator[Any]:
    # Decoded whole: uploads are capped (MAX_UPLOAD_BYTES), and only a JSON parser knows where an array element ends.
    data = stream.read().removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{name} is not UTF-8 text: line {line} ({exc.reason})") from None
    if not text.strip(" \t\r\n"):
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and not text.lstrip(" \t\r\n").startswith("["):
            # Several values one after another: JSON lines in a .json file, read as such (errors name the line).
            yield from _jsonl_records(io.BytesIO(data), name, skip, required)
            return
        raise DataError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DataError(f"{name} is {_TOO_DEEP}") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(f"{name} is not readable JSON: {_first_clause(exc)}") from None
    if isinstance(value, dict):  # one object is a one-row data set
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{name} must hold a list of objects (or JSON lines); got a JSON {type(value).__name__}")
    yield from value


# --------------------------------------------------------------------------------------------------------------------
# CSV


def _csv_lines(stream: BinaryIO, name: str) -> Iterator[str]:
    for line_no, raw in enumerate(stream, start=1):
        line = _decode_line(raw, line_no, name)
        if "\r" in line[:-2]:
            yield from (part for part in _LONE_CR.split(line) if part)
        else:
            yield line


def _csv_records(stream: BinaryIO, name: str, skip: int, required: tuple[str, ...]) -> Iterator[Any]:
    reader = csv.reader(_csv_lines(stream, name))
    try:
        header = next(reader, None)
        if not header:
            return
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{name} is missing column(s) {missing}; its header has {header}")
        index = 0
        for cells in reader:
            if not cells:  # a blank line, skipped as csv.DictReader does
                continue
            if index >= skip:
                if len(cells) != len(header):
                    more_or_fewer = "more" if len(cells) > len(header) else "fewer"
                    raise DataError(
                        f"{name} row {index} (line {reader.line_num}) has {more_or_fewer} cells than the header's "
                        f"{len(header)}"
                    )
                yield dict(zip(header, cells, strict=True))
            else:
                yield _SKIPPED
            index += 1
    except csv.Error as exc:
        raise DataError(f"{name} is not valid CSV at line {reader.line_num}: {exc}") from None


def _decode_line(raw: bytes, line_no: int, name: str) -> str:
    """One line of a data file as text (a leading byte-order mark dropped), or a `DataError` naming where it is not
    UTF-8."""
    if line_no == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name} is not UTF-8 text: line {line_no}, byte {exc.start + 1} of the line ({exc.reason})"
        ) from None

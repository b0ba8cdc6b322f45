"""Streaming readers: rows `[start, start + rows)` of a .jsonl, .json or .csv file without reading the rest.

Memory is O(slice), not O(file): a reader stops as soon as the slice is complete, rows before `start` are passed
over one at a time (JSON lines are not even parsed there, only told apart from blank lines), and a .json array is
decoded element by element with `json.JSONDecoder.raw_decode` over a growing text buffer. Rows after the slice are
never read, so a bad row there cannot fail a good slice. The total row count is known only when the file ends
before the slice does, which is exactly when a "does not fit" message needs it.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from .errors import DataError

FileFormat = Literal["jsonl", "json", "csv"]

_CHUNK = 1 << 16  # bytes per read while scanning; a row longer than this is read in growing pieces
_BOM = codecs.BOM_UTF8  # spreadsheet exports often start with one
_SKIPPED = object()  # stands for a row before the slice that was counted but not parsed
_JSON_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# A truncated JSON value fails within a few characters of the buffer's end, except an open string, whose error points
# at its opening quote. tests/test_data_reading.py reads documents in chunks of 1, 2, 3 and 7 bytes to hold this to it.
_TRUNCATION_WINDOW = 16
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
        fmt (`str`): `jsonl` (one JSON value per line; blank lines ignored), `json` (an array of values, one
            value such as a single object, or several values one after another, as JSON lines are) or `csv` (a
            header row, then one row per record; quoted cells may span lines).
        name (`str`): how messages name the file.
        start (`int`): first row, 0-based.
        rows (`int`): number of rows.
        required_columns (`Sequence[str]`): columns a CSV header must have (checked before any row is read).

    Returns:
        `RecordSlice`: the records found and, if the file ended first, the row count.

    Raises:
        `DataError`: text that is not UTF-8, a row that is not valid JSON or CSV, or JSON nested too deeply, in the
        part of the file that was read.
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
# JSON: an array, one object, or values one after another


class _TextBuffer:
    """The decoded text of a binary stream, read in chunks on demand, with line and column numbers for messages."""

    def __init__(self, stream: BinaryIO, name: str):
        self.stream, self.name = stream, name
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof, self.started = "", 0, False, False
        self.line_base, self.col_base = 1, 1  # line and column of buf[0]
        self.bad_bytes: DataError | None = None  # raised once the text before the bad bytes is used up

    def more(self) -> bool:
        """Append the next chunk (at least as long as the unread text, so re-decoding a long value stays linear)."""
        if self.bad_bytes is not None:
            raise self.bad_bytes
        if self.eof:
            return False
        if self.pos:  # drop consumed text, keeping track of where buf[0] lies in the file
            dropped = self.buf[: self.pos]
            newlines = dropped.count("\n")
            self.line_base += newlines
            self.col_base = self.pos - dropped.rfind("\n") if newlines else self.col_base + self.pos
            self.buf, self.pos = self.buf[self.pos :], 0
        data = self.stream.read(max(_CHUNK, len(self.buf)))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            # Bad bytes after the slice must not fail it: keep the text before them, complain only if it runs out.
            text = exc.object[: exc.start].decode("utf-8")  # the object is the held-back bytes plus this chunk
            line = self.line_base + self.buf.count("\n") + text.count("\n")
            self.bad_bytes = DataError(f"{self.name} is not UTF-8 text: line {line} ({exc.reason})")
        if not self.started and text:  # the first character decides whether there is a byte-order mark
            self.started = True
            text = text.removeprefix("\ufeff")
        self.buf += text
        self.eof = not data
        return True

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end), with the position moved onto it."""
        while True:
            self.pos = _JSON_WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def value(self, index: int) -> Any:
        """Decode the JSON value at the position (the row `index`, for messages) and move past it."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                truncated = exc.pos >= len(self.buf) - _TRUNCATION_WINDOW or exc.msg.startswith("Unterminated string")
                if truncated and self.more():
                    continue
                raise self.invalid(exc.msg, exc.pos, index) from None
            except RecursionError:
                raise DataError(f"{self.name} row {index} ({self.where(self.pos)}) is {_TOO_DEEP}") from None
            except ValueError as exc:
                raise DataError(
                    f"{self.name} row {index} ({self.where(self.pos)}) is not readable JSON: {_first_clause(exc)}"
                ) from None
            # A number that ends with the buffer may go on in the next chunk.
            if end == len(self.buf) and self.more():
                continue
            self.pos = end
            return value

    def where(self, pos: int) -> str:
        before = self.buf.count("\n", 0, pos)
        column = pos - self.buf.rfind("\n", 0, pos) if before else self.col_base + pos
        return f"line {self.line_base + before} column {column}"

    def invalid(self, msg: str, pos: int, index: int | None = None) -> DataError:
        row = "" if index is None else f" (row {index})"
        return DataError(f"{self.name} is not valid JSON: {msg} at {self.where(pos)}{row}")


def _json_records(stream: BinaryIO, name: str, _skip: int, _required: tuple[str, ...]) -> Iterator[Any]:
    # Rows before the slice are decoded too: in JSON only the decoder knows where a value ends.
    text = _TextBuffer(stream, name)
    first = text.peek()
    if not first:
        return
    if first != "[":
        index = 0
        while text.peek():
            value = text.value(index)
            if index == 0 and not isinstance(value, dict):
                raise DataError(
                    f"{name} must hold a list of objects (or JSON lines); got a JSON {type(value).__name__}"
                )
            yield value
            index += 1
        return
    text.pos += 1
    index = 0
    if text.peek() == "]":
        text.pos += 1
    else:
        while True:
            yield text.value(index)
            index += 1
            after = text.peek()
            if after == "]":
                text.pos += 1
                break
            if after != ",":
                raise text.invalid("Expecting ',' delimiter", text.pos, index - 1)
            text.pos += 1
            text.peek()  # raw_decode does not skip the whitespace before a value
    if text.peek():
        raise text.invalid("Extra data", text.pos)


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

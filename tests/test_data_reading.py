"""Reading data files: JSON lines and CSV slices stream and stop early, .json is parsed whole, size limit, path-free
names and identity, hostile JSON."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest

from crma.ablation.data import (
    BUNDLED_PATH,
    MAX_UPLOAD_BYTES,
    DataError,
    build_examples,
    describe_source,
    load_instruction_rows,
    read_slice,
)
from crma.ablation.data import readers as readers_module
from crma.ablation.models import build_byte_tokenizer


def sample_rows(n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Say the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"The number is {i}."}
        for i in range(n)
    ]


def jsonl_bytes(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def csv_bytes(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=["instruction", "input", "output"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


FORMATS = {
    "jsonl": (".jsonl", jsonl_bytes),
    "json-array": (".json", lambda rows: json.dumps(rows, indent=1).encode("utf-8")),
    "json-lines": (".json", jsonl_bytes),
    "csv": (".csv", csv_bytes),
}
STREAMED = ["jsonl", "csv"]  # a .json file is parsed whole


# ---------------------------------------------------------------------------------------------------------------------
# Streaming: the JSON lines and CSV readers stop after the slice
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", STREAMED)
def test_rows_after_the_slice_are_not_read(tmp_path, fmt):
    suffix, encode = FORMATS[fmt]
    data = sample_rows(30)
    good = encode(data)
    # After the rows: text that is not JSON or CSV, and bytes that are not UTF-8 (well past the first read chunk).
    tail = b'{"instruction": "broken", "output": \n"unterminated, "\xff\xfe\n' + b"\xff" * (3 * readers_module._CHUNK)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(good + tail)
    assert load_instruction_rows(str(path), start=10, rows=20) == data[10:30]
    with pytest.raises(DataError, match="not valid JSON|not valid CSV|not UTF-8 text|more cells|fewer cells"):
        load_instruction_rows(str(path), start=10, rows=21)


@pytest.mark.parametrize("fmt", STREAMED)
def test_slice_reader_stops_reading_after_the_slice(fmt):
    _, encode = FORMATS[fmt]
    data = sample_rows(20_000)
    blob = encode(data)
    stream = io.BytesIO(blob)
    found = read_slice(stream, fmt=fmt, name="d", start=5, rows=20)
    assert found.records[0]["instruction"] == data[5]["instruction"] and len(found.records) == 20
    assert found.total is None  # it stopped, so it did not count the rest
    # Line readers stop exactly at the end of the slice's last row (+1 line: the CSV header).
    assert stream.tell() == sum(len(line) for line in blob.splitlines(keepends=True)[: 25 + (fmt == "csv")])


def test_slice_that_does_not_fit_counts_every_row(tmp_path):
    for fmt, (suffix, encode) in FORMATS.items():
        path = tmp_path / f"{fmt}{suffix}"
        path.write_bytes(encode(sample_rows(10)))
        with pytest.raises(DataError, match=r"only 3 rows are available from start 7, the data set has 10 rows"):
            load_instruction_rows(str(path), start=7, rows=5)
        with pytest.raises(DataError, match=r"start 12 is past the end: the data set has 10 rows"):
            load_instruction_rows(str(path), start=12, rows=1)


def test_rows_before_the_slice_are_counted_not_parsed(tmp_path):
    # A JSON line before the slice is only told apart from a blank line: a bad or huge one does not matter.
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"not json\n\n   \n" + b"[" * 500_000 + b"\n" + jsonl_bytes(sample_rows(3)))
    assert load_instruction_rows(str(path), start=2, rows=3) == sample_rows(3)


def test_json_file_is_an_array_one_object_or_json_lines(tmp_path):
    rows = [
        {"instruction": 'caf\u00e9 \U0001f600 \\ "q" \u2028', "input": "x" * 300, "output": "1 2 3", "n": -12.5e10},
        {"instruction": "esc \\u00e9 \n\t", "output": "\u4e2d\u6587", "input": None, "deep": [[[{"a": [1, 2.0]}]]]},
        *sample_rows(5),
    ]
    expected = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2, ensure_ascii=False).encode("utf-8"))  # with a BOM
    assert load_instruction_rows(str(path), start=0, rows=len(rows)) == expected
    assert load_instruction_rows(str(path), start=5, rows=2) == expected[5:]
    # One pretty-printed object is a one-row data set, and JSON lines in a .json file are rows too.
    path.write_text(json.dumps(rows[0], indent=2), encoding="utf-8")
    assert load_instruction_rows(str(path), start=0, rows=1) == expected[:1]
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(rows))
    assert load_instruction_rows(str(path), start=0, rows=len(rows)) == expected
    assert load_instruction_rows(str(path), start=6, rows=1) == expected[6:]
    # An empty array, or no text at all, is a data set without rows.
    for body in (b"[]", b" \n"):
        path.write_bytes(body)
        with pytest.raises(DataError, match=r"d\.json has no rows$"):
            load_instruction_rows(str(path), start=0, rows=1)


@pytest.mark.parametrize(
    "text",
    [
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]',
        '[{"instruction": "a", "output": "b"} {"instruction": "c", "output": "d"}]',
        '[{"instruction": "a", "output": "b"},]',
        '[{"instruction": "a",\n "output": "b"}]\n\n  [3]',
        '[{"instruction": "a", "output": "b\tc"}]',
    ],
)
def test_json_errors_are_one_line_naming_where_json_loads_stopped(tmp_path, text):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    where = f"{reference.value.msg} at line {reference.value.lineno} column {reference.value.colno}"
    with pytest.raises(DataError) as error:
        load_instruction_rows(str(path), start=0, rows=1, display_name="d.json")
    assert str(error.value) == f"d.json is not valid JSON: {where}"


def test_json_lines_in_a_json_file_name_the_bad_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c" "output": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^d\.json line 3 is not valid JSON: Expecting ',' delimiter \(column 21\)$"):
        load_instruction_rows(str(path), start=0, rows=2, display_name="d.json")
    # They are read as JSON lines: the bad line after a one-row slice does not fail it.
    assert load_instruction_rows(str(path), start=0, rows=1) == [{"instruction": "a", "input": "", "output": "b"}]


def test_json_must_hold_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"}, ["not", "an", "object"]]', encoding="utf-8")
    assert load_instruction_rows(str(path), start=0, rows=1) == [{"instruction": "a", "input": "", "output": "b"}]
    with pytest.raises(
        DataError, match=r"^d\.json row 1 must be an object with 'instruction' and 'output'; got list$"
    ):
        load_instruction_rows(str(path), start=0, rows=2, display_name="d.json")
    path.write_text("12", encoding="utf-8")
    with pytest.raises(DataError, match=r"^d\.json must hold a list of objects \(or JSON lines\); got a JSON int$"):
        load_instruction_rows(str(path), start=0, rows=1, display_name="d.json")


def test_csv_with_classic_mac_line_ends_bom_and_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfinstruction,output\r"two\rlines",b\rc,d\r')
    assert load_instruction_rows(str(path), start=0, rows=2) == [
        {"instruction": "two\rlines", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": "d"},
    ]
    path.write_bytes(b'instruction,output\r\n"x\r\ny",b\r\nc,d\r\n')
    assert load_instruction_rows(str(path), start=1, rows=1) == [{"instruction": "c", "input": "", "output": "d"}]


@pytest.mark.parametrize(("suffix", "line"), [(".jsonl", 3), (".json", 3), (".csv", 4)])
def test_not_utf8_names_the_line(tmp_path, suffix, line):
    path = tmp_path / f"d{suffix}"
    rows = sample_rows(2)
    if suffix == ".json":
        body = b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "x"}]'
    elif suffix == ".csv":
        body = csv_bytes(rows) + b"caf\xe9,,x\n"
    else:
        body = jsonl_bytes(rows) + b'{"instruction": "caf\xe9", "output": "x"}\n'
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"d\{suffix} is not UTF-8 text: line {line}\b"):
        load_instruction_rows(str(path), start=0, rows=3)


# ---------------------------------------------------------------------------------------------------------------------
# Size limit
# ---------------------------------------------------------------------------------------------------------------------


def test_max_bytes_refuses_bigger_files_with_one_line_naming_the_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(sample_rows(40)))
    size = path.stat().st_size
    assert 1024 < size < 2**20
    with pytest.raises(
        DataError, match=r"^d\.jsonl is \d+\.?\d* KB, over the limit of 1000 bytes for data files"
    ) as e:
        load_instruction_rows(str(path), start=0, rows=1, max_bytes=1000, display_name="d.jsonl")
    assert "\n" not in str(e.value)
    assert load_instruction_rows(str(path), start=0, rows=1, max_bytes=size) == sample_rows(1)
    assert MAX_UPLOAD_BYTES == 64 * 2**20
    with pytest.raises(DataError, match="over the limit of 64 MB"):
        path.write_bytes(b" " * (MAX_UPLOAD_BYTES + 1))
        load_instruction_rows(str(path), start=0, rows=1, max_bytes=MAX_UPLOAD_BYTES)
    with pytest.raises(DataError, match=r"`max_bytes` must be a positive integer or None; got 0"):
        load_instruction_rows(str(path), start=0, rows=1, max_bytes=0)


# ---------------------------------------------------------------------------------------------------------------------
# Names and identity without server paths
# ---------------------------------------------------------------------------------------------------------------------


def _failing_files(folder: Path) -> dict[str, tuple[Path, dict]]:
    folder.mkdir()
    cases: dict[str, tuple[Path, dict]] = {}

    def add(label: str, name: str, body: bytes | None, **kwargs) -> None:
        path = folder / name
        if body is not None:
            path.write_bytes(body)
        cases[label] = (path, kwargs)

    add("missing", "gone.jsonl", None)
    add("unsupported", "d.txt", b"x")
    add("invalid json", "a.jsonl", b"{nope\n")
    add("invalid array", "b.json", b"[1 2]")
    add("not utf-8", "c.jsonl", b'{"instruction": "\xff"}\n')
    add("csv header", "d.csv", b"prompt,answer\nx,y\n")
    add("bad row", "e.jsonl", b'{"instruction": "", "output": "x"}\n')
    add("no fit", "f.jsonl", jsonl_bytes(sample_rows(2)), start=1, rows=5)
    add("too big", "g.jsonl", jsonl_bytes(sample_rows(50)), max_bytes=100)
    add("empty", "h.jsonl", b"\n")
    (folder / "dir.jsonl").mkdir()
    cases["directory"] = (folder / "dir.jsonl", {})
    return cases


def test_messages_about_a_file_use_its_display_name_not_its_folder(tmp_path):
    folder = tmp_path / "server-secret-folder"
    for label, (path, kwargs) in _failing_files(folder).items():
        args = {"start": 0, "rows": 1, **kwargs}
        with pytest.raises(DataError) as error:
            load_instruction_rows(str(path), display_name="my upload.jsonl", **args)
        message = str(error.value)
        assert "server-secret-folder" not in message and str(tmp_path) not in message, (label, message)
        assert "my upload.jsonl" in message, (label, message)
        # Without a display name a CLI user sees the path as given.
        with pytest.raises(DataError, match="server-secret-folder"):
            load_instruction_rows(str(path), **args)


def test_bundled_messages_never_show_its_path():
    with pytest.raises(DataError, match=r"start 9999 is past the end: .* \(bundled data set\)$") as error:
        load_instruction_rows("bundled", start=9999, rows=1)
    assert str(BUNDLED_PATH.parent) not in str(error.value)


def test_describe_source_is_path_free(tmp_path):
    folder = tmp_path / "server-secret-folder"
    folder.mkdir()
    path = folder / "tmp8f3k2.jsonl"
    payload = jsonl_bytes(sample_rows(3))
    path.write_bytes(payload)
    info = describe_source(str(path), display_name="C:\\Users\\me\\my data.jsonl")
    assert info.to_dict() == {
        "kind": "file",
        "name": "my data.jsonl",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size_bytes": len(payload),
    }
    assert "server-secret-folder" not in json.dumps(info.to_dict())
    assert describe_source(str(path)).name == "tmp8f3k2.jsonl"
    bundled = describe_source("bundled")
    assert (bundled.kind, bundled.name, bundled.size_bytes) == (
        "bundled",
        BUNDLED_PATH.name,
        BUNDLED_PATH.stat().st_size,
    )
    assert bundled.sha256 == hashlib.sha256(BUNDLED_PATH.read_bytes()).hexdigest()
    assert describe_source("alpaca").to_dict() == {
        "kind": "alpaca",
        "name": "tatsu-lab/alpaca",
        "sha256": None,
        "size_bytes": None,
    }
    with pytest.raises(DataError, match=r"^data file not found: 'x\.json'") as error:
        describe_source(str(folder / "nope.json"), display_name="x.json")
    assert "server-secret-folder" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Hostile JSON: deep nesting, lone surrogates, giant numbers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "body", "where"),
    [
        (".jsonl", jsonl_bytes(sample_rows(2)) + b"[" * 100_000 + b"\n", r"line 3 \(row 2\)"),
        (".jsonl", b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"line 1 \(row 0\)"),
        (".json", b"[" * 100_000, ""),
        (".json", b'[{"instruction": "a", "output": "b"},\n {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]", ""),
    ],
    ids=["jsonl-line", "jsonl-value", "json-array", "json-value"],
)
def test_deep_nesting_is_a_one_line_data_error(tmp_path, suffix, body, where):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"d\{suffix} {where}\s?is nested too deeply to read") as error:
        load_instruction_rows(str(path), start=0, rows=3)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogate_is_a_data_error_naming_row_and_column(tmp_path, suffix):
    rows = sample_rows(3)
    text = jsonl_bytes(rows).decode()
    text += '{"instruction": "ok", "output": "bad \\ud800 text"}\n'
    path = tmp_path / f"d{suffix}"
    path.write_text(text if suffix == ".jsonl" else "[" + ",".join(text.splitlines()) + "]", encoding="utf-8")
    with pytest.raises(
        DataError, match=rf"d\{suffix} row 3 column 'output' holds a lone surrogate '\\ud800' at character 4"
    ) as error:
        load_instruction_rows(str(path), start=1, rows=3)
    message = str(error.value)
    assert "\n" not in message and message.encode("utf-8")  # the message itself is printable UTF-8
    # A valid surrogate pair is one character (an emoji), which is fine.
    path.write_text('{"instruction": "smile \\ud83d\\ude00", "output": "x"}\n', encoding="utf-8")
    assert load_instruction_rows(str(path), start=0, rows=1)[0]["instruction"] == "smile \U0001f600"


def test_build_examples_rejects_a_lone_surrogate_before_the_tokenizer_sees_it():
    row = {"instruction": "fine", "input": "also \ud800 bad", "output": "x"}
    with pytest.raises(DataError, match=r"row 7 column 'input' holds a lone surrogate"):
        build_examples([row], build_byte_tokenizer(), seq_len=64, row_offset=7)


@pytest.mark.parametrize(("suffix", "where"), [(".jsonl", r"line 1 \(row 0\)"), (".json", "")])
def test_giant_number_is_a_data_error(tmp_path, suffix, where):
    path = tmp_path / f"d{suffix}"
    path.write_text('[{"instruction": "a", "output": ' + "9" * 5000 + "}]\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"d\{suffix} {where}\s?is not readable JSON: Exceeds the limit") as error:
        load_instruction_rows(str(path), start=0, rows=1)
    assert len(str(error.value)) < 300 and "\n" not in str(error.value)

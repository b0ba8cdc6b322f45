"""Data layer: loading slices, validation errors, prompt masking, batch order, collation and the spike batch.

The bundled data set itself is held to its card in tests/test_bundled_data.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from crma.ablation.data import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    BUNDLED_PATH,
    IGNORE_INDEX,
    DataError,
    Example,
    batch_order,
    build_example_set,
    build_examples,
    collate,
    corrupt_batch,
    format_example,
    load_instruction_rows,
    order_hash,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_byte_tokenizer(chat_template: str | None = None):
    """Byte-level BPE with no merges: 256 byte tokens + <pad>, <s>, </s> (259 ids), lossless, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_byte_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def bundled() -> list[dict]:
    return [json.loads(line) for line in BUNDLED_PATH.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_rows(n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Say the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"The number is {i}."}
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Loading slices
# ---------------------------------------------------------------------------------------------------------------------


def test_bundled_slice_matches_file(bundled):
    rows = load_instruction_rows("bundled", start=17, rows=9)
    assert rows == bundled[17:26]
    assert load_instruction_rows("bundled", start=len(bundled) - 3, rows=3) == bundled[-3:]


@pytest.mark.parametrize("suffix", [".jsonl", ".json-lines", ".json-list", ".csv"])
def test_local_file_slices_pick_exact_rows(tmp_path, suffix):
    data = sample_rows(12)
    if suffix == ".jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", data)
    elif suffix == ".json-lines":
        path = write_jsonl(tmp_path / "d.json", data)
    elif suffix == ".json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    else:
        path = tmp_path / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "extra"])
            writer.writeheader()
            writer.writerows([{**r, "extra": "ignored"} for r in data])
    rows = load_instruction_rows(str(path), start=3, rows=6)
    assert rows == data[3:9]
    assert all(list(r) == ["instruction", "input", "output"] for r in rows)


def test_missing_or_null_input_becomes_empty(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d", "text": "x"}],
    )
    assert load_instruction_rows(str(path), start=0, rows=2) == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": "d"},
    ]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("\ufeffinstruction,output\nhello,world\n", encoding="utf-8")  # BOM as spreadsheets write it
    assert load_instruction_rows(str(csv_path), start=0, rows=1) == [
        {"instruction": "hello", "input": "", "output": "world"}
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Every data error, with its message
# ---------------------------------------------------------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl.*'bundled', 'alpaca'"):
        load_instruction_rows(str(tmp_path / "nope.jsonl"), start=0, rows=1)


def test_error_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("instruction\toutput\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported data file extension '\.txt' .*d\.txt.*\.json, \.jsonl or \.csv"):
        load_instruction_rows(str(path), start=0, rows=1)


def test_error_directory(tmp_path):
    with pytest.raises(DataError, match="is not a file"):
        load_instruction_rows(str(tmp_path), start=0, rows=1)


def test_error_unparseable_jsonl_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl line 3 is not valid JSON"):
        load_instruction_rows(str(path), start=0, rows=2)
    # The bad line lies after a one-row slice, which is read without it.
    assert load_instruction_rows(str(path), start=0, rows=1) == [{"instruction": "a", "input": "", "output": "b"}]


def test_error_unparseable_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]', encoding="utf-8")
    # A .json file is parsed whole, so a broken array fails every slice, naming where json.loads stopped.
    for rows in (1, 2):
        with pytest.raises(DataError, match=r"/d\.json is not valid JSON: Expecting value at line 4 column 1$"):
            load_instruction_rows(str(path), start=0, rows=rows)


def test_error_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(DataError, match="must hold a list of objects"):
        load_instruction_rows(str(path), start=0, rows=1)


def test_error_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl is not UTF-8 text"):
        load_instruction_rows(str(path), start=0, rows=1)


def test_error_missing_columns_json_names_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"prompt": "a", "input": "x"}])
    with pytest.raises(
        DataError,
        match=r"row 1 is missing column\(s\) \['instruction', 'output'\]; it has "
        r"\['input', 'prompt'\]",
    ):
        load_instruction_rows(str(path), start=0, rows=2)


def test_error_missing_columns_csv_names_them(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,response\nhi,there\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"d\.csv is missing column\(s\) \['output'\]; its header has "
        r"\['instruction', 'response'\]",
    ):
        load_instruction_rows(str(path), start=0, rows=1)


def test_error_csv_ragged_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 3\) has more cells than the header's 2"):
        load_instruction_rows(str(path), start=0, rows=2)
    path.write_text("instruction,input,output\na,,b\nc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 3\) has fewer cells than the header's 3"):
        load_instruction_rows(str(path), start=0, rows=2)


@pytest.mark.parametrize("column", ["output", "instruction"])
def test_error_blank_required_value_names_row(tmp_path, column):
    data = sample_rows(6)
    data[4][column] = "   "
    path = write_jsonl(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError, match=rf"d\.jsonl row 4 has an empty '{column}'"):
        load_instruction_rows(str(path), start=2, rows=4)
    # Rows outside the slice are not validated: a bad row elsewhere does not block a good slice.
    assert load_instruction_rows(str(path), start=0, rows=4) == data[:4]


def test_error_non_string_value_names_row_and_column(tmp_path):
    data = sample_rows(3)
    data[2]["output"] = 42
    path = write_jsonl(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError, match=r"row 2 column 'output' must be a string; got int 42"):
        load_instruction_rows(str(path), start=0, rows=3)
    path = write_jsonl(tmp_path / "e.jsonl", ["not an object"])
    with pytest.raises(DataError, match=r"row 0 must be an object .* got str"):
        load_instruction_rows(str(path), start=0, rows=1)


def test_error_start_past_the_end(bundled):
    n = len(bundled)
    with pytest.raises(DataError, match=rf"start {n + 100} is past the end: the data set has {n} rows"):
        load_instruction_rows("bundled", start=n + 100, rows=5)


def test_error_slice_too_long_is_not_shortened(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(10))
    with pytest.raises(DataError, match=r"only 3 rows are available from start 7, the data set has 10 rows"):
        load_instruction_rows(str(path), start=7, rows=5)


@pytest.mark.parametrize("rows", [0, -2])
def test_error_zero_rows_selected(rows):
    with pytest.raises(DataError, match=rf"`rows` must be a positive integer .*got {rows}"):
        load_instruction_rows("bundled", start=0, rows=rows)


def test_error_negative_start():
    with pytest.raises(DataError, match=r"`start` must be an integer >= 0; got -1"):
        load_instruction_rows("bundled", start=-1, rows=1)


def test_error_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl has no rows"):
        load_instruction_rows(str(path), start=0, rows=1)


def test_error_alpaca_offline_suggests_bundled(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # conftest already sets HF_HUB_OFFLINE=1; patch the parsed flags too so this never touches the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = r"'alpaca' data set needs the Hugging Face Hub .*use 'bundled' or a local"
    with pytest.raises(DataError, match=expected) as e:
        load_instruction_rows("alpaca", start=0, rows=4)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# Formatting and tokenisation
# ---------------------------------------------------------------------------------------------------------------------


def test_format_alpaca_with_and_without_input(tok):
    prompt, response = format_example({"instruction": "Add.", "input": "2 and 3", "output": "5"}, tok)
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert response == "5"
    prompt, response = format_example({"instruction": "Say hi.", "input": "", "output": "Hi."}, tok)
    assert prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert prompt.startswith("Below is an instruction that describes a task. Write a response")
    assert prompt.endswith("### Response:\n") and "### Input:" not in prompt
    assert "{" not in ALPACA_PROMPT_WITH_INPUT.format(instruction="x", input="y")


def test_format_chat_when_the_tokenizer_has_a_template(chat_tok, tok):
    row = {"instruction": "Translate.", "input": "Good night.", "output": "Gute Nacht."}
    prompt, response = format_example(row, chat_tok)  # the chat template when the tokenizer has one
    assert prompt == "<|user|>\nTranslate.\n\nGood night.\n<|assistant|>\n"
    assert response == "Gute Nacht.</s>"
    assert format_example(row, tok) == (ALPACA_PROMPT_WITH_INPUT.format(**row), "Gute Nacht.")  # else Alpaca
    no_input = format_example({**row, "input": ""}, chat_tok)[0]
    assert no_input == "<|user|>\nTranslate.\n<|assistant|>\n"


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_tokens_carry_no_loss(tok, chat_tok, template):
    tokenizer = chat_tok if template == "chat" else tok
    rows = load_instruction_rows("bundled", start=0, rows=12)
    examples = build_examples(rows, tokenizer, seq_len=512)
    assert len(examples) == len(rows)
    for row, ex in zip(rows, examples, strict=True):
        prompt, _ = format_example(row, tokenizer)
        assert prompt.startswith("<|user|>" if template == "chat" else "Below is an instruction")
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert len(ex.input_ids) == len(ex.labels)
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        assert IGNORE_INDEX not in ex.labels[n_prompt:]
        assert ex.input_ids[-1] == tokenizer.eos_token_id
        # The loss tokens are exactly the output followed by one eos (the byte tokenizer is lossless).
        assert tokenizer.decode(ex.input_ids[n_prompt:]) == row["output"] + "</s>"
        assert ex.n_loss_tokens == len(ex.input_ids) - n_prompt
        assert tokenizer.decode(ex.input_ids[:n_prompt]) == prompt


def test_truncation_keeps_prompt_and_cuts_response(tok):
    row = {"instruction": "Count.", "input": "", "output": "abcdefghij" * 10}
    prompt, _ = format_example(row, tok)
    n_prompt = len(tok(prompt)["input_ids"])
    # 50 tokens beside the whole prompt: more than the quarter of seq_len a cut prompt must leave, so only the
    # response is cut.
    seq_len = n_prompt + 50
    assert seq_len // 4 <= 50
    fitted = build_example_set([row], tok, seq_len=seq_len, row_offset=3)
    (ex,) = fitted.examples
    assert (fitted.prompts_truncated, fitted.responses_truncated) == ([], [3])
    assert len(ex.input_ids) == seq_len
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]) == row["output"][:50]
    assert ex.n_loss_tokens == 50


def test_existing_eos_is_not_doubled(chat_tok):
    (ex,) = build_examples([{"instruction": "a", "input": "", "output": "b"}], chat_tok, seq_len=64)
    assert ex.input_ids[-2:] != [chat_tok.eos_token_id] * 2
    assert ex.input_ids[-1] == chat_tok.eos_token_id and ex.n_loss_tokens == 2  # "b" + eos


# ---------------------------------------------------------------------------------------------------------------------
# Batch order, collation, corruption
# ---------------------------------------------------------------------------------------------------------------------


def test_batch_order_deterministic_and_independent_of_global_rng():
    torch.manual_seed(123)
    a = batch_order(10, batch_size=3, steps=7, seed=42)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = batch_order(10, batch_size=3, steps=7, seed=42)
    assert a == b
    torch.manual_seed(123)
    batch_order(10, batch_size=3, steps=7, seed=42)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG did not advance
    assert batch_order(10, batch_size=3, steps=7, seed=43) != a
    assert order_hash(a) == order_hash(b) and order_hash(a) != order_hash(
        batch_order(10, batch_size=3, steps=7, seed=43)
    )


def test_batch_order_covers_each_epoch():
    order = batch_order(8, batch_size=4, steps=6, seed=0)  # 3 epochs of 8
    assert len(order) == 6 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    for epoch in range(3):
        chunk = flat[epoch * 8 : (epoch + 1) * 8]
        assert sorted(chunk) == list(range(8))
        expected = torch.randperm(8, generator=torch.Generator().manual_seed(0 + epoch)).tolist()
        assert chunk == expected
    assert flat[:8] != flat[8:16]  # a fresh permutation per epoch
    # A batch may straddle an epoch boundary: the stream is simply chunked.
    straddle = batch_order(5, batch_size=3, steps=4, seed=1)
    assert [i for b in straddle for i in b][:10] == (
        torch.randperm(5, generator=torch.Generator().manual_seed(1)).tolist()
        + torch.randperm(5, generator=torch.Generator().manual_seed(2)).tolist()
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_examples=0, batch_size=2, steps=1),
        dict(n_examples=4, batch_size=0, steps=1),
        dict(n_examples=4, batch_size=2, steps=0),
    ],
)
def test_batch_order_rejects_non_positive(kwargs):
    name = next(k for k, v in kwargs.items() if v == 0)
    with pytest.raises(DataError, match=rf"`{name}` must be a positive integer; got 0"):
        batch_order(seed=0, **kwargs)


def test_order_hash_is_sha256_of_the_order():
    import hashlib

    order = [[1, 2], [0, 3]]
    assert order_hash(order) == hashlib.sha256(b"[[1,2],[0,3]]").hexdigest()
    assert order_hash([[2, 1], [0, 3]]) != order_hash(order)


def test_collate_pads_right():
    examples = [
        Example([5, 6, 7], [IGNORE_INDEX, 6, 7]),
        Example([8, 9], [IGNORE_INDEX, 9]),
        Example([1, 2, 3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5]),
    ]
    batch = collate(examples, [1, 2, 0], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[8, 9, 0, 0, 0], [1, 2, 3, 4, 5], [5, 6, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 9, -100, -100, -100], [-100, -100, 3, 4, 5], [-100, 6, 7, -100, -100]]
    with pytest.raises(DataError, match="at least one example index"):
        collate(examples, [], pad_id=0)
    with pytest.raises(DataError, match=r"batch indices \[3\] are out of range for 3 examples"):
        collate(examples, [0, 3], pad_id=0)


def test_corrupt_batch_is_deterministic_and_does_not_mutate(tok):
    rows = load_instruction_rows("bundled", start=0, rows=4)
    examples = build_examples(rows, tok, seq_len=512)
    batch = collate(examples, [0, 1, 2, 3], pad_id=tok.pad_token_id)
    before = {k: v.clone() for k, v in batch.items()}
    torch.manual_seed(1)
    a = corrupt_batch(batch, vocab_size=len(tok), seed=7)
    torch.manual_seed(2)
    b = corrupt_batch(batch, vocab_size=len(tok), seed=7)
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # input untouched
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical for every arm, whatever the global RNG
    c = corrupt_batch(batch, vocab_size=len(tok), seed=8)
    assert not torch.equal(a["input_ids"], c["input_ids"])

    loss = batch["labels"] != IGNORE_INDEX
    assert torch.equal(a["attention_mask"], batch["attention_mask"])
    assert torch.equal(a["labels"] != IGNORE_INDEX, loss)  # same loss positions
    assert torch.equal(a["input_ids"][~loss], batch["input_ids"][~loss])  # prompt and padding kept
    assert torch.equal(a["labels"][loss], a["input_ids"][loss])  # labels follow the new inputs
    assert (a["input_ids"][loss] != batch["input_ids"][loss]).float().mean() > 0.9
    assert int(a["input_ids"].max()) < len(tok) and int(a["input_ids"].min()) >= 0


def test_pipeline_feeds_a_causal_lm(chat_tok):
    from conftest import make_tiny_llama

    tok = chat_tok
    model = make_tiny_llama(vocab=len(tok))
    # Byte-level tokens are long: keep rows whose chat prompt fits the tiny model's 128 positions.
    rows = [r for r in load_instruction_rows("bundled", start=0, rows=60) if len(r["instruction"] + r["input"]) < 80]
    examples = build_examples(rows[:6], tok, seq_len=128)
    order = batch_order(len(examples), batch_size=2, steps=3, seed=42)
    batch = collate(examples, order[0], pad_id=tok.pad_token_id)
    with torch.no_grad():
        clean = model(**batch).loss
        spiked = model(**corrupt_batch(batch, vocab_size=len(tok), seed=42)).loss
    assert torch.isfinite(clean) and torch.isfinite(spiked)
    # The model's loss is the mean over exactly the loss-bearing tokens (labels shifted inside the model).
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(clean, manual)

"""Fitting rows into seq_len: long prompts lose their beginning, long responses their end, and both are counted.

The byte tokenizer spends one token per UTF-8 byte (and one per special-token text such as "<s>"), so every expected
count below is computed from text lengths alone, independently of the tokenizer and of `build_example_set`.
"""

from __future__ import annotations

import re

import pytest
import torch

from crma.ablation.data import (
    BUNDLED_PATH,
    IGNORE_INDEX,
    DataError,
    ExampleSet,
    batch_order,
    build_example_set,
    build_examples,
    collate,
    format_example,
    load_instruction_rows,
)
from crma.ablation.models import build_byte_tokenizer

SPECIAL = re.compile(r"<s>|</s>|<pad>")


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()  # with a chat template


@pytest.fixture(scope="module")
def alpaca_tok():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None  # so rows get the Alpaca prompt
    return tokenizer


@pytest.fixture(scope="module")
def bundled_rows() -> list[dict[str, str]]:
    n = sum(1 for line in BUNDLED_PATH.read_text(encoding="utf-8").splitlines() if line.strip())
    return load_instruction_rows("bundled", start=0, rows=n)


def n_tokens(text: str) -> int:
    """Byte-tokenizer length from the text: each special-token text is one token, everything else one per byte."""
    return len(SPECIAL.sub("", text).encode("utf-8")) + len(SPECIAL.findall(text))


def expected_fit(rows, tok, *, seq_len: int, offset: int = 0) -> dict[str, list[int]]:
    m_default = max(1, seq_len // 4)
    out: dict[str, list[int]] = {"prompt_cut": [], "kept": [], "response_cut": []}
    for i, row in enumerate(rows):
        prompt, response = format_example(row, tok)
        p = n_tokens(prompt)
        r = n_tokens(response) + (0 if response.endswith("</s>") else 1)  # eos appended when missing
        need = min(r, m_default)
        if p + need > seq_len:
            out["prompt_cut"].append(offset + i)
            out["kept"].append(seq_len - need)
            if r > need:
                out["response_cut"].append(offset + i)
        elif p + r > seq_len:
            out["response_cut"].append(offset + i)
    return out


@pytest.mark.parametrize("seq_len", [128, 256])
@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_bundled_data_fits_with_exact_counts(tok, alpaca_tok, bundled_rows, seq_len, template):
    tok = tok if template == "chat" else alpaca_tok
    fitted = build_example_set(bundled_rows, tok, seq_len=seq_len, row_offset=3)
    expected = expected_fit(bundled_rows, tok, seq_len=seq_len, offset=3)
    assert fitted.prompts_truncated == expected["prompt_cut"]
    assert fitted.prompt_tokens_kept == expected["kept"]
    assert fitted.responses_truncated == expected["response_cut"]
    assert len(fitted.examples) == len(bundled_rows) and fitted.row_numbers == list(range(3, 3 + len(bundled_rows)))
    # The data really has long rows at these lengths (the bug this guards against), so the counts are not vacuous.
    if seq_len == 128 or template == "alpaca":
        assert fitted.prompts_truncated
    m = seq_len // 4
    for number, example in zip(fitted.row_numbers, fitted.examples, strict=True):
        row = bundled_rows[number - 3]
        prompt, response = format_example(row, tok)
        n_prompt = sum(1 for label in example.labels if label == IGNORE_INDEX)
        assert len(example.input_ids) == len(example.labels) <= seq_len
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the prompt is one block, then the response
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        response_text = response if response.endswith("</s>") else response + "</s>"
        assert example.n_loss_tokens >= min(n_tokens(response_text), m)
        # Compared as token ids: a cut may split a multi-byte character, which would not decode.
        response_ids = tok(response_text, add_special_tokens=False)["input_ids"]
        assert example.input_ids[n_prompt:] == response_ids[: len(example.input_ids) - n_prompt]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        kept = example.input_ids[:n_prompt]
        if number in fitted.prompts_truncated:
            # The end of the prompt survives; a leading bos ("<s>" in the chat template) stays in front.
            if prompt.startswith("<s>"):
                assert kept[0] == tok.bos_token_id and prompt_ids[-(n_prompt - 1) :] == kept[1:]
            else:
                assert prompt_ids[-n_prompt:] == kept
        else:
            assert kept == prompt_ids


def test_the_tiny_random_preset_trains_on_the_bundled_data_at_seq_len_128(tok, bundled_rows):
    from crma.ablation.models import load_model

    loaded = load_model("tiny-random", device="cpu", dtype="float32")
    examples = build_examples(bundled_rows, loaded.tokenizer, seq_len=128)
    assert len(examples) == len(bundled_rows)
    order = batch_order(len(examples), batch_size=4, steps=1, seed=0)
    # Row 7 of the bundled set is one whose prompt alone was too long at seq_len 128 before truncation existed.
    batch = collate(examples, [7, *order[0][:3]], pad_id=loaded.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] <= 128
    with torch.no_grad():
        loss = loaded.model(**batch).loss
    assert torch.isfinite(loss)


def test_short_response_lets_the_prompt_keep_more(alpaca_tok):
    tok = alpaca_tok
    row = {"instruction": "q" * 300, "input": "", "output": "ok"}  # response "ok" + eos = 3 tokens
    fitted = build_example_set([row], tok, seq_len=100)
    (example,) = fitted.examples
    assert fitted.prompt_tokens_kept == [97] and fitted.responses_truncated == []
    assert len(example.input_ids) == 100 and example.n_loss_tokens == 3
    assert tok.decode(example.input_ids[:97]).endswith("q\n\n### Response:\n")
    # A long response gets a quarter of seq_len: 25 tokens, so the prompt keeps 75.
    long_row = {**row, "output": "z" * 80}
    fitted = build_example_set([long_row], tok, seq_len=100)
    assert fitted.prompt_tokens_kept == [75] and fitted.responses_truncated == [0]
    assert fitted.examples[0].n_loss_tokens == 25
    # At the smallest seq_len the share is still one token.
    (tiny,) = build_example_set([long_row], tok, seq_len=2).examples
    assert tiny.n_loss_tokens == 1 and len(tiny.input_ids) == 2 and tok.decode(tiny.input_ids) == "\nz"


def test_notes_and_summary(tok):
    rows = [{"instruction": "q" * (150 + i), "input": "", "output": "a" * 60} for i in range(8)]
    rows += [{"instruction": "short", "input": "", "output": "b"} for _ in range(4)]
    fitted = build_example_set(rows, tok, seq_len=128, row_offset=10)  # chat: a 19-token frame around the instruction
    assert fitted.notes() == [
        "8 of 12 prompts were cut to their last 96 tokens to fit seq_len 128 (rows 10, 11, 12, 13, 14 and 3 more)",
        "8 of 12 responses were cut at seq_len 128, losing their end and eos (rows 10, 11, 12, 13, 14 and 3 more)",
    ]
    assert fitted.to_dict(max_rows=2) == {
        "rows": 12,
        "seq_len": 128,
        "prompts_truncated": 8,
        "responses_truncated": 8,
        "prompts_truncated_rows": [10, 11],
        "responses_truncated_rows": [10, 11],
    }
    fits = build_example_set(rows[8:], tok, seq_len=128)
    assert isinstance(fits, ExampleSet) and fits.notes() == [] and len(fits.examples) == 4


def test_arguments_are_validated(tok):
    row = [{"instruction": "a", "input": "", "output": "b"}]
    for bad in (1, 0, 1.5, True):
        with pytest.raises(DataError, match=r"^`seq_len` must be an integer >= 2; got "):
            build_example_set(row, tok, seq_len=bad)
    no_eos = build_byte_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(DataError, match=r"^the tokenizer has no eos token"):
        build_example_set(row, no_eos, seq_len=32)
    assert build_example_set([], tok, seq_len=32).to_dict()["rows"] == 0

"""Prompt templates and tokenisation: rows become `Example`s of at most `seq_len` tokens with loss on the response.

The prompt is the tokenizer's chat template when it has one, else the Stanford Alpaca prompt. A row whose prompt is
too long for `seq_len` does not sink a run: the prompt loses its beginning (the end, next to the response, is what the
response depends on), and `ExampleSet` records what was cut so the run's notes and the preview can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..spec.config import MIN_SEQ_LEN
from .errors import DataError, check_text

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF causal LMs) skip

# The prompts of the Stanford Alpaca release, so models tuned on Alpaca see the format they expect.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_ROWS_SHOWN = 5  # row numbers a note lists before "and N more"


def _min_response_tokens(seq_len: int) -> int:
    # Response tokens a row keeps when its prompt is cut. A quarter keeps a cut row worth training on (32 loss tokens
    # at seq_len 128, more than most bundled responses need whole) while the prompt keeps three quarters, its end,
    # where the question sits.
    return max(1, seq_len // 4)


@dataclass
class Example:
    """One tokenised row.

    Args:
        input_ids (`list[int]`): prompt tokens then response tokens (ending in eos unless truncated), at most
            `seq_len` long.
        labels (`list[int]`): `IGNORE_INDEX` on every prompt token, the token id itself on response tokens (HF causal
            LMs shift labels internally).
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        """Number of tokens that carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class ExampleSet:
    """The examples of a slice and what fitting them into `seq_len` did to its rows.

    Args:
        examples (`list[Example]`): one per row, in row order.
        row_numbers (`list[int]`): the data set row number of each example (`row_offset` + position in `rows`).
        seq_len (`int`): the token budget per example.
        prompts_truncated (`list[int]`): row numbers whose prompt lost its beginning.
        prompt_tokens_kept (`list[int]`): for each of those rows, how many prompt tokens remain.
        responses_truncated (`list[int]`): row numbers whose response (with its eos) was cut at `seq_len`.
    """

    examples: list[Example]
    row_numbers: list[int]
    seq_len: int
    prompts_truncated: list[int] = field(default_factory=list)
    prompt_tokens_kept: list[int] = field(default_factory=list)
    responses_truncated: list[int] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One sentence per kind of cut, for a run's notes and the data preview; empty when every row fit whole.

        Returns:
            `list[str]`: e.g. `"12 of 200 prompts were cut to their last 96 tokens to fit seq_len 128 (rows 7, 72,
            ... and 7 more)"`.
        """
        notes = []
        of = f"of {len(self.examples)}"
        if self.prompts_truncated:
            low, high = min(self.prompt_tokens_kept), max(self.prompt_tokens_kept)
            kept = f"{low}" if low == high else f"{low}-{high}"
            notes.append(
                f"{len(self.prompts_truncated)} {of} prompts were cut to their last {kept} tokens to fit seq_len "
                f"{self.seq_len} ({_rows_text(self.prompts_truncated)})"
            )
        if self.responses_truncated:
            notes.append(
                f"{len(self.responses_truncated)} {of} responses were cut at seq_len {self.seq_len}, losing their "
                f"end and eos ({_rows_text(self.responses_truncated)})"
            )
        return notes

    def to_dict(self, max_rows: int = 20) -> dict[str, Any]:
        """Counts and the first `max_rows` row numbers of each cut, JSON-ready (for `summary.json`)."""
        return {
            "rows": len(self.examples),
            "seq_len": self.seq_len,
            "prompts_truncated": len(self.prompts_truncated),
            "responses_truncated": len(self.responses_truncated),
            "prompts_truncated_rows": self.prompts_truncated[:max_rows],
            "responses_truncated_rows": self.responses_truncated[:max_rows],
        }


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:_ROWS_SHOWN]))
    more = f" and {len(rows) - _ROWS_SHOWN} more" if len(rows) > _ROWS_SHOWN else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_example(row: dict[str, str], tokenizer: Any) -> tuple[str, str]:
    """Split one row into the prompt text (no loss) and the response text (the loss target).

    With a tokenizer that has a chat template, the prompt is one user turn `instruction + "\\n\\n" + input` with the
    generation prompt; otherwise it is the Stanford Alpaca prompt, with or without an Input section.

    Args:
        row (`dict[str, str]`): a row from `load_instruction_rows`.
        tokenizer: a Hugging Face tokenizer (its `chat_template` and `eos_token` are used).

    Returns:
        `tuple[str, str]`: `(prompt_text, response_text)`. With a chat template the response ends with the eos token
        text; with the Alpaca prompt it is the bare output (`build_example_set` appends the eos id either way).
    """
    instruction, extra, output = row["instruction"], row.get("input", "") or "", row["output"]
    if _uses_chat_template(tokenizer):
        user = f"{instruction}\n\n{extra}" if extra else instruction
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return prompt, output + (tokenizer.eos_token or "")
    if extra:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra), output
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), output


def prompt_token_ids(row: dict[str, str], tokenizer: Any) -> list[int]:
    """The prompt of `row` as training tokenises it (`format_example`; the tokenizer's special tokens only where no
    chat template wrote its own), whole: what a model is asked when it answers the row."""
    prompt, _ = format_example(row, tokenizer)
    return list(tokenizer(prompt, add_special_tokens=not _uses_chat_template(tokenizer))["input_ids"])


def build_example_set(
    rows: Sequence[dict[str, str]], tokenizer: Any, *, seq_len: int, row_offset: int = 0
) -> ExampleSet:
    """Tokenise rows with the loss on response tokens only, fitting each into `seq_len`, and report what was cut.

    The prompt and the response are tokenised separately so the boundary between them is exact, then concatenated;
    an eos id is appended if the response does not end with one. A row needs its prompt plus
    `r = min(response length, max(1, seq_len // 4))` tokens. When it has them, only the response is cut (at
    `seq_len`) if the row is longer. When it has not, the prompt keeps its last `seq_len - r` tokens (a leading bos
    token stays in front), so the row still trains on `r` response tokens.

    Args:
        rows (`Sequence[dict[str, str]]`): rows from `load_instruction_rows`.
        tokenizer: a Hugging Face tokenizer with an eos token.
        seq_len (`int`): maximum tokens per example.
        row_offset (`int`): added to row numbers in messages and records (pass the slice's `start`).

    Returns:
        `ExampleSet`: the examples (`labels == IGNORE_INDEX` exactly on the prompt tokens), their row numbers and the
        rows whose prompt or response was cut.

    Raises:
        `DataError`: a `seq_len` under 2, a tokenizer without an eos token, or a row text that is not valid Unicode.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise DataError(f"`seq_len` must be an integer >= {MIN_SEQ_LEN}; got {seq_len!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token, so responses cannot be terminated; set `tokenizer.eos_token`")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    min_response = _min_response_tokens(seq_len)
    result = ExampleSet(examples=[], row_numbers=[], seq_len=seq_len)
    for i, row in enumerate(rows):
        number = row_offset + i
        for column in ("instruction", "input", "output"):
            if isinstance(row.get(column), str):
                check_text(row[column], f"row {number} column '{column}'")
        _, response = format_example(row, tokenizer)
        prompt_ids = prompt_token_ids(row, tokenizer)
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if not response_ids or response_ids[-1] != eos_id:
            response_ids.append(eos_id)
        budget = seq_len - min(len(response_ids), min_response)  # prompt tokens that leave the response its share
        if len(prompt_ids) > budget:
            if bos_id is not None and prompt_ids[0] == bos_id and budget >= 2:
                prompt_ids = [bos_id, *prompt_ids[len(prompt_ids) - budget + 1 :]]
            else:
                prompt_ids = prompt_ids[len(prompt_ids) - budget :]
            result.prompts_truncated.append(number)
            result.prompt_tokens_kept.append(len(prompt_ids))
        if len(prompt_ids) + len(response_ids) > seq_len:
            result.responses_truncated.append(number)
        input_ids = (prompt_ids + response_ids)[:seq_len]
        labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
        result.examples.append(Example(input_ids=input_ids, labels=labels))
        result.row_numbers.append(number)
    return result


def build_examples(
    rows: Sequence[dict[str, str]], tokenizer: Any, *, seq_len: int, row_offset: int = 0
) -> list[Example]:
    """The examples of `build_example_set` alone (same arguments), for callers that need no record of what was cut."""
    return build_example_set(rows, tokenizer, seq_len=seq_len, row_offset=row_offset).examples

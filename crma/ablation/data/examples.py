"""Prompt templates and tokenisation: rows become `Example`s of at most `seq_len` tokens with loss on the response.

A row whose prompt is too long for `seq_len` does not sink a run: by default the prompt loses its beginning (the end,
next to the response, is what the response depends on), and `ExampleSet` records what was cut or dropped so the
run's notes and the preview can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import DataError, check_text, short_repr

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF causal LMs) skip

Template = Literal["alpaca", "chat", "auto"]
LongPrompt = Literal["truncate", "drop", "error"]
LONG_PROMPT_POLICIES = ("truncate", "drop", "error")

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
        examples (`list[Example]`): one per kept row, in row order.
        row_numbers (`list[int]`): the data set row number of each example (`row_offset` + position in `rows`).
        n_rows (`int`): rows given, kept or not.
        seq_len (`int`): the token budget per example.
        min_response_tokens (`int`): response tokens a row keeps when its prompt is cut (fewer if the whole response,
            eos included, is shorter).
        long_prompt (`str`): the policy applied (`truncate`, `drop` or `error`).
        prompts_truncated (`list[int]`): row numbers whose prompt lost its beginning.
        prompt_tokens_kept (`list[int]`): for each of those rows, how many prompt tokens remain.
        responses_truncated (`list[int]`): row numbers whose response (with its eos) was cut at `seq_len`.
        dropped (`list[int]`): row numbers left out (policy `drop`).
    """

    examples: list[Example]
    row_numbers: list[int]
    n_rows: int
    seq_len: int
    min_response_tokens: int
    long_prompt: LongPrompt
    prompts_truncated: list[int] = field(default_factory=list)
    prompt_tokens_kept: list[int] = field(default_factory=list)
    responses_truncated: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One sentence per kind of change, for a run's notes and the data preview; empty when every row fit whole.

        Returns:
            `list[str]`: e.g. `"12 of 200 prompts were cut to their last 96 tokens to fit seq_len 128 (rows 7, 72,
            ... and 7 more)"`.
        """
        notes = []
        of = f"of {self.n_rows}"
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
        if self.dropped:
            notes.append(
                f"{len(self.dropped)} {of} rows were dropped: their prompt leaves fewer than "
                f"{self.min_response_tokens} response tokens within seq_len {self.seq_len} "
                f"({_rows_text(self.dropped)})"
            )
        return notes

    def to_dict(self, max_rows: int = 20) -> dict[str, Any]:
        """Counts and the first `max_rows` row numbers of each change, JSON-ready (for `summary.json`)."""
        return {
            "rows": self.n_rows,
            "examples": len(self.examples),
            "seq_len": self.seq_len,
            "min_response_tokens": self.min_response_tokens,
            "long_prompt": self.long_prompt,
            "prompts_truncated": len(self.prompts_truncated),
            "responses_truncated": len(self.responses_truncated),
            "dropped": len(self.dropped),
            "prompts_truncated_rows": self.prompts_truncated[:max_rows],
            "responses_truncated_rows": self.responses_truncated[:max_rows],
            "dropped_rows": self.dropped[:max_rows],
        }


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:_ROWS_SHOWN]))
    more = f" and {len(rows) - _ROWS_SHOWN} more" if len(rows) > _ROWS_SHOWN else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _resolve_template(tokenizer: Any, template: str) -> Literal["alpaca", "chat"]:
    if template not in ("alpaca", "chat", "auto"):
        raise DataError(f"`template` must be 'alpaca', 'chat' or 'auto'; got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise DataError(
            "template 'chat' needs a tokenizer with a `chat_template`, and this one has none; use 'alpaca' or 'auto'"
        )
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    return template  # type: ignore[return-value]


def format_example(row: dict[str, str], tokenizer: Any, *, template: Template = "auto") -> tuple[str, str]:
    """Split one row into the prompt text (no loss) and the response text (the loss target).

    Args:
        row (`dict[str, str]`): a row from `load_instruction_rows`.
        tokenizer: a Hugging Face tokenizer (its `chat_template` and `eos_token` are used).
        template (`str`): `alpaca` (the Stanford Alpaca prompt, with or without an Input section), `chat` (the
            tokenizer's chat template: one user turn `instruction + "\\n\\n" + input`, with the generation prompt) or
            `auto` (`chat` when the tokenizer has a chat template, else `alpaca`).

    Returns:
        `tuple[str, str]`: `(prompt_text, response_text)`. For `chat` the response ends with the eos token text; for
        `alpaca` it is the bare output (`build_examples` appends the eos id either way).
    """
    kind = _resolve_template(tokenizer, template)
    instruction, extra, output = row["instruction"], row.get("input", "") or "", row["output"]
    if kind == "chat":
        user = f"{instruction}\n\n{extra}" if extra else instruction
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return prompt, output + (tokenizer.eos_token or "")
    if extra:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra), output
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), output


def build_example_set(
    rows: Sequence[dict[str, str]],
    tokenizer: Any,
    *,
    seq_len: int,
    template: Template = "auto",
    row_offset: int = 0,
    long_prompt: LongPrompt = "truncate",
    min_response_tokens: int | None = None,
) -> ExampleSet:
    """Tokenise rows with the loss on response tokens only, fitting each into `seq_len`, and report what was cut.

    The prompt and the response are tokenised separately so the boundary between them is exact, then concatenated;
    an eos id is appended if the response does not end with one. A row needs its prompt plus
    `r = min(response length, min_response_tokens)` tokens. When it has them, only the response is cut (at
    `seq_len`) if the row is longer. When it has not, the prompt is *long* and `long_prompt` decides:

    - `truncate`: the prompt keeps its last `seq_len - r` tokens (a leading bos token stays in front), so the row
      still trains on `r` response tokens;
    - `drop`: the row is left out (a `DataError` if no row is left);
    - `error`: a `DataError` naming the row and the `seq_len` it needs.

    Args:
        rows (`Sequence[dict[str, str]]`): rows from `load_instruction_rows`.
        tokenizer: a Hugging Face tokenizer with an eos token.
        seq_len (`int`): maximum tokens per example.
        template (`str`): see `format_example`.
        row_offset (`int`): added to row numbers in messages and records (pass the slice's `start`).
        long_prompt (`str`): `truncate` (default), `drop` or `error`, as above.
        min_response_tokens (`int | None`): the `r` above; default `seq_len // 4` (at least 1). A quarter keeps a
            cut row worth training on (32 loss tokens at seq_len 128, more than most bundled responses need whole)
            while the prompt keeps three quarters, its end, where the question sits.

    Returns:
        `ExampleSet`: the examples (`labels == IGNORE_INDEX` exactly on the prompt tokens), their row numbers and the
        counts of truncated and dropped rows.

    Raises:
        `DataError`: a bad argument, a row text that is not valid Unicode, a long prompt under `error`, or every row
        dropped under `drop`.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"`seq_len` must be an integer >= 2; got {seq_len!r}")
    if long_prompt not in LONG_PROMPT_POLICIES:
        raise DataError(f"`long_prompt` must be 'truncate', 'drop' or 'error'; got {long_prompt!r}")
    if min_response_tokens is None:
        min_response_tokens = max(1, seq_len // 4)
    elif (
        isinstance(min_response_tokens, bool)
        or not isinstance(min_response_tokens, int)
        or not 1 <= min_response_tokens < seq_len
    ):
        raise DataError(
            f"`min_response_tokens` must be an integer from 1 to seq_len - 1 ({seq_len - 1}); "
            f"got {min_response_tokens!r}"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token, so responses cannot be terminated; set `tokenizer.eos_token`")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    kind = _resolve_template(tokenizer, template)
    result = ExampleSet(
        examples=[],
        row_numbers=[],
        n_rows=len(rows),
        seq_len=seq_len,
        min_response_tokens=min_response_tokens,
        long_prompt=long_prompt,
    )
    for i, row in enumerate(rows):
        number = row_offset + i
        for column in ("instruction", "input", "output"):
            if isinstance(row.get(column), str):
                check_text(row[column], f"row {number} column '{column}'")
        prompt, response = format_example(row, tokenizer, template=kind)
        # A chat template already writes its own bos/special tokens; the Alpaca prompt gets the tokenizer's (e.g. bos).
        prompt_ids = list(tokenizer(prompt, add_special_tokens=kind == "alpaca")["input_ids"])
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if not response_ids or response_ids[-1] != eos_id:
            response_ids.append(eos_id)
        needed = min(len(response_ids), min_response_tokens)
        budget = seq_len - needed  # prompt tokens that still leave the row `needed` response tokens
        if len(prompt_ids) > budget:
            if long_prompt == "error":
                raise DataError(_long_prompt_message(row, number, len(prompt_ids), needed, seq_len))
            if long_prompt == "drop":
                result.dropped.append(number)
                continue
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
    if rows and not result.examples:
        raise DataError(
            f"all {len(rows)} rows were dropped: every prompt leaves fewer than {min_response_tokens} response tokens "
            f"within seq_len {seq_len}; raise seq_len or use long_prompt='truncate'"
        )
    return result


def _long_prompt_message(row: dict[str, str], number: int, n_prompt: int, needed: int, seq_len: int) -> str:
    room = "no response token" if n_prompt >= seq_len else f"only {seq_len - n_prompt} of the {needed} response tokens"
    return (
        f"row {number} (instruction {short_repr(row['instruction'])}) has a {n_prompt}-token prompt, so seq_len "
        f"{seq_len} leaves it {room} to learn from; use seq_len >= {n_prompt + needed}, or long_prompt='truncate' "
        "or 'drop'"
    )


def build_examples(
    rows: Sequence[dict[str, str]],
    tokenizer: Any,
    *,
    seq_len: int,
    template: Template = "auto",
    row_offset: int = 0,
    long_prompt: LongPrompt = "truncate",
    min_response_tokens: int | None = None,
) -> list[Example]:
    """The examples of `build_example_set` alone (same arguments), for callers that need no record of what was cut.

    Returns:
        `list[Example]`: one per kept row.
    """
    return build_example_set(
        rows,
        tokenizer,
        seq_len=seq_len,
        template=template,
        row_offset=row_offset,
        long_prompt=long_prompt,
        min_response_tokens=min_response_tokens,
    ).examples

"""Data layer of the ablation engine: one slice of instruction rows, tokenised once and fed to every arm in lockstep.

The pieces, in the order the runner uses them:
    rows = load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows)     # validated Alpaca-schema dicts
    examples = build_examples(rows, tokenizer, seq_len=cfg.seq_len)                # loss on response tokens only
    order = batch_order(len(examples), batch_size=..., steps=..., seed=...)        # same order for every arm
    batch = collate(examples, order[step], pad_id=tokenizer.pad_token_id)          # right-padded LongTensors
    batch = corrupt_batch(batch, vocab_size=..., seed=...)                         # only at the stress step

Every data problem raises `DataError` (a `ValueError`) with a one-line message naming the file, row and column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

BUNDLED_PATH = Path(__file__).resolve().parents[2] / "assets" / "bundled_instructions.jsonl"
ALPACA_REPO = "tatsu-lab/alpaca"
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF causal LMs) skip
REQUIRED_COLUMNS = ("instruction", "output")
COLUMNS = ("instruction", "input", "output")
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv")

Template = Literal["alpaca", "chat", "auto"]

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


class DataError(ValueError):
    """A data set, row or batch problem; the message is one line naming the file, row and column."""


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


# --------------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------------


def load_instruction_rows(source: str, *, start: int, rows: int) -> list[dict[str, str]]:
    """Load rows `[start, start + rows)` of an instruction data set in the Alpaca schema.

    Args:
        source (`str`): `"bundled"` (the project's own `assets/bundled_instructions.jsonl`), `"alpaca"` (the Hub data
            set `tatsu-lab/alpaca`, split `train`; needs the Hub or its local cache), or a path to a local `.json` (a
            list of objects, or JSON lines), `.jsonl` or `.csv` file.
        start (`int`): first row, 0-based.
        rows (`int`): number of rows; the slice must fit inside the data set (it is never silently shortened).

    Returns:
        `list[dict[str, str]]`: each dict has exactly the keys `instruction`, `input` (`""` when the file has none)
        and `output`.

    Raises:
        `DataError`: missing or unreadable file, unsupported extension, missing columns, empty or non-string values
        in the selected rows, or a slice that does not fit.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise DataError(f"`start` must be an integer >= 0; got {start!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        raise DataError(f"`rows` must be a positive integer (zero rows selected); got {rows!r}")
    if not isinstance(source, str) or not source.strip():
        raise DataError(
            f"the data set must be 'bundled', 'alpaca' or a path to a .json/.jsonl/.csv file; got {source!r}"
        )

    key = source.strip()
    if key.lower() == "alpaca" or key == ALPACA_REPO:
        return _load_alpaca(start, rows)
    if key.lower() == "bundled":
        path, name = BUNDLED_PATH, f"bundled data set {BUNDLED_PATH}"
        if not path.is_file():
            raise DataError(f"{name} is missing: run `python scripts/make_bundled_dataset.py` to write it")
    else:
        path, name = Path(key).expanduser(), key
        if not path.exists():
            raise DataError(
                f"data file not found: {key!r} (the data set must be 'bundled', 'alpaca', or a path to a .json, "
                ".jsonl or .csv file)"
            )
        if not path.is_file():
            raise DataError(f"data path {key!r} is not a file")
    records = _read_records(path, name)
    _check_slice(len(records), start, rows, name)
    return [_validate_row(records[i], i, name) for i in range(start, start + rows)]


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
        raise DataError(f"{name} row {index} is missing column(s) {missing}; it has {sorted(map(str, record))}")
    row = {c: record.get(c) for c in COLUMNS}
    if row["input"] is None:  # a missing or null `input` means "no input", as in Alpaca
        row["input"] = ""
    for column, value in row.items():
        if not isinstance(value, str):
            raise DataError(
                f"{name} row {index} column '{column}' must be a string; got {type(value).__name__} {_short(value)}"
            )
    for column in REQUIRED_COLUMNS:
        if not row[column].strip():
            raise DataError(f"{name} row {index} has an empty '{column}'")
    return row


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_records(path: Path, name: str) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported data file extension {path.suffix!r} for {name}: use .json, .jsonl or .csv")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if suffix == ".csv":
        return _parse_csv(text, name)
    if suffix == ".jsonl":
        return _parse_json_lines(text, name)
    return _parse_json(text, name)


def _parse_json_lines(text: str, name: str) -> list[Any]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {line_no} is not valid JSON: {exc.msg} (column {exc.colno})") from exc
    return records


def _parse_json(text: str, name: str) -> list[Any]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # "Extra data" after a complete first value means one object per line: JSON lines in a .json file.
        if exc.msg == "Extra data":
            return _parse_json_lines(text, name)
        raise DataError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if isinstance(data, dict):
        return [data]  # a single object on one line is a one-row JSON lines file
    if not isinstance(data, list):
        raise DataError(f"{name} must hold a list of objects (or JSON lines); got a JSON {type(data).__name__}")
    return data


def _parse_csv(text: str, name: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
        if not header:
            return []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{name} is missing column(s) {missing}; its header has {list(header)}")
        records = []
        for index, record in enumerate(reader):
            # DictReader puts surplus cells under the key None and fills short rows with None.
            if None in record:
                raise DataError(
                    f"{name} row {index} (line {reader.line_num}) has more cells than the header's {len(header)}"
                )
            if any(value is None for value in record.values()):
                raise DataError(
                    f"{name} row {index} (line {reader.line_num}) has fewer cells than the header's {len(header)}"
                )
            records.append({c: record[c] for c in COLUMNS if c in record})
    except csv.Error as exc:
        raise DataError(f"{name} is not valid CSV at line {reader.line_num}: {exc}") from exc
    return records


def _load_alpaca(start: int, rows: int) -> list[dict[str, str]]:
    name = f"Hub data set {ALPACA_REPO}"
    try:
        import datasets  # lazy: importing datasets costs about a second

        dataset = datasets.load_dataset(ALPACA_REPO, split="train")
    except Exception as exc:  # offline mode, no network, no cache: all mean the same thing to the user
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
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


# --------------------------------------------------------------------------------------------------------------------
# Formatting and tokenisation
# --------------------------------------------------------------------------------------------------------------------


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


def build_examples(
    rows: Sequence[dict[str, str]],
    tokenizer: Any,
    *,
    seq_len: int,
    template: Template = "auto",
    row_offset: int = 0,
) -> list[Example]:
    """Tokenise rows with the loss on response tokens only.

    The prompt and the response are tokenised separately so the boundary between them is exact, then concatenated,
    an eos id is appended if the response does not end with one, and the result is truncated to `seq_len`.

    Args:
        rows (`Sequence[dict[str, str]]`): rows from `load_instruction_rows`.
        tokenizer: a Hugging Face tokenizer with an eos token.
        seq_len (`int`): maximum tokens per example.
        template (`str`): see `format_example`.
        row_offset (`int`): added to row numbers in error messages (pass the slice's `start` to name file rows).

    Returns:
        `list[Example]`: one per row, `labels == IGNORE_INDEX` exactly on the prompt tokens.

    Raises:
        `DataError`: if a prompt fills all `seq_len` tokens, leaving that row no loss token.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"`seq_len` must be an integer >= 2; got {seq_len!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token, so responses cannot be terminated; set `tokenizer.eos_token`")
    kind = _resolve_template(tokenizer, template)
    examples = []
    for i, row in enumerate(rows):
        prompt, response = format_example(row, tokenizer, template=kind)
        # A chat template already writes its own bos/special tokens; the Alpaca prompt gets the tokenizer's (e.g. bos).
        prompt_ids = list(tokenizer(prompt, add_special_tokens=kind == "alpaca")["input_ids"])
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if not response_ids or response_ids[-1] != eos_id:
            response_ids.append(eos_id)
        if len(prompt_ids) >= seq_len:
            raise DataError(
                f"row {row_offset + i} (instruction {_short(row['instruction'])}) has a {len(prompt_ids)}-token "
                f"prompt, so seq_len {seq_len} leaves it no response token to learn from; use seq_len >= "
                f"{len(prompt_ids) + 1}"
            )
        input_ids = (prompt_ids + response_ids)[:seq_len]
        labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
        examples.append(Example(input_ids=input_ids, labels=labels))
    return examples


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


def batch_order(n_examples: int, *, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The example indices of every step, fixed before training so every arm sees the same batches.

    The stream is a concatenation of epochs, epoch `e` being a permutation drawn from
    `torch.Generator().manual_seed(seed + e)`; step `s` takes the stream's `s`-th chunk of `batch_size` (a chunk may
    span two epochs). The global RNG is neither used nor advanced.

    Args:
        n_examples (`int`): number of examples.
        batch_size (`int`): examples per step.
        steps (`int`): number of steps.
        seed (`int`): seed of the order.

    Returns:
        `list[list[int]]`: `steps` lists of `batch_size` indices in `[0, n_examples)`.
    """
    for label, value in (("n_examples", n_examples), ("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"`{label}` must be a positive integer; got {value!r}")
    needed = batch_size * steps
    stream: list[int] = []
    epoch = 0
    while len(stream) < needed:
        generator = torch.Generator().manual_seed(seed + epoch)
        stream.extend(torch.randperm(n_examples, generator=generator).tolist())
        epoch += 1
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def collate(examples: Sequence[Example], indices: Sequence[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack the chosen examples into one right-padded batch.

    Args:
        examples (`Sequence[Example]`): all examples.
        indices (`Sequence[int]`): which examples form this batch (one entry of `batch_order`).
        pad_id (`int`): token id used for padding `input_ids`.

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask` (1 on real tokens) and `labels` (`IGNORE_INDEX` on
        padding), each a LongTensor of shape `(len(indices), longest example)`.
    """
    if pad_id is None:
        raise DataError("`pad_id` is None: the tokenizer needs a pad token (for example its eos token)")
    if len(indices) == 0:
        raise DataError("a batch needs at least one example index; got none")
    bad = [i for i in indices if not 0 <= i < len(examples)]
    if bad:
        raise DataError(f"batch indices {bad} are out of range for {len(examples)} examples")
    chosen = [examples[i] for i in indices]
    width = max(len(e.input_ids) for e in chosen)
    input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
    for r, example in enumerate(chosen):
        n = len(example.input_ids)
        input_ids[r, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[r, :n] = 1
        labels[r, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def corrupt_batch(batch: dict[str, torch.Tensor], *, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The spike-stress batch: every loss-bearing token replaced by a uniformly random token id.

    The random ids come from a dedicated `torch.Generator` seeded with `seed`, so every arm gets the identical
    corrupted batch and the global RNG is untouched. Prompt tokens and padding are kept; at each position where
    `labels != IGNORE_INDEX`, both `input_ids` and `labels` get the same random id. A model asked to predict noise
    has a large loss and gradient, the spike the clipping arms are compared on.

    Args:
        batch (`dict[str, torch.Tensor]`): a batch from `collate`; not modified.
        vocab_size (`int`): random ids are drawn from `[0, vocab_size)`.
        seed (`int`): seed of the corruption.

    Returns:
        `dict[str, torch.Tensor]`: a new batch with the same keys, shapes and devices.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise DataError(f"`vocab_size` must be a positive integer; got {vocab_size!r}")
    labels = batch["labels"]
    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU so the ids do not depend on the device, then moved next to the batch.
    noise = torch.randint(0, vocab_size, tuple(labels.shape), generator=generator, dtype=torch.long)
    noise = noise.to(labels.device)
    loss_mask = labels != IGNORE_INDEX
    out = {key: value.clone() for key, value in batch.items()}
    out["input_ids"] = torch.where(loss_mask, noise, batch["input_ids"])
    out["labels"] = torch.where(loss_mask, noise, labels)
    return out


def order_hash(order: Sequence[Sequence[int]]) -> str:
    """SHA-256 hex digest of a batch order (the fairness receipt: equal hashes mean equal batches)."""
    payload = json.dumps([[int(i) for i in batch] for batch in order], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

"""Data layer of the ablation engine: one slice of instruction rows, tokenised once and fed to every arm in lockstep.

The pieces, in the order the runner uses them:
    info = describe_source(cfg.dataset, display_name=...)                         # path-free identity for config.json
    rows = load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows)     # streamed, validated Alpaca rows
    fitted = build_example_set(rows, tokenizer, seq_len=cfg.seq_len)             # loss on response tokens only
    examples, notes = fitted.examples, fitted.notes()                             # what was cut to fit seq_len
    order = batch_order(len(examples), batch_size=..., steps=..., seed=...)        # same order for every arm
    batch = collate(examples, order[step], pad_id=tokenizer.pad_token_id)          # right-padded LongTensors
    batch = corrupt_batch(batch, vocab_size=..., seed=...)                         # only at the stress step

Modules: `sources` (which data, its identity, validated slices), `readers` (streaming .jsonl and .csv, whole .json),
`examples` (the chat or Alpaca prompt, tokenisation, long prompts cut from the front), `batching` (order, collation,
the spike batch), `errors` (`DataError`). Every data problem raises `DataError` (a `ValueError`) with a one-line
message naming the file and, where it can, the row and column.
"""

from __future__ import annotations

from .batching import batch_order, collate, corrupt_batch, order_hash
from .errors import DataError
from .examples import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    Example,
    ExampleSet,
    build_example_set,
    build_examples,
    format_example,
    prompt_token_ids,
)
from .readers import RecordSlice, read_slice
from .sources import (
    ALPACA_REPO,
    BUNDLED_NAME,
    BUNDLED_PATH,
    COLUMNS,
    MAX_UPLOAD_BYTES,
    REQUIRED_COLUMNS,
    SUPPORTED_SUFFIXES,
    SourceInfo,
    describe_source,
    load_instruction_rows,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "ALPACA_REPO",
    "BUNDLED_NAME",
    "BUNDLED_PATH",
    "COLUMNS",
    "IGNORE_INDEX",
    "MAX_UPLOAD_BYTES",
    "REQUIRED_COLUMNS",
    "SUPPORTED_SUFFIXES",
    "DataError",
    "Example",
    "ExampleSet",
    "RecordSlice",
    "SourceInfo",
    "batch_order",
    "build_example_set",
    "build_examples",
    "collate",
    "corrupt_batch",
    "describe_source",
    "format_example",
    "load_instruction_rows",
    "order_hash",
    "prompt_token_ids",
    "read_slice",
]

"""What the engine yields: one `StepRecord` per arm and step, an `EvalRecord` per arm, held-out split and evaluation,
`Phase` messages between steps, a final `RunResult`; and how records go to and come back from `metrics.jsonl` /
`metrics.csv` (one file for both kinds: an evaluation's line has `"kind": "eval"`)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..jsonio import dumps
from ..spec.config import AblationConfig

Status = Literal["finished", "stopped", "failed"]


@dataclass
class StepRecord:
    """One arm's optimizer step: the unit the engine yields, `metrics.jsonl` stores and the charts plot.

    Args:
        arm (`str`): arm label (`lora`, `lora+crma`, ...; A/A copies get `#2` suffixes).
        seed (`int`): the run's seed.
        step (`int`): 1-based optimizer step.
        loss (`float`): mean token loss of the batch (NaN/inf when the arm diverged; `null` in JSON).
        grad_norm_pre (`float`): global L2 norm of the arm's trainable gradients before clipping.
        grad_norm_post (`float`): the same after clipping.
        clipped (`bool`): whether the clipper scaled the gradients.
        lr (`float`): base learning rate used for this step.
        tokens (`int`): tokens (prompt and response, padding excluded) this arm has trained on so far.
        step_time_s (`float`): wall time of this arm's forward + backward + step.
        memory_mb (`float`): peak device memory (GPU) or process RSS (CPU) in MiB.
        diverged (`bool`): the loss or gradient was not finite; the arm stops after this record.
        crma (`dict | None`): mixing diagnostics summary every `diag_every` steps for CRMA arms.
        grad_norm_lora (`float | None`): pre-clip L2 norm of the LoRA parameters' gradients alone. `grad_norm_pre`
            covers every trainable parameter of the arm, CRMA's included, so it is not the same quantity across
            arms; this one is.
    """

    arm: str
    seed: int
    step: int
    loss: float
    grad_norm_pre: float
    grad_norm_post: float
    clipped: bool
    lr: float
    tokens: int
    step_time_s: float
    memory_mb: float
    diverged: bool = False
    crma: dict[str, Any] | None = None
    grad_norm_lora: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (floats as they are, NaN included)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        """Inverse of `to_dict()`; a `null` float (a non-finite value in JSON) comes back as NaN."""
        values = dict(data)
        for key in _FLOAT_FIELDS:
            if values.get(key) is None or isinstance(values.get(key), str):  # "NaN" strings of older files too
                values[key] = float(values[key]) if isinstance(values.get(key), str) else math.nan
        return cls(**values)


_FLOAT_FIELDS = ("loss", "grad_norm_pre", "grad_norm_post")

Split = Literal["val", "test"]


@dataclass
class EvalRecord:
    """One arm's loss on a held-out slice at one step (0: before training), computed under `no_grad` in eval mode.

    Args:
        arm (`str`): arm label.
        seed (`int`): the run's seed.
        step (`int`): optimizer steps the arm had taken (0 = its initial state).
        split (`"val" | "test"`): the validation slice (chooses LRs) or the test slice (reports).
        loss (`float`): token-weighted mean NLL over the slice's response tokens, as training computes it (NaN when
            not finite; `null` in JSON).
        tokens (`int`): response tokens the loss averages over.
        eval_s (`float`): wall time of the evaluation.
    """

    arm: str
    seed: int
    step: int
    split: Split
    loss: float
    tokens: int
    eval_s: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRecord:
        """Inverse of `to_dict()` (a `null` loss comes back as NaN)."""
        values = {k: v for k, v in data.items() if k != "kind"}
        if values.get("loss") is None:
            values["loss"] = math.nan
        return cls(**values)


@dataclass
class Phase:
    """A progress message between steps (loading the model, setting up a seed, writing files)."""

    message: str
    seed: int | None = None


@dataclass
class SeedStart:
    """A seed's arms are set up: their labels and the receipt of their starting state (trackers open runs here)."""

    seed: int
    labels: list[str]
    receipt: dict[str, Any]


@dataclass
class SeedEnd:
    """A seed ended (finished, stopped or diverged): its final receipt (None when its set-up failed)."""

    seed: int
    receipt: dict[str, Any] | None


@dataclass
class RunResult:
    """The end of a run: always yielded last, also when the run stopped or failed (partial records kept).

    Args:
        status (`"finished" | "stopped" | "failed"`): how the run ended.
        error (`str | None`): one-line reason when failed or stopped early for a cap.
        config (`AblationConfig`): the run's config.
        records (`list[StepRecord]`): every step record of every arm and seed.
        summary (`dict`): `summary.json` content (per-arm figures, deltas, seeds, fairness receipt).
        out_dir (`str | None`): folder holding the files, when one was given.
        files (`list[str]`): files written, relative to `out_dir`.
        notes (`list[str]`): honest remarks about the run (fallbacks taken, figures not available).
        wall_s (`float`): wall time of the whole run.
    """

    status: Status
    error: str | None
    config: AblationConfig
    records: list[StepRecord]
    summary: dict[str, Any]
    out_dir: str | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    evals: list[EvalRecord] = field(default_factory=list)


Record = StepRecord | EvalRecord
Event = StepRecord | EvalRecord | Phase | SeedStart | SeedEnd | RunResult


def record_line(record: Record) -> str:
    """One `metrics.jsonl` line (strict JSON; non-finite floats as null); an evaluation's has `"kind": "eval"`."""
    data = record.to_dict()
    return dumps({"kind": "eval", **data} if isinstance(record, EvalRecord) else data) + "\n"


def write_metrics_jsonl(records: Iterable[Record], path: str | os.PathLike[str], *, append: bool = False) -> Path:
    """Write records as JSON lines (see `record_line`); `append` adds to an existing file (live logging)."""
    out = Path(path)
    with out.open("a" if append else "w", encoding="utf-8") as fh:
        fh.writelines(record_line(r) for r in records)
    return out


def parse_record_line(line: str) -> Record:
    """One `metrics.jsonl` line back as a `StepRecord` or an `EvalRecord` (`ValueError` if it is neither)."""
    try:
        data = json.loads(line)
        return EvalRecord.from_dict(data) if data.get("kind") == "eval" else StepRecord.from_dict(data)
    except (json.JSONDecodeError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"not a metrics JSON line ({err})") from None


def read_metrics_jsonl(path: str | os.PathLike[str]) -> tuple[list[StepRecord], list[EvalRecord]]:
    """Read a `metrics.jsonl` (blank lines skipped): its training records and its held-out evaluations.

    Raises:
        `ValueError`: a line is not a record; the message names the file and line.
    """
    src = Path(path)
    steps: list[StepRecord] = []
    evals: list[EvalRecord] = []
    with src.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record_line(line)
            except ValueError as err:
                raise ValueError(f"{src.name}:{lineno}: {err}") from None
            (evals if isinstance(record, EvalRecord) else steps).append(record)
    return steps, evals


def write_metrics_csv(records: Iterable[Record], path: str | os.PathLike[str]) -> Path:
    """Write the records as CSV for spreadsheets: one row per arm and step (`kind` train) or evaluation (`kind`
    eval, with its `split`), CRMA diagnostics as `crma_*` columns."""
    rows = []
    for r in records:
        row = {"kind": "eval" if isinstance(r, EvalRecord) else "train"}
        row.update({k: v for k, v in r.to_dict().items() if k != "crma"})
        row.update({f"crma_{k}": v for k, v in (getattr(r, "crma", None) or {}).items()})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = Path(path)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out

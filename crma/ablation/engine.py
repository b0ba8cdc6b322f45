"""The paired ablation loop: every arm trains on one shared base model, step by step, in lockstep.

    for seed in seeds:
        with ArmSet(cfg, loaded, seed) as arms:        # same LoRA init in every arm; CRMA / ZClip per arm
            for step in steps:
                batch = batches.at(step)               # one batch, handed to every arm
                for arm in arms:
                    yield arms.train_step(arm, batch)  # a StepRecord

Events go to whoever iterates: the CLI's progress bar, the app's live charts, and `RunWriter` (which writes the
files). Failures end the run as a `RunResult` with status `failed` and a one-line error; they are not raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .arm_set import ArmSet, Batch
from .arms import arm_labels
from .config import AblationConfig
from .records import Event, Phase, RunResult, StepRecord
from .summary import build_summary

logger = logging.getLogger(__name__)


class StepBatches:
    """The batch of every step of one seed, planned before training so every arm sees the same ones.

    Args:
        examples (`list[Example]`): the tokenised slice.
        cfg (`AblationConfig`): batch size, steps and the spike stress step.
        seed (`int`): seed of the batch order (and of the spike batch's noise).
        pad_id (`int`): padding token id.
        vocab_size (`int`): the spike batch's random ids are drawn below this.
        device (`torch.device`): where the tensors go.
    """

    def __init__(
        self, examples: list[Any], cfg: AblationConfig, seed: int, *, pad_id: int, vocab_size: int, device: Any
    ):
        from .data import batch_order, order_hash

        self.examples, self.cfg, self.seed = examples, cfg, seed
        self.pad_id, self.vocab_size, self.device = pad_id, vocab_size, device
        self.order = batch_order(len(examples), batch_size=cfg.batch_size, steps=cfg.steps, seed=seed)
        self.order_sha256 = order_hash(self.order)

    def at(self, step: int) -> Batch:
        """The batch of 1-based `step` (the corrupted one, with its loss scale, at the spike stress step)."""
        from .data import collate, corrupt_batch

        indices = self.order[step - 1]
        tensors = collate(self.examples, indices, pad_id=self.pad_id)
        scale = 1.0
        if self.cfg.spike_at == step:
            tensors = corrupt_batch(tensors, vocab_size=self.vocab_size, seed=self.seed)
            scale = self.cfg.spike_scale
        return Batch(step, {k: v.to(self.device) for k, v in tensors.items()}, list(indices), scale)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _failure_message(exc: Exception) -> str:
    if isinstance(exc, (ValueError, FileNotFoundError)):  # config, model, data: the message says what is wrong
        return str(exc)
    if _is_oom(exc):
        return (
            "out of memory: lower batch_size or seq_len, use fewer arms, or pick a smaller model "
            f"({str(exc).splitlines()[0][:160]})"
        )
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {Path(exc.filename).name}" if exc.filename else "")
    logger.exception("ablation run failed")
    return f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"


class _Run:
    """What one run accumulates: records, receipts, per-arm totals, notes, and how it ended."""

    def __init__(self, cfg: AblationConfig, stop: threading.Event):
        self.cfg, self.stop = cfg, stop
        self.started = time.perf_counter()
        self.records: list[StepRecord] = []
        self.receipts: list[dict[str, Any]] = []
        self.arm_info: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}  # the data's path-free identity and what fitting it to seq_len did
        self.status, self.error = "finished", None

    def should_stop(self) -> bool:
        """Stop requested or the wall cap reached: mark the run stopped and say so."""
        if self.stop.is_set():
            self.status, self.error = "stopped", "stopped by request"
        elif self.cfg.max_wall_s is not None and time.perf_counter() - self.started > self.cfg.max_wall_s:
            self.status, self.error = "stopped", f"time cap of {self.cfg.max_wall_s:.0f} s reached"
        return self.status != "finished"

    def end_seed(self, arms: ArmSet, order_sha256: str) -> None:
        self.receipts.append(arms.receipt(order_sha256))
        for arm in arms.arms:
            info = self.arm_info.setdefault(arm.label, {"trainable_params": arm.trainable, "wall_s": 0.0})
            info["wall_s"] += arm.wall_s

    def result(self) -> RunResult:
        summary = build_summary(
            self.records, labels=arm_labels(self.cfg.arms), receipts=self.receipts, arm_info=self.arm_info
        )
        summary["notes"] = list(self.notes)
        summary["data"] = self.data
        return RunResult(
            status=self.status,
            error=self.error,
            config=self.cfg,
            records=self.records,
            summary=summary,
            notes=self.notes,
            wall_s=time.perf_counter() - self.started,
        )


def run_ablation(
    cfg: AblationConfig,
    *,
    stop: threading.Event | None = None,
    loaded: Any = None,
    adapters_dir: str | Path | None = None,
    data_name: str | None = None,
) -> Iterator[Event]:
    """Run the paired ablation and yield `Phase` messages, one `StepRecord` per arm per step, then a `RunResult`.

    Args:
        cfg (`AblationConfig`): what to run.
        stop (`threading.Event | None`): when set, every arm stops at the next step boundary; results so far are kept.
        loaded (`LoadedModel | None`): an already loaded model to reuse (its weights are restored afterwards).
        adapters_dir (`str | Path | None`): where each arm's adapter is saved (`<arm>/`, or `seed-<s>/<arm>/` with
            several seeds) when `cfg.save_adapters`; nothing is saved when None.
        data_name (`str | None`): what messages and the summary call a local data file (e.g. an upload's own name,
            so no server path is shown); the path itself by default.

    Returns:
        An iterator of events; the last one is always a `RunResult` (status finished / stopped / failed). Errors
        in the config, the model or the data end the run as `failed` with a one-line message; they are not raised.
    """
    from .data import build_example_set, describe_source, load_instruction_rows
    from .models import load_model

    run = _Run(cfg, stop or threading.Event())
    try:
        if loaded is None:
            yield Phase(f"loading model {cfg.model}")
            loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        source = describe_source(cfg.dataset, display_name=data_name)
        run.data["source"] = source.to_dict()
        yield Phase(f"reading {cfg.rows} rows of {source.name} from row {cfg.start}")
        rows = load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows, display_name=data_name)
        fitted = build_example_set(rows, loaded.tokenizer, seq_len=cfg.seq_len, row_offset=cfg.start)
        run.data["fit"] = fitted.to_dict()
        run.notes.extend(fitted.notes())
        examples = fitted.examples
        vocab = loaded.model.get_input_embeddings().weight.shape[0]
        for seed in cfg.seed_list:
            if run.should_stop():
                break
            yield Phase(f"seed {seed}: setting up {len(cfg.arms)} arms", seed=seed)
            batches = StepBatches(
                examples, cfg, seed, pad_id=loaded.tokenizer.pad_token_id, vocab_size=vocab, device=loaded.device
            )
            with ArmSet(cfg, loaded, seed, notes=run.notes) as arms:
                for step in range(1, cfg.steps + 1):
                    if run.should_stop():
                        break
                    batch = batches.at(step)
                    for arm in arms:
                        record = arms.train_step(arm, batch)
                        run.records.append(record)
                        yield record
                    if arms.all_diverged:
                        run.notes.append(f"seed {seed}: every arm diverged by step {step}")
                        break
                run.end_seed(arms, batches.order_sha256)
                if adapters_dir is not None and cfg.save_adapters:
                    yield Phase(f"seed {seed}: saving adapters", seed=seed)
                    root = Path(adapters_dir)
                    arms.save_adapters(root if len(cfg.seed_list) == 1 else root / f"seed-{seed}")
            if run.status != "finished":
                break
    except Exception as exc:  # anything still ends as a failed run whose finished steps are kept
        run.status, run.error = "failed", _failure_message(exc)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    yield run.result()

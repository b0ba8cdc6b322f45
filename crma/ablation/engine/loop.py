"""The paired ablation loop: every arm trains on one shared base model, step by step, in lockstep.

    for seed in seeds:
        with ArmSet(cfg, loaded, seed) as arms:        # same LoRA init in every arm; CRMA / ZClip per arm
            for step in steps:
                batch = batches.at(step)               # one batch, handed to every arm
                for arm in arms:
                    yield arms.train_step(arm, batch)  # a StepRecord

Events go to whoever iterates: the CLI's progress bar, the app's live charts, and `RunWriter` (which writes the
files), and, with a `TrackerConfig`, to trackio / W&B / TensorBoard. Failures end the run as a `RunResult` with status
`failed` and a one-line error; they are not raised.

Under `accelerate launch` / `torchrun` with several processes the same loop runs data-parallel (see `distributed`):
each process trains every arm on its rows of each step's batch; only the main process yields records, saves adapters
and reports to trackers; the others yield only their final `RunResult`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..analysis.summary import build_summary
from ..output.trackers import TrackerConfig, open_reporter
from ..spec.config import AblationConfig
from .arm_set import ArmSet, Batch
from .distributed import DataParallel, data_parallel
from .evaluation import EvalSet, build_eval_set
from .records import EvalRecord, Event, Phase, RunResult, StepRecord

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
        parallel (`DataParallel | None`): in a data-parallel run, each batch carries this process's shard.
    """

    def __init__(
        self,
        examples: list[Any],
        cfg: AblationConfig,
        seed: int,
        *,
        pad_id: int,
        vocab_size: int,
        device: Any,
        parallel: DataParallel | None = None,
    ):
        from ..data import batch_order, order_hash

        self.examples, self.cfg, self.seed = examples, cfg, seed
        self.pad_id, self.vocab_size, self.device, self.parallel = pad_id, vocab_size, device, parallel
        self.order = batch_order(len(examples), batch_size=cfg.batch_size, steps=cfg.steps, seed=seed)
        self.order_sha256 = order_hash(self.order)

    def at(self, step: int) -> Batch:
        """The batch of 1-based `step` (the corrupted one, with its loss scale, at the spike stress step); in a
        data-parallel run with this process's shard of it."""
        from ..data import IGNORE_INDEX, collate, corrupt_batch

        indices = self.order[step - 1]
        tensors = collate(self.examples, indices, pad_id=self.pad_id)
        scale = 1.0
        if self.cfg.spike_at == step:
            tensors = corrupt_batch(tensors, vocab_size=self.vocab_size, seed=self.seed)
            scale = self.cfg.spike_scale
        batch = Batch(step, {k: v.to(self.device) for k, v in tensors.items()}, list(indices), scale)
        if self.parallel is not None:
            # The whole batch is collated first, so the shards keep its padded width and every process's receipt
            # digests the same (whole) batch as one process does.
            batch.shard = self.parallel.shard(batch.tensors, batch.indices, ignore_index=IGNORE_INDEX)
        return batch


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
        self.parallel: DataParallel | None = None
        self.shards: dict[int, dict[str, Any]] = {}  # per seed: what each process trained on (data parallel)
        self.started = time.perf_counter()
        self.records: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self.receipts: list[dict[str, Any]] = []
        self.arm_info: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}  # the data's path-free identity and what fitting it to seq_len did
        self.status, self.error = "finished", None

    @property
    def is_main(self) -> bool:
        """This process yields records, saves adapters and reports (always, without a launcher)."""
        return self.parallel is None or self.parallel.is_main

    def should_stop(self) -> bool:
        """Stop requested or the wall cap reached: mark the run stopped and say so. Data parallel: a collective (every
        process calls it at the same points), so all stop at the same step when any one has to."""
        if self.stop.is_set():
            self.status, self.error = "stopped", "stopped by request"
        elif self.cfg.max_wall_s is not None and time.perf_counter() - self.started > self.cfg.max_wall_s:
            self.status, self.error = "stopped", f"time cap of {self.cfg.max_wall_s:.0f} s reached"
        if self.parallel is not None and self.parallel.any(self.status != "finished") and self.status == "finished":
            self.status, self.error = "stopped", "stopped by another process of the launch"
        return self.status != "finished"

    def end_seed(self, arms: ArmSet, batches: StepBatches, consumed: list[list[int]]) -> None:
        self.receipts.append(arms.receipt(batches.order_sha256))
        for arm in arms.arms:
            info = self.arm_info.setdefault(arm.label, {"trainable_params": arm.trainable, "wall_s": 0.0})
            info["wall_s"] += arm.wall_s
        if self.parallel is not None:
            # What each process really fed each arm, and whether the replicas still agree bit for bit.
            mine = {"examples": consumed, "rows": {a.label: a.rows for a in arms.arms}, "state": arms.state_hashes()}
            ranks = self.parallel.gather(mine)
            steps = len(consumed)
            self.shards[arms.seed] = {
                "batches": [list(batches.order[s]) for s in range(steps)],
                "examples": [[r["examples"][s] for r in ranks] for s in range(steps)],
                "rows": [r["rows"] for r in ranks],
                "replicas_in_sync": all(r["state"] == ranks[0]["state"] for r in ranks),
            }
            if not self.shards[arms.seed]["replicas_in_sync"]:
                self.notes.append(f"seed {arms.seed}: the processes' adapters differ at the end (replicas diverged)")

    def result(self) -> RunResult:
        from .receipt import check_selection

        summary = build_summary(
            self.records,
            labels=self.cfg.arm_labels,
            receipts=self.receipts,
            arm_info=self.arm_info,
            evals=self.evals,
        )
        summary["notes"] = list(self.notes)
        summary["data"] = self.data
        choice = check_selection(summary, self.evals, self.data.get("heldout"))
        if choice is not None:
            summary["receipt"]["lr_choice"] = choice
        summary["world_size"] = self.parallel.world_size if self.parallel is not None else 1
        if self.parallel is not None:
            summary["distributed"] = {**self.parallel.describe(), "seeds": dict(self.shards)}
        return RunResult(
            status=self.status,
            error=self.error,
            config=self.cfg,
            records=self.records,
            summary=summary,
            notes=self.notes,
            wall_s=time.perf_counter() - self.started,
            evals=self.evals,
        )


def _heldout_sets(run: _Run, loaded: Any, train: Any, data_name: str | None) -> Iterator[Event]:
    """Read and tokenise the validation and test slices like the training slice (a generator: it yields phases and
    returns the `EvalSet`s); records their identity and any overlap with the training examples in the run's data."""
    from ..data import build_example_set, describe_source, load_instruction_rows
    from .evaluation import example_hash

    cfg, out = run.cfg, []
    train_hashes = {example_hash(e) for e in train.examples}
    heldout: dict[str, Any] = {}
    for split, (dataset, start, rows) in cfg.slices().items():
        if split == "train":
            continue
        name = data_name if dataset == cfg.dataset else None
        source = describe_source(dataset, display_name=name)
        yield Phase(f"reading the {split} slice: {rows} rows of {source.name} from row {start}")
        try:
            rows_read = load_instruction_rows(dataset, start=start, rows=rows, display_name=name)
        except ValueError as exc:
            raise ValueError(f"the held-out {split} slice (rows {start}–{start + rows - 1}): {exc}") from None
        fitted = build_example_set(rows_read, loaded.tokenizer, seq_len=cfg.seq_len, row_offset=start)
        eval_set = build_eval_set(
            split,
            fitted,
            source.to_dict(),
            batch_size=cfg.batch_size,
            pad_id=loaded.tokenizer.pad_token_id,
            device=loaded.device,
        )
        out.append(eval_set)
        heldout[split] = {**eval_set.describe(), "overlap_with_train": len(eval_set.example_hashes & train_hashes)}
    if len(out) == 2:
        heldout["val_test_overlap"] = len(out[0].example_hashes & out[1].example_hashes)
    for split, info in heldout.items():
        if isinstance(info, dict) and info["overlap_with_train"]:
            run.notes.append(
                f"{info['overlap_with_train']} examples of the {split} slice also occur in the training slice "
                "(same text): the held-out figure is partly a training figure"
            )
    run.data["heldout"] = heldout
    return out


def _evaluate(run: _Run, arms: ArmSet, eval_sets: list[EvalSet], step: int, reporter: Any) -> Iterator[Event]:
    """Every arm still training, on every held-out slice, at `step` (0: before the first step)."""
    for eval_set in eval_sets:
        for arm in arms:
            record = arms.evaluate(arm, eval_set, step)
            run.evals.append(record)
            if reporter is not None:
                reporter.log_eval(record)
            yield record


def run_ablation(
    cfg: AblationConfig,
    *,
    stop: threading.Event | None = None,
    loaded: Any = None,
    adapters_dir: str | Path | None = None,
    data_name: str | None = None,
    tracker: TrackerConfig | None = None,
    token: str | bool | None = None,
    allow_local: bool = True,
) -> Iterator[Event]:
    """Run the paired ablation and yield `Phase` messages, one `StepRecord` per arm per step, then a `RunResult`.

    Started by `accelerate launch` / `torchrun` with several processes, it runs data-parallel (see `distributed`):
    the main process yields every event and saves the adapters; the others yield only their `RunResult`.

    Args:
        cfg (`AblationConfig`): what to run.
        stop (`threading.Event | None`): when set, every arm stops at the next step boundary; results so far are kept.
        loaded (`LoadedModel | None`): an already loaded model to reuse (its weights are restored afterwards).
        adapters_dir (`str | Path | None`): where each arm's adapter is saved (`<arm>/`, or `seed-<s>/<arm>/` with
            several seeds) when `cfg.save_adapters`; nothing is saved when None.
        data_name (`str | None`): what messages and the summary call a local data file (e.g. an upload's own name,
            so no server path is shown); the path itself by default.
        tracker (`TrackerConfig | None`): also hand every step's metrics to trackio, W&B or TensorBoard (one run per
            arm and seed; main process only).
        token (`str | bool | None`): Hub token for the model download, as `load_model` reads it: None uses this
            machine's login (the CLI), False sends none (a hosted app loading a visitor's model id), a string sends
            that token only.
        allow_local (`bool`): accept a local folder as `cfg.model` (False on a hosted app: a visitor's model id
            never reads the server's files).

    Returns:
        An iterator of events; the last one is always a `RunResult` (status finished / stopped / failed). Errors
        in the config, the model or the data end the run as `failed` with a one-line message; they are not raised.
    """
    run = _Run(cfg, stop or threading.Event())
    hub = {"token": token, "allow_local": allow_local}
    for event in _train(run, loaded, adapters_dir, data_name, tracker, hub):
        if run.is_main or isinstance(event, RunResult):
            yield event


def _train(
    run: _Run,
    loaded: Any,
    adapters_dir: str | Path | None,
    data_name: str | None,
    tracker: TrackerConfig | None,
    hub: dict[str, Any],
) -> Iterator[Event]:
    from ..data import build_example_set, describe_source, load_instruction_rows
    from ..models import load_model

    cfg, reporter = run.cfg, None
    try:
        run.parallel = parallel = data_parallel(cfg.device)
        if parallel is not None and cfg.batch_size < parallel.world_size:
            raise ValueError(
                f"Batch size ({cfg.batch_size}) is smaller than the number of processes ({parallel.world_size}): "
                "every process needs at least one row of each step's batch"
            )
        if run.is_main:
            reporter = open_reporter(tracker, cfg, world_size=parallel.world_size if parallel else 1)
        if loaded is None:
            yield Phase(f"loading model {cfg.model}")
            device = cfg.device
            if parallel is not None:  # each process on its own GPU (cuda:<local rank>), or the CPU
                device = "cpu" if parallel.device.type == "cpu" else str(parallel.device)
            loaded = load_model(cfg.model, device=device, dtype=cfg.dtype, **hub)
        source = describe_source(cfg.dataset, display_name=data_name)
        run.data["source"] = source.to_dict()
        yield Phase(f"reading {cfg.rows} rows of {source.name} from row {cfg.start}")
        rows = load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows, display_name=data_name)
        fitted = build_example_set(rows, loaded.tokenizer, seq_len=cfg.seq_len, row_offset=cfg.start)
        run.data["fit"] = fitted.to_dict()
        run.notes.extend(fitted.notes())
        examples = fitted.examples
        eval_sets = yield from _heldout_sets(run, loaded, fitted, data_name)
        vocab = loaded.model.get_input_embeddings().weight.shape[0]
        for seed in cfg.seed_list:
            if run.should_stop():
                break
            yield Phase(f"seed {seed}: setting up {len(cfg.arms)} arms", seed=seed)
            batches = StepBatches(
                examples,
                cfg,
                seed,
                pad_id=loaded.tokenizer.pad_token_id,
                vocab_size=vocab,
                device=loaded.device,
                parallel=parallel,
            )
            consumed: list[list[int]] = []  # the examples this process trained on, per step
            with ArmSet(cfg, loaded, seed, notes=run.notes, parallel=parallel) as arms:
                if reporter is not None:
                    reporter.start_seed(seed, [a.label for a in arms.arms], arms.setup_receipt(batches.order_sha256))
                yield from _evaluate(run, arms, eval_sets, 0, reporter)
                for step in range(1, cfg.steps + 1):
                    if run.should_stop():
                        break
                    batch = batches.at(step)
                    consumed.append(batch.shard.indices if batch.shard is not None else list(batch.indices))
                    for arm in arms:
                        record = arms.train_step(arm, batch)
                        run.records.append(record)
                        if reporter is not None:
                            reporter.log(record)
                        yield record
                    if arms.all_diverged:
                        run.notes.append(f"seed {seed}: every arm diverged by step {step}")
                        break
                    if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                        yield from _evaluate(run, arms, eval_sets, step, reporter)
                run.end_seed(arms, batches, consumed)
                if reporter is not None:
                    reporter.end_seed(run.receipts[-1])
                if adapters_dir is not None and cfg.save_adapters and run.is_main:
                    yield Phase(f"seed {seed}: saving adapters", seed=seed)
                    root = Path(adapters_dir)
                    arms.save_adapters(root if len(cfg.seed_list) == 1 else root / f"seed-{seed}")
            if run.status != "finished":
                break
    except Exception as exc:  # anything still ends as a failed run whose finished steps are kept
        run.status, run.error = "failed", _failure_message(exc)
    finally:
        if reporter is not None:
            reporter.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    yield run.result()

"""The paired ablation loop: every arm trains on one shared base model, step by step, in lockstep.

    for seed in seeds:
        with ArmSet(cfg, loaded, seed) as arms:        # same LoRA init in every arm; CRMA / ZClip per arm
            evaluate(arms, step=0)                     # every arm on the held-out slices, before training
            for step in steps:
                batch = batches.at(step)               # one batch, handed to every arm
                for arm in arms:
                    emit(arms.train_step(arm, batch))  # forward, backward, clip, step: a StepRecord
                if eval_due(step):
                    evaluate(arms, step)               # EvalRecords, under no_grad, RNG untouched

`train` hands every event to its observers — `RunWriter` (the run folder), a tracker `Reporter`, the CLI's progress
bar — and returns the `RunResult`; nothing else reads a run while it trains. Failures end the run as a `RunResult`
with status `failed` and a one-line error; they are not raised.

Under `accelerate launch` / `torchrun` with several processes the same loop runs data-parallel (see `distributed`):
each process trains every arm on its rows of each step's batch; only the main process has observers and saves
adapters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis.summary import build_summary
from ..spec.config import AblationConfig
from .arm_set import ArmSet, Batch
from .distributed import DataParallel, data_parallel, launch_mismatch_note
from .evaluation import EvalSet, build_eval_set
from .records import EvalRecord, Event, Phase, RunResult, SeedEnd, SeedStart, StepRecord

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


Observer = Callable[[Event], None]


class _Run:
    """What one run accumulates — records, receipts, per-arm totals, notes, how it ended — and who hears of it."""

    def __init__(self, cfg: AblationConfig, stop: threading.Event, observers: Sequence[Observer]):
        self.cfg, self.stop, self.observers = cfg, stop, list(observers)
        self.parallel: DataParallel | None = None
        self.shards: dict[int, dict[str, Any]] = {}  # per seed: what each process trained on (data parallel)
        self.started = time.perf_counter()
        self.records: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self.receipts: list[dict[str, Any]] = []
        self.arm_info: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}  # the data's path-free identity and what fitting it to seq_len did
        self.answer_rows: list[dict[str, Any]] = []  # the held-out rows every arm answers at the end
        self.answers: dict[str, Any] | None = None
        self.status, self.error = "finished", None

    @property
    def is_main(self) -> bool:
        """This process has observers and saves adapters (always, without a launcher)."""
        return self.parallel is None or self.parallel.is_main

    def emit(self, event: Event) -> None:
        """Keep a record, and hand `event` to every observer (main process only)."""
        if isinstance(event, StepRecord):
            self.records.append(event)
        elif isinstance(event, EvalRecord):
            self.evals.append(event)
        if self.is_main:
            for observe in self.observers:
                observe(event)

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

    def eval_due(self, step: int) -> bool:
        """Held-out evaluation after `step`: every `eval_every` steps and after the last one."""
        return step == self.cfg.steps or bool(self.cfg.eval_every and step % self.cfg.eval_every == 0)

    def evaluate(self, arms: ArmSet, eval_sets: list[EvalSet], step: int) -> None:
        """Every arm still training, on every held-out slice, at `step` (0: before the first step)."""
        for eval_set in eval_sets:
            for arm in arms:
                self.emit(arms.evaluate(arm, eval_set, step))

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
            self.records, labels=self.cfg.arm_labels, receipts=self.receipts, arm_info=self.arm_info, evals=self.evals
        )
        summary["notes"] = list(self.notes)
        summary["data"] = self.data
        choice = check_selection(summary, self.evals, self.data.get("heldout"))
        if choice is not None:
            summary["receipt"]["lr_choice"] = choice
        if self.answers is not None:
            summary["answers"] = self.answers
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


def train(
    cfg: AblationConfig,
    *,
    observers: Sequence[Observer] = (),
    stop: threading.Event | None = None,
    loaded: Any = None,
    adapters_dir: str | Path | None = None,
    data_name: str | None = None,
    token: str | bool | None = None,
    allow_local: bool = True,
) -> RunResult:
    """Train every arm of `cfg` in lockstep, hand each event to `observers`, and return the run's `RunResult`.

    Started by `accelerate launch` / `torchrun` with several processes, it runs data-parallel (see `distributed`):
    only the main process has observers and saves the adapters.

    Args:
        cfg (`AblationConfig`): what to run.
        observers (`Sequence[Callable[[Event], None]]`): called with every `Phase`, `SeedStart`, `StepRecord`,
            `EvalRecord`, `SeedEnd` and, last, the `RunResult` (e.g. `RunWriter`, a tracker `Reporter`).
        stop (`threading.Event | None`): when set, every arm stops at the next step boundary; results so far are kept.
        loaded (`LoadedModel | None`): an already loaded model to reuse (its weights are restored afterwards).
        adapters_dir (`str | Path | None`): where each arm's adapter is saved (`<arm>/`, or `seed-<s>/<arm>/` with
            several seeds) when `cfg.save_adapters`; nothing is saved when None.
        data_name (`str | None`): what messages and the summary call a local data file (e.g. an upload's own name,
            so no server path is shown); the path itself by default.
        token (`str | bool | None`): Hub token for the model download, as `load_model` reads it: None uses this
            machine's login (the CLI), False sends none (a hosted app loading a visitor's model id), a string sends
            that token only.
        allow_local (`bool`): accept a local folder as `cfg.model` (False on a hosted app: a visitor's model id
            never reads the server's files).

    Returns:
        `RunResult` (status finished / stopped / failed). Errors in the config, the model or the data end the run as
        `failed` with a one-line message; they are not raised.
    """
    run = _Run(cfg, stop or threading.Event(), observers)
    try:
        run.parallel = _join_launch(run)
        if loaded is None:
            run.emit(Phase(f"loading model {cfg.model}"))
            loaded = _load(run, token=token, allow_local=allow_local)
        examples, eval_sets = _read_data(run, loaded, data_name)
        for seed in cfg.seed_list:
            if run.should_stop():
                break
            _train_seed(run, loaded, examples, eval_sets, seed, adapters_dir)
            if run.status != "finished":
                break
        if run.status == "finished" and run.answer_rows and adapters_dir is not None and cfg.save_adapters:
            _answer(run, loaded, Path(adapters_dir).parent)
    except Exception as exc:  # anything still ends as a failed run whose finished steps are kept
        run.status, run.error = "failed", _failure_message(exc)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = run.result()
    run.emit(result)
    return result


def _join_launch(run: _Run) -> DataParallel | None:
    parallel = data_parallel(run.cfg.device)
    if parallel is not None and run.cfg.batch_size < parallel.world_size:
        raise ValueError(
            f"Batch size ({run.cfg.batch_size}) is smaller than the number of processes ({parallel.world_size}): "
            "every process needs at least one row of each step's batch"
        )
    note = launch_mismatch_note(parallel)
    if note:
        run.notes.append(note)
    return parallel


def _load(run: _Run, *, token: str | bool | None, allow_local: bool) -> Any:
    from ..models import load_model

    device = run.cfg.device
    if run.parallel is not None:  # each process on its own GPU (cuda:<local rank>), or the CPU
        device = "cpu" if run.parallel.device.type == "cpu" else str(run.parallel.device)
    return load_model(run.cfg.model, device=device, dtype=run.cfg.dtype, token=token, allow_local=allow_local)


def _read_data(run: _Run, loaded: Any, data_name: str | None) -> tuple[list[Any], list[EvalSet]]:
    """The training examples and the held-out `EvalSet`s, tokenised alike; their identity goes into the run's data."""
    from ..data import build_example_set, describe_source, load_instruction_rows
    from .evaluation import example_hash

    cfg = run.cfg
    source = describe_source(cfg.dataset, display_name=data_name)
    run.data["source"] = source.to_dict()
    run.emit(Phase(f"reading {cfg.rows} rows of {source.name} from row {cfg.start}"))
    rows = load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows, display_name=data_name)
    fitted = build_example_set(rows, loaded.tokenizer, seq_len=cfg.seq_len, row_offset=cfg.start)
    run.data["fit"] = fitted.to_dict()
    run.notes.extend(fitted.notes())
    train_hashes = {example_hash(e) for e in fitted.examples}
    eval_sets, heldout = [], {}
    for split, (dataset, start, n_rows) in cfg.slices().items():
        if split == "train":
            continue
        name = data_name if dataset == cfg.dataset else None
        held = describe_source(dataset, display_name=name)
        run.emit(Phase(f"reading the {split} slice: {n_rows} rows of {held.name} from row {start}"))
        try:
            held_rows = load_instruction_rows(dataset, start=start, rows=n_rows, display_name=name)
        except ValueError as exc:
            raise ValueError(f"the held-out {split} slice (rows {start}–{start + n_rows - 1}): {exc}") from None
        held_fit = build_example_set(held_rows, loaded.tokenizer, seq_len=cfg.seq_len, row_offset=start)
        pad_id = loaded.tokenizer.pad_token_id
        eval_set = build_eval_set(
            split, held_fit, held.to_dict(), batch_size=cfg.batch_size, pad_id=pad_id, device=loaded.device
        )
        eval_sets.append(eval_set)
        if not run.answer_rows or split == "test":  # the first rows of the test slice (else of validation)
            run.answer_rows = [{"row": start + i, **row} for i, row in enumerate(held_rows[: cfg.answer_rows])]
        overlap = len(eval_set.example_hashes & train_hashes)
        heldout[split] = {**eval_set.describe(), "overlap_with_train": overlap}
        if overlap:
            run.notes.append(
                f"{overlap} examples of the {split} slice also occur in the training slice (same text): its "
                "held-out figure is partly a training figure"
            )
    if len(eval_sets) == 2:
        heldout["val_test_overlap"] = len(eval_sets[0].example_hashes & eval_sets[1].example_hashes)
    run.data["heldout"] = heldout
    return fitted.examples, eval_sets


def _answer(run: _Run, loaded: Any, folder: Path) -> None:
    """Every arm's and the base model's greedy answer to the held-out rows, from the adapters just saved: the same
    code (`AdapterBank`) that answers from any run folder later, so the two agree (main process only)."""
    from ..output.adapters import AdapterBank, adapter_folders, answer_rows
    from .generation import GenerationConfig

    if not run.is_main:
        return
    run.emit(Phase(f"answering {len(run.answer_rows)} held-out rows with every arm and the base model"))
    with AdapterBank(loaded, adapter_folders(folder)) as bank:
        run.answers = answer_rows(bank, run.answer_rows, GenerationConfig(max_new_tokens=run.cfg.answer_tokens))


def _train_seed(
    run: _Run, loaded: Any, examples: list[Any], eval_sets: list[EvalSet], seed: int, adapters_dir: Any
) -> None:
    """One seed: set up its arms, train them in lockstep, record the receipt, save the adapters."""
    cfg = run.cfg
    run.emit(Phase(f"seed {seed}: setting up {len(cfg.arm_labels)} arms", seed=seed))
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    pad_id = loaded.tokenizer.pad_token_id
    batches = StepBatches(
        examples, cfg, seed, pad_id=pad_id, vocab_size=vocab, device=loaded.device, parallel=run.parallel
    )
    consumed: list[list[int]] = []  # the examples this process trained on, per step
    with ArmSet(cfg, loaded, seed, notes=run.notes, parallel=run.parallel) as arms:
        run.emit(SeedStart(seed, [a.label for a in arms.arms], arms.setup_receipt(batches.order_sha256)))
        run.evaluate(arms, eval_sets, 0)
        for step in range(1, cfg.steps + 1):
            if run.should_stop():
                break
            batch = batches.at(step)
            consumed.append(batch.shard.indices if batch.shard is not None else list(batch.indices))
            for arm in arms:
                run.emit(arms.train_step(arm, batch))
            if arms.all_diverged:
                run.notes.append(f"seed {seed}: every arm diverged by step {step}")
                break
            if run.eval_due(step):
                run.evaluate(arms, eval_sets, step)
        run.end_seed(arms, batches, consumed)
        run.emit(SeedEnd(seed, run.receipts[-1]))
        if adapters_dir is not None and cfg.save_adapters and run.is_main:
            run.emit(Phase(f"seed {seed}: saving adapters", seed=seed))
            root = Path(adapters_dir)
            arms.save_adapters(root if len(cfg.seed_list) == 1 else root / f"seed-{seed}")

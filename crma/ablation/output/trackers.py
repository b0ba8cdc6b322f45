"""Tracker hand-off of the ablation engine: `--report-to trackio|wandb|tensorboard|none`.

One tracker run per arm and seed, all in one project and group (the run's folder name), each with the ablation
config and the arm's set-up receipt as run config, and the same per-step metrics as `metrics.jsonl` (`step_metrics`).
Each library is driven through its own API and imported only when asked for; a missing one is a one-line
`TrackerUnavailableError` before any work starts.

    trackio       trackio.init(project, name, group, config) per arm and seed; run.log(metrics, step); run.finish()
    wandb         wandb.init(project, group, name, config, reinit="create_new") (W&B >= 0.19.10: several live runs);
                  the end-of-seed receipt goes to run.summary
    tensorboard   one SummaryWriter per arm and seed under `log_dir/<name>`: add_scalar per metric, the config and
                  the receipts as text

Not an `AblationConfig` field on purpose: every config field is accepted by the public Space's form and API, and the
Space must not write to arbitrary trackers (with the server's credentials); and where metrics are copied to does not
change what was run, which is what `config.json` records.
In a data-parallel launch only the main process reports (the engine opens no reporter on the others).
"""

from __future__ import annotations

import contextvars
import importlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..engine.records import EvalRecord, Event, RunResult, SeedEnd, SeedStart, StepRecord
from ..spec.config import AblationConfig

REPORT_TO = ("none", "trackio", "wandb", "tensorboard")
ReportTo = Literal["none", "trackio", "wandb", "tensorboard"]
# The module each choice needs and what to install when it is missing.
_PACKAGES = {
    "trackio": ("trackio", "pip install trackio"),
    "wandb": ("wandb", "pip install wandb"),
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
}
_NOT_METRICS = ("arm", "seed", "step", "crma")


class TrackerUnavailableError(ValueError):
    """The tracker asked for is not installed; the message says what to install."""


@dataclass
class TrackerConfig:
    """Where the engine hands its step metrics on, besides its own files.

    Args:
        report_to (`str`): `none`, `trackio`, `wandb` or `tensorboard`.
        project (`str`): the trackio / W&B project every run goes to (TensorBoard has none).
        group (`str | None`): the name that groups one ablation's runs (trackio / W&B group, prefix of every run
            name); the CLI uses the run's folder name, the default is a time stamp.
        log_dir (`str | Path | None`): TensorBoard's folder (one subfolder per arm and seed); required for
            `tensorboard`. The CLI uses `<out>/tensorboard`.
    """

    report_to: ReportTo = "none"
    project: str = "crma-ablation"
    group: str | None = None
    log_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if self.report_to not in REPORT_TO:
            raise ValueError(f"`report_to` must be one of {list(REPORT_TO)}; got {self.report_to!r}")
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"`project` must be a non-empty name; got {self.project!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group.strip()):
            raise ValueError(f"`group` must be None or a non-empty name; got {self.group!r}")
        if self.report_to == "tensorboard" and self.log_dir is None:
            raise ValueError("`log_dir` is required with report_to='tensorboard' (the CLI uses <out>/tensorboard)")


def require_tracker(report_to: str) -> Any:
    """Import the library `report_to` needs and return it (None for `none`).

    Raises:
        `TrackerUnavailableError`: it is not installed; the message names the package to install.
        `ValueError`: `report_to` is not a known choice.
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
    if report_to == "none":
        return None
    module, install = _PACKAGES[report_to]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackerUnavailableError(
            f"--report-to {report_to} needs the {install.split()[-1]} package, which is not installed ({install}); "
            "or use --report-to none"
        ) from exc


def step_metrics(record: StepRecord) -> dict[str, float]:
    """The per-step numbers of a record, as `metrics.jsonl` holds them, flat for a tracker: bools as 0/1, the CRMA
    diagnostics as `crma/<key>`, and no missing or non-finite value (`metrics.jsonl` writes those as null)."""
    out: dict[str, float] = {}
    items = [(k, v) for k, v in record.to_dict().items() if k not in _NOT_METRICS]
    items += [(f"crma/{k}", v) for k, v in (record.crma or {}).items()]
    for key, value in items:
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out


def _arm_receipt(receipt: dict[str, Any], label: str, phase: str) -> dict[str, Any]:
    # The seed's verdict plus this arm's own facts (`setup` or `end`), not every other arm's.
    keys = ("seed", "fair", "problems", "lora_init_equal", "batch_order_sha256", "batches_seen_equal", "declared")
    out = {k: receipt[k] for k in keys if k in receipt}
    out["lora_init_sha256"] = receipt.get("lora_init_sha256", {}).get(label)
    out[phase] = receipt.get("arms", {}).get(label, {}).get(phase)
    return out


class _Trackio:
    def __init__(self, module: Any, cfg: TrackerConfig):
        self.trackio, self.cfg = module, cfg

    def start(self, name: str, config: dict[str, Any]) -> Any:
        # trackio keeps "the current run" in a ContextVar and `init` finishes the current one; each arm's run is
        # started in a context of its own, so every arm's run stays live and is logged through its own `Run`.
        # No CPU/GPU sampling threads per run: the records carry memory and step time already.
        return contextvars.Context().run(
            self.trackio.init,
            project=self.cfg.project,
            name=name,
            group=self.cfg.group,
            config=config,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, run: Any, metrics: dict[str, float], step: int) -> None:
        run.log(metrics, step=step)

    def finish(self, run: Any, receipt: dict[str, Any] | None) -> None:
        # trackio stores a run's config once, with its first log: the end-of-seed receipt is in summary.json only.
        run.finish()


class _WandB:
    def __init__(self, module: Any, cfg: TrackerConfig):
        self.wandb, self.cfg = module, cfg

    def start(self, name: str, config: dict[str, Any]) -> Any:
        # "create_new": every arm's run stays live at once (the default would finish the previous one).
        return self.wandb.init(
            project=self.cfg.project, group=self.cfg.group, name=name, config=config, reinit="create_new"
        )

    def log(self, run: Any, metrics: dict[str, float], step: int) -> None:
        run.log(metrics, step=step)

    def finish(self, run: Any, receipt: dict[str, Any] | None) -> None:
        if receipt is not None:
            run.summary["receipt"] = receipt
        run.finish()


class _TensorBoard:
    def __init__(self, module: Any, cfg: TrackerConfig):
        self.writer_cls, self.cfg = module.SummaryWriter, cfg

    def start(self, name: str, config: dict[str, Any]) -> Any:
        writer = self.writer_cls(log_dir=str(Path(self.cfg.log_dir) / name))
        writer.add_text("config", _as_markdown_json(config), 0)
        return writer

    def log(self, run: Any, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            run.add_scalar(key, value, step)

    def finish(self, run: Any, receipt: dict[str, Any] | None) -> None:
        if receipt is not None:
            run.add_text("receipt", _as_markdown_json(receipt), 0)
        run.close()


def _as_markdown_json(value: Any) -> str:
    # TensorBoard renders text as markdown: a fenced block keeps the JSON readable.
    return "```\n" + json.dumps(value, indent=2, sort_keys=True, default=str) + "\n```"


_BACKENDS = {"trackio": _Trackio, "wandb": _WandB, "tensorboard": _TensorBoard}


class Reporter:
    """The engine's tracker runs, an observer of the engine (`train(cfg, observers=[reporter])`): one run per arm
    and seed, opened at its `SeedStart`, logged at each record, closed at its `SeedEnd` (or at the `RunResult` of a
    run that stopped inside a seed).

    Args:
        tracker (`TrackerConfig`): which tracker, project, group.
        cfg (`AblationConfig`): the run's config (every tracker run's config holds it).
        world_size (`int`): processes of the launch (recorded in every run's config).
    """

    def __init__(self, tracker: TrackerConfig, cfg: AblationConfig, *, world_size: int = 1):
        module = require_tracker(tracker.report_to)
        if tracker.group is None:
            tracker = replace(tracker, group=time.strftime("%Y%m%d-%H%M%S"))
        self.tracker, self.cfg, self.world_size = tracker, cfg, world_size
        self.backend = _BACKENDS[tracker.report_to](module, tracker)
        self.runs: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, SeedStart):
            self.start_seed(event.seed, event.labels, event.receipt)
        elif isinstance(event, StepRecord):
            self.log(event)
        elif isinstance(event, EvalRecord):
            self.log_eval(event)
        elif isinstance(event, SeedEnd):
            self.end_seed(event.receipt)
        elif isinstance(event, RunResult):
            self.close()

    def run_name(self, label: str, seed: int) -> str:
        """`<group>-<arm>-seed<seed>`: unique within the project for each ablation group."""
        return f"{self.tracker.group}-{label}-seed{seed}"

    def start_seed(self, seed: int, labels: list[str], setup_receipt: dict[str, Any]) -> None:
        """Open one run per arm with the config and that arm's set-up receipt as its config."""
        self.close()
        for label in labels:
            config = {
                "ablation": self.cfg.to_dict(),
                "arm": label,
                "seed": seed,
                "world_size": self.world_size,
                "receipt": _arm_receipt(setup_receipt, label, "setup"),
            }
            self.runs[label] = self.backend.start(self.run_name(label, seed), config)

    def log(self, record: StepRecord) -> None:
        """Log one record's `step_metrics` to its arm's run, at its step."""
        self.backend.log(self.runs[record.arm], step_metrics(record), record.step)

    def log_eval(self, record: EvalRecord) -> None:
        """Log one held-out loss (`eval/<split>_loss`) to its arm's run, at its step."""
        self.backend.log(self.runs[record.arm], {f"eval/{record.split}_loss": record.loss}, record.step)

    def end_seed(self, receipt: dict[str, Any] | None) -> None:
        """Finish every run of the seed, with the seed's final receipt where the tracker can still take it."""
        runs, self.runs = self.runs, {}
        for label, run in runs.items():
            self.backend.finish(run, _arm_receipt(receipt, label, "end") if receipt is not None else None)

    def close(self) -> None:
        """Finish any run still open (a stopped or failed seed)."""
        self.end_seed(None)


def open_reporter(tracker: TrackerConfig | None, cfg: AblationConfig, *, world_size: int = 1) -> Reporter | None:
    """A `Reporter` for `tracker`, or None when it is None or `none`."""
    if tracker is None or tracker.report_to == "none":
        return None
    return Reporter(tracker, cfg, world_size=world_size)

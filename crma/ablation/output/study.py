"""`python -m crma study`: the published study — each arm at its own best LR, judged on held-out loss.

The protocol: the offline SmolLM2-135M on fixed, disjoint slices of the bundled data (training, validation, test),
the controls a tuned answer needs (ZClip LoRA, the capacity control, the identity-mixing control, `lora+crma`), every
arm at every multiplier of an LR grid, five seeds, and two conditions:

- `plain`: the LR grid. Each arm's multiplier is chosen on the *validation* slice (lowest mean final validation loss
  over the seeds); an arm whose best multiplier lies at an edge of the grid gets the next multiplier of `LADDER`
  beyond it (up to `max_extensions` times), so a choice at the edge is tried past it before it is believed.
- `spike`: every arm at its multiplier chosen in `plain`, with a corrupted batch at `spike_at`.

The study is made of *cells*: one ordinary ablation run for a (condition, seed, arm set, LR) — its own folder under
the work folder with every file of a run. A cell whose folder holds a finished `summary.json` is never run again, so
an interrupted study continues where it stopped (`--overwrite` runs every cell afresh). Cells of one seed share its
batches and initial weights (both are functions of the seed; `cells_consistent` checks the hashes), so arms from
different cells are still paired by seed. The published summary merges the cells of each condition into one run
summary (`build_summary`): LR selection, attribution at the best and at the shared LR, receipts.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crma.config import JSONConfig
from crma.utils import cpu_cores

from ..engine.records import EvalRecord, Phase, StepRecord, read_metrics_jsonl
from ..jsonio import atomic_write_text, write_json
from ..spec.arms import STUDY_ARMS, format_scale, parse_arm
from ..spec.config import AblationConfig

# The multipliers a grid is drawn from and extended along (about half a decade apart).
LADDER = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
CONDITIONS = ("plain", "spike")
CELL_FILE = "study_cell.json"  # written into a cell's folder when it finished: which commit, how long


@dataclass
class StudyProtocol(JSONConfig):
    """The fixed protocol of the published study.

    Args:
        model (`str`): the model preset.
        rows (`int`): training rows of the bundled data set (from row 0).
        val_rows (`int`): validation rows, right after the training rows: they choose each arm's LR.
        test_rows (`int`): test rows, right after the validation rows: they report.
        seeds (`list[int]`): one paired run per seed and cell.
        steps (`int`): optimizer steps per arm: long enough for ZClip's 25 warm-up steps and ~50 steps after them.
        batch_size (`int`): rows per step.
        seq_len (`int`): tokens per row.
        spike_at (`int`): the stress condition's corrupted-batch step (after ZClip's warm-up, with steps left to
            recover).
        arms (`list[str]`): the arms.
        lr_grid (`list[float]`): the multipliers every arm starts with (drawn from `LADDER`).
        max_extensions (`int`): how often one arm's grid may grow past an edge its best multiplier sits on.
        eval_every (`int`): steps between held-out evaluations (0: at step 0 and at the end only).
    """

    model: str = "smollm2-135m"
    rows: int = 200
    val_rows: int = 24
    test_rows: int = 40
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    steps: int = 80
    batch_size: int = 2
    seq_len: int = 128
    spike_at: int = 50
    arms: list[str] = field(default_factory=lambda: list(STUDY_ARMS))
    lr_grid: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    max_extensions: int = 1
    eval_every: int = 0

    def __post_init__(self) -> None:
        for scale in self.lr_grid:
            if scale not in LADDER:
                raise ValueError(f"`lr_grid` multipliers must be drawn from {list(LADDER)}; got {scale!r}")

    @classmethod
    def toy(cls) -> StudyProtocol:
        """The same protocol at toy size (CI): the tiny random model, 2 seeds, a few steps, a 2-point grid."""
        return cls(
            model="tiny-random", rows=16, val_rows=6, test_rows=6, seeds=[1, 2], steps=4, spike_at=3, lr_grid=[1, 3]
        )

    def config(self, condition: str, seed: int, arms: list[str]) -> AblationConfig:
        """The ablation config of one cell: `arms` (each with its `@x` multiplier) on one seed."""
        return AblationConfig(
            model=self.model,
            dataset="bundled",
            rows=self.rows,
            seed=seed,
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            arms=list(arms),
            val_rows=self.val_rows,
            eval_rows=self.test_rows,
            eval_every=self.eval_every,
            spike_at=self.spike_at if condition == "spike" else None,
            # ZClip's published warm-up of 25 steps is longer than a toy run: scale it down there, never up.
            zclip={"warmup_steps": min(25, max(2, self.steps // 3))},
            save_adapters=False,
        )


@dataclass(frozen=True)
class Cell:
    """One ablation run of the study: a condition, a seed, and the arms (with their multipliers) it trains.

    Args:
        condition (`str`): `plain` or `spike`.
        seed (`int`): the seed.
        arms (`tuple[str, ...]`): arm labels with multipliers, e.g. `("lora+zclip@x3", ...)`.
        name (`str`): the cell's folder below `<work>/<condition>/seed<seed>/`.
    """

    condition: str
    seed: int
    arms: tuple[str, ...]
    name: str

    def folder(self, work: Path) -> Path:
        """The cell's run folder."""
        return work / self.condition / f"seed{self.seed}" / self.name


def _with_scale(arm: str, scale: float) -> str:
    return f"{parse_arm(arm).name}@x{format_scale(scale)}"


def grid_cells(protocol: StudyProtocol, scales: dict[str, list[float]]) -> list[Cell]:
    """The plain condition's cells: per seed, one cell per multiplier with every arm that is tried at it."""
    cells = []
    for seed in protocol.seeds:
        for scale in sorted({s for arm_scales in scales.values() for s in arm_scales}):
            arms = tuple(_with_scale(arm, scale) for arm in protocol.arms if scale in scales[arm])
            everyone = len(arms) == len(protocol.arms)
            name = f"x{format_scale(scale)}" + ("" if everyone else "-" + "-".join(parse_arm(a).name for a in arms))
            cells.append(Cell("plain", seed, arms, name))
    return cells


def _finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _run_cell(cell: Cell, protocol: StudyProtocol, work: Path, observers: tuple) -> None:
    """Run one cell into its folder (replacing an unfinished one) and mark it finished with its commit and time."""
    from .run_folder import run_to_folder

    folder = cell.folder(work)
    began = time.perf_counter()
    cfg = protocol.config(cell.condition, cell.seed, list(cell.arms))
    for observe in observers:
        observe(Phase(f"study cell {cell.condition}/seed{cell.seed}/{cell.name}"))
    result = run_to_folder(cfg, folder, overwrite=True, charts=False, observers=observers)
    if result.status == "finished":
        info = {"commit": _commit(), "wall_s": time.perf_counter() - began, "finished_at": time.time()}
        (folder / CELL_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


def _read_cells(cells: list[Cell], work: Path) -> dict[str, Any]:
    """Every record, evaluation, receipt and cell fact of finished cells, merged (labels are unique across cells
    of one seed: each carries its multiplier)."""
    records: list[StepRecord] = []
    evals: list[EvalRecord] = []
    receipts, infos, data, notes = [], [], {}, []
    arm_info: dict[str, dict[str, Any]] = {}
    for cell in cells:
        folder = cell.folder(work)
        if not _finished(folder):
            continue
        steps, cell_evals = read_metrics_jsonl(folder / "metrics.jsonl")
        records += steps
        evals += cell_evals
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        receipt = summary.get("receipt") or {}
        receipts += receipt.get("per_seed") or ([receipt] if receipt else [])
        data = data or summary.get("data", {})
        notes += [n for n in summary.get("notes") or [] if n not in notes]
        for label, arm in (summary.get("arms") or {}).items():
            arm_info.setdefault(label, {"trainable_params": arm.get("trainable_params")})
        info = json.loads((folder / CELL_FILE).read_text(encoding="utf-8")) if (folder / CELL_FILE).is_file() else {}
        infos.append({"cell": f"{cell.condition}/seed{cell.seed}/{cell.name}", "arms": list(cell.arms), **info})
    return {
        "records": records,
        "evals": evals,
        "receipts": receipts,
        "cells": infos,
        "data": data,
        "notes": notes,
        "arm_info": arm_info,
    }


def cells_consistent(receipts: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the cells of each seed saw the same batches and started from the same LoRA weights (per kind of
    LoRA: the shared rank, or the matched one), so arms of different cells are paired."""
    problems = []
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for receipt in receipts:
        by_seed.setdefault(receipt["seed"], []).append(receipt)
    for seed, group in by_seed.items():
        if len({r["batch_order_sha256"] for r in group}) > 1:
            problems.append(f"seed {seed}: the cells planned different batch orders")
        for matched in (False, True):
            inits = {
                h
                for r in group
                for label, h in (r.get("lora_init_sha256") or {}).items()
                if parse_arm(label).spec.matched == matched
            }
            if len(inits) > 1:
                problems.append(f"seed {seed}: the cells' {'matched' if matched else 'shared'} LoRA inits differ")
    return {"consistent": not problems, "problems": problems, "fair": all(r.get("fair") for r in receipts)}


def condition_summary(cells: list[Cell], work: Path, protocol: StudyProtocol) -> dict[str, Any] | None:
    """One run summary of a condition's finished cells (None when none finished)."""
    from ..analysis.summary import build_summary
    from ..engine.receipt import check_selection

    merged = _read_cells(cells, work)
    if not merged["records"]:
        return None
    labels = list(dict.fromkeys(r.arm for r in merged["records"]))
    summary = build_summary(
        merged["records"],
        labels=labels,
        receipts=merged["receipts"],
        arm_info=merged["arm_info"],
        evals=merged["evals"],
    )
    summary["data"], summary["notes"] = merged["data"], merged["notes"]
    choice = check_selection(summary, merged["evals"], merged["data"].get("heldout"))
    if choice is not None:
        summary["receipt"]["lr_choice"] = choice
    summary["cells"] = merged["cells"]
    summary["cells_consistent"] = cells_consistent(merged["receipts"])
    summary["status"] = "finished" if len(merged["cells"]) == len(cells) else "partial"
    return summary


def _extend(scales: dict[str, list[float]], selection: dict[str, Any], used: dict[str, int], limit: int) -> bool:
    """Grow the grid of every arm whose chosen multiplier sits at an edge by the next `LADDER` rung; True if any
    grew."""
    grew = False
    for arm, info in (selection.get("arms") or {}).items():
        chosen, grid = info.get("chosen"), sorted(scales.get(arm, []))
        if chosen is None or not info.get("at_edge") or used.get(arm, 0) >= limit:
            continue
        rung = LADDER.index(chosen)
        step = 1 if chosen == grid[-1] else -1
        if 0 <= rung + step < len(LADDER):
            scales[arm].append(LADDER[rung + step])
            used[arm] = used.get(arm, 0) + 1
            grew = True
    return grew


def run_study(
    protocol: StudyProtocol,
    out_dir: str | Path,
    *,
    work_dir: str | Path,
    overwrite: bool = False,
    charts: bool = True,
    observers: tuple = (),
) -> dict[str, Any]:
    """Run every unfinished cell (all of them with `overwrite`), then publish the study into `out_dir`:
    `summary.json` (protocol, the cells with their commits and times, both conditions' merged summaries), `study.md`
    and the charts. `observers` see every event of the cells it runs. Returns the study's summary."""
    out, work = Path(out_dir), Path(work_dir)
    if overwrite and work.exists():
        shutil.rmtree(work)
    started = time.perf_counter()
    scales = {arm: list(protocol.lr_grid) for arm in protocol.arms}
    used: dict[str, int] = {}
    while True:  # the plain condition: the grid, grown past an edge where the best LR sits on one
        cells = grid_cells(protocol, scales)
        for cell in cells:
            if not _finished(cell.folder(work)):
                _run_cell(cell, protocol, work, observers)
        plain = condition_summary(cells, work, protocol)
        if plain is None or plain["status"] != "finished":
            break
        if not _extend(scales, plain["lr_selection"], used, protocol.max_extensions):
            break
    conditions = {"plain": plain} if plain is not None else {}
    chosen = {
        arm: info.get("chosen") for arm, info in ((plain or {}).get("lr_selection") or {}).get("arms", {}).items()
    }
    if plain is not None and plain["status"] == "finished" and all(chosen.get(a) for a in protocol.arms):
        spike_cells = [
            Cell("spike", seed, tuple(_with_scale(a, chosen[a]) for a in protocol.arms), "chosen")
            for seed in protocol.seeds
        ]
        for cell in spike_cells:
            if not _finished(cell.folder(work)):
                _run_cell(cell, protocol, work, observers)
        spike = condition_summary(spike_cells, work, protocol)
        if spike is not None:
            conditions["spike"] = spike
    return publish_study(protocol, conditions, out, work=work, wall_s=time.perf_counter() - started, charts=charts)


def _published(summary: dict[str, Any]) -> dict[str, Any]:
    """A condition's summary as the study publishes it: each cell's receipt keeps its verdict and what differed,
    not every arm's per-step facts (the cells' own folders keep those)."""
    receipt = dict(summary.get("receipt") or {})
    receipt["per_seed"] = [{k: v for k, v in r.items() if k != "arms"} for r in receipt.get("per_seed", [])]
    return {**summary, "receipt": receipt}


def publish_study(
    protocol: StudyProtocol,
    conditions: dict[str, dict[str, Any]],
    out: Path,
    *,
    work: Path,
    wall_s: float,
    charts: bool,
) -> dict[str, Any]:
    """Write `summary.json`, `study.md` and the charts of a study into `out`; return the study's summary."""
    cells = [c for summary in conditions.values() for c in summary.get("cells", [])]
    study = {
        "protocol": protocol.to_dict(),
        "wall_s": sum(c.get("wall_s") or 0.0 for c in cells),  # the cells' own time, over every invocation
        "wall_s_this_invocation": wall_s,
        "wall_s_per_condition": {
            name: sum(c.get("wall_s") or 0.0 for c in summary.get("cells", [])) for name, summary in conditions.items()
        },
        "machine": {"cpus": cpu_cores(), "platform": platform.platform(), "python": platform.python_version()},
        "commit": _commit(),
        "cell_commits": sorted({c.get("commit") or "unknown" for c in cells}),
        "conditions": {name: _published(summary) for name, summary in conditions.items()},
        "status": {name: summary["status"] for name, summary in conditions.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    write_json(out / "summary.json", study)
    atomic_write_text(out / "study.md", study_markdown(study))
    if charts:
        study_charts(conditions, out, work)
    return study


def best_labels(summary: dict[str, Any]) -> list[str]:
    """The labels a condition is judged by: each arm at its chosen multiplier (plain), or as it ran (spike)."""
    from ..analysis.attribution import comparison_sets

    sets = comparison_sets(summary)
    chosen = sets.get("best_lr") or sets.get("as_run") or {}
    return list(chosen.get("labels", {}).values())


def study_charts(conditions: dict[str, dict[str, Any]], out: Path, work: Path) -> list[Path]:
    """`<condition>_<chart>.png` of every chart of `CHARTS`, drawn from the arms at their chosen LRs (none without a
    browser: the study's numbers stand without its pictures)."""
    from ..report.charts import ChartData, draw_charts
    from ..report.render import write_png_charts

    written: list[Path] = []
    for name, summary in conditions.items():
        labels = best_labels(summary)
        records: list[StepRecord] = []
        evals: list[EvalRecord] = []
        for cell in summary.get("cells", []):
            steps, held = read_metrics_jsonl(work / cell["cell"] / "metrics.jsonl")
            records += [r for r in steps if r.arm in labels]
            evals += [e for e in held if e.arm in labels]
        base = next((label for label in labels if parse_arm(label).name == "lora+zclip"), None)
        figures = draw_charts(ChartData(records, evals, summary, baseline=base))
        try:
            written += write_png_charts(figures, out, prefix=f"{name}_")
        except RuntimeError:
            return written
    return written


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def study_markdown(study: dict[str, Any]) -> str:
    """`study.md`: the protocol and its cost, how each arm's LR was chosen, per condition the attribution at each
    arm's best LR and at the shared LR, and each arm's figures."""
    from ..report.charts import CHARTS
    from ..report.claims import claims_blocks
    from ..report.render import Bullets, Heading, Para, Table, attribution_blocks, lr_selection_blocks, to_markdown

    p = study["protocol"]
    train_end, val_end = p["rows"], p["rows"] + p["val_rows"]
    grid = ", ".join(f"×{m:g}" for m in p["lr_grid"])
    commits = ", ".join(f"`{c[:12]}`" for c in study["cell_commits"])
    times = ", ".join(f"{k} {v / 60:.0f} min" for k, v in study["wall_s_per_condition"].items())
    blocks = [
        Heading("CRMA Lab study: each arm at its own best LR, judged on held-out loss", 1),
        Para(
            f"{p['model']} on the bundled instruction set: training rows 0–{train_end - 1}, validation rows "
            f"{train_end}–{val_end - 1} (they choose each arm's LR), test rows "
            f"{val_end}–{val_end + p['test_rows'] - 1} (they report). {p['steps']} steps of batch "
            f"{p['batch_size']} × {p['seq_len']} tokens, seeds "
            f"{', '.join(map(str, p['seeds']))}, arms {', '.join(p['arms'])}. Every arm trains at each LR multiplier "
            f"of {grid} (all of its optimizer groups together; an arm whose best multiplier is at an edge of the "
            f"grid is tried one rung further, up to {p['max_extensions']} time(s)); its multiplier is the one with "
            "the lowest mean final validation loss. The spike condition trains each arm at that multiplier, with a "
            f"corrupted batch at step {p['spike_at']} (loss ×{AblationConfig().spike_scale:g} for backward). Held-out "
            "losses at step 0 and at the "
            "end. The arms of one seed share its batches and initial weights, across cells too (checked below)."
        ),
        Para(
            f"Compute: {study['wall_s'] / 60:.0f} min on {study['machine']['cpus']} CPU cores ({times}); the cells "
            f"ran on commit(s) {commits}; published by `{(study.get('commit') or 'unknown')[:12]}`. Reproduce: "
            "`python -m crma study` (finished cells in `runs/study/` are kept: an interrupted study continues)."
        ),
        *claims_blocks(study, level=2),
    ]
    for name, summary in study["conditions"].items():
        title = "Plain" if name == "plain" else f"Spike stress at step {p['spike_at']} (each arm at its chosen LR)"
        blocks.append(Heading(title, 2))
        if summary.get("status") != "finished":
            blocks.append(Para(f"**This condition is {summary.get('status')}: not every cell finished.**"))
        consistent = summary.get("cells_consistent") or {}
        if consistent:
            verdict = "✅" if consistent.get("consistent") and consistent.get("fair") else "❌"
            problems = "; ".join(consistent.get("problems") or []) or "every cell's receipt is fair"
            blocks.append(Para(f"{verdict} Cells paired by seed (same batches, same LoRA init): {problems}."))
        blocks += lr_selection_blocks(summary)
        blocks += attribution_blocks(summary, level=3)
        arms = summary.get("arms", {})
        keys = ("final_test_loss", "final_loss_ema", "grad_norm_lora_peak", "grad_norm_lora_mean")
        keys += ("grad_norm_pre_peak", "steps_clipped")
        digits = (3, 3, 2, 2, 1, 1)
        rows = [
            [label, *(_f(arms[label].get(k), d) for k, d in zip(keys, digits, strict=True))]
            for label in best_labels(summary)
            if label in arms
        ]
        header = ["Arm (at its LR)", "held-out loss", "training loss (EMA)", "peak LoRA |g|", "mean LoRA |g|",
                  "peak global |g| before clipping", "clipped steps"]  # fmt: skip
        blocks += [Heading("Per arm, mean over seeds", 3), Table(header, rows)]
        charts = [f"{chart.title}: ![{name} {chart.key}]({name}_{chart.key}.png)" for chart in CHARTS]
        blocks += [Heading("Charts", 3), Bullets(charts)]
    return to_markdown(blocks)

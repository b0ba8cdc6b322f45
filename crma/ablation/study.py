"""`python -m crma study`: the published study — a fixed protocol run once plain and once with a spike stress step.

The protocol: the offline SmolLM2-135M, the bundled instruction rows, the 2x2 grid plus the capacity control
(`lora-matched`), five seeds, every arm on the same batches. Each condition is an ordinary ablation run (its own
folder with every file), and `study.md` / `study.json` put the two side by side with the attribution of each.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crma.config import JSONConfig

from .arms import STUDY_ARMS
from .config import AblationConfig
from .jsonio import write_json
from .records import Event, Phase, RunResult
from .render import attribution_sentences, attribution_table, summary_markdown


@dataclass
class StudyProtocol(JSONConfig):
    """The fixed protocol of the published study.

    Args:
        model (`str`): the model preset.
        rows (`int`): rows of the bundled data set (from row 0).
        seeds (`list[int]`): one paired run per seed.
        steps (`int`): optimizer steps per arm: long enough for ZClip's 25 warm-up steps and ~50 steps after them.
        batch_size (`int`): rows per step.
        seq_len (`int`): tokens per row.
        spike_at (`int`): the stress condition's corrupted-batch step (after ZClip's warm-up, with steps left to
            recover).
        arms (`list[str]`): the arms (the 2x2 grid and the capacity control).
    """

    model: str = "smollm2-135m"
    rows: int = 200
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    steps: int = 80
    batch_size: int = 2
    seq_len: int = 128
    spike_at: int = 50
    arms: list[str] = field(default_factory=lambda: list(STUDY_ARMS))

    @classmethod
    def toy(cls) -> StudyProtocol:
        """The same protocol at toy size (CI): the tiny random model, 2 seeds, a few steps."""
        return cls(model="tiny-random", rows=16, seeds=[1, 2], steps=4, spike_at=3)

    def condition(self, name: str) -> AblationConfig:
        """The ablation config of one condition: `plain` or `spike`."""
        return AblationConfig(
            model=self.model,
            dataset="bundled",
            rows=self.rows,
            seeds=list(self.seeds),
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            arms=list(self.arms),
            spike_at=self.spike_at if name == "spike" else None,
            # ZClip's published warm-up of 25 steps is longer than a toy run: scale it down there, never up.
            zclip={"warmup_steps": min(25, max(2, self.steps // 3))},
            save_adapters=False,
        )


CONDITIONS = ("plain", "spike")


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


PUBLISHED_CHARTS = ("loss.png", "grad_norm.png", "loss_delta.png")


def run_study(
    protocol: StudyProtocol,
    out_dir: str | Path,
    *,
    work_dir: str | Path,
    overwrite: bool = False,
    charts: bool = True,
) -> Iterator[Event]:
    """Run both conditions into `work_dir/<condition>/` (every file of a run), then publish the study into
    `out_dir`: `summary.json` (the protocol, wall time, commit and both conditions' summaries), `study.md` and the
    charts of each condition (`<condition>_loss.png`, ...). Yields every event of both runs."""
    from .writer import check_out_dir, write_run

    out, work = Path(out_dir), Path(work_dir)
    for folder in (out, *(work / name for name in CONDITIONS)):  # all refused now, not an hour in
        check_out_dir(folder, overwrite=overwrite)
    started = time.perf_counter()
    results: dict[str, RunResult] = {}
    timing: dict[str, float] = {}
    for name in CONDITIONS:
        yield Phase(f"study: {name} condition")
        began = time.perf_counter()
        for event in write_run(protocol.condition(name), work / name, overwrite=overwrite, charts=charts):
            if isinstance(event, RunResult):
                results[name] = event
            yield event
        timing[name] = time.perf_counter() - began
    wall = time.perf_counter() - started
    study = {
        "protocol": protocol.to_dict(),
        "wall_s": wall,
        "wall_s_per_condition": timing,
        "machine": {"cpus": _cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "commit": _commit(),
        "conditions": {name: result.summary for name, result in results.items()},
        "status": {name: result.status for name, result in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", study)
    (out / "study.md").write_text(study_markdown(study), encoding="utf-8")
    for name in CONDITIONS:
        for chart in PUBLISHED_CHARTS:
            if (work / name / chart).is_file():
                shutil.copyfile(work / name / chart, out / f"{name}_{chart}")
    yield Phase(f"study written to {out}")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def study_markdown(study: dict[str, Any]) -> str:
    """`study.md`: the protocol, the wall time, and per condition the attribution table, its sentences and the
    per-arm table."""
    p = study["protocol"]
    lines = [
        "# CRMA Lab study: does the mixing tame fine-tuning?",
        "",
        f"Protocol: {p['model']}, bundled rows 0–{p['rows'] - 1}, {len(p['seeds'])} seeds "
        f"({', '.join(map(str, p['seeds']))}), "
        f"{p['steps']} steps, batch {p['batch_size']} × {p['seq_len']} tokens, arms {', '.join(p['arms'])}; "
        f"the stress condition corrupts step {p['spike_at']}'s batch (loss ×20 for backward).",
        "",
        f"Wall time: {_minutes(study['wall_s'])} on {study['machine']['cpus']} CPU cores "
        f"({', '.join(f'{k} {_minutes(v)}' for k, v in study['wall_s_per_condition'].items())}); "
        f"commit `{(study.get('commit') or 'unknown')[:12]}`.",
        "",
        "Reproduce: `python -m crma study` (writes `assets/study/`; every run's files go to `runs/study/`).",
    ]
    for name, summary in study["conditions"].items():
        title = "Plain" if name == "plain" else f"Spike stress at step {p['spike_at']}"
        lines += ["", f"## {title}", ""]
        table = attribution_table(summary)
        if table is not None:
            header, rows = table
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        lines += [f"- {s}" for s in attribution_sentences(summary)]
        lines += ["", summary_markdown(summary, title=f"{title}: per arm").replace("## ", "### ", 1)]
    charts = [f"![{name}: {chart[:-4]}]({name}_{chart})" for name in study["conditions"] for chart in PUBLISHED_CHARTS]
    lines += ["", "## Charts", "", *charts]
    return "\n".join(lines).rstrip() + "\n"

"""The page's "What a well-powered run found" panel: the committed study (`python -m crma study`) read from disk.

The study folder holds `summary.json` (protocol, wall time, machine, commit, both conditions' run summaries),
`study.md` and the PNG charts `<condition>_<chart>.png`. Nothing here trains: the panel shows what is committed, or
says that nothing is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crma.ablation.report.blocks import to_markdown
from crma.ablation.report.charts import CHARTS
from crma.ablation.report.claims import claims_blocks
from crma.ablation.report.render import attribution_markdown

STUDY_DIR_ENV = "CRMA_STUDY_DIR"
_REPO = Path(__file__).resolve().parents[2]
_CONDITION_TITLES = {"plain": "Plain training", "spike": "With a spike"}


def study_dir() -> Path:
    """Where the published study lives: `$CRMA_STUDY_DIR`, else `assets/study/` of the repository."""
    return Path(os.environ.get(STUDY_DIR_ENV) or _REPO / "assets" / "study")


@dataclass
class PublishedStudy:
    """What the panel shows.

    Args:
        markdown (`str`): the panel's text: the protocol and, per condition, the attribution with its intervals; or
            why there is no study to show.
        charts (`list[tuple[str, str]]`): `(png path, caption)` of the study's charts that exist.
        found (`bool`): a study was read.
    """

    markdown: str
    charts: list[tuple[str, str]] = field(default_factory=list)
    found: bool = False


def load_published_study(folder: str | os.PathLike[str] | None = None) -> PublishedStudy:
    """Read the study in `folder` (default `study_dir()`) into the panel's text and charts.

    Args:
        folder (`str | PathLike | None`): the study folder.

    Returns:
        `PublishedStudy`: `found=False` with a plain message when the folder or its `summary.json` is missing or
        unreadable.
    """
    root = Path(folder) if folder is not None else study_dir()
    summary_file = root / "summary.json"
    if not summary_file.is_file():
        return PublishedStudy(_missing_message())
    try:
        study = json.loads(summary_file.read_text(encoding="utf-8"))
        text = study_panel_markdown(study)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return PublishedStudy(f"The published study in `{root.name}/summary.json` could not be read ({exc}).")
    charts = []
    for condition in study.get("conditions", {}):
        for chart in CHARTS:
            png = root / f"{condition}_{chart.key}.png"
            if png.is_file():
                charts.append((str(png), f"{_CONDITION_TITLES.get(condition, condition)}: {chart.title.lower()}"))
    return PublishedStudy(text, charts, found=True)


def study_panel_markdown(study: dict[str, Any]) -> str:
    """The panel's Markdown for a study's `summary.json`: the protocol, then per condition the attribution (effects
    with 95 % intervals over the study's seeds) and its plain sentences.

    Args:
        study (`dict`): the study's `summary.json`.

    Returns:
        `str`: Markdown.
    """
    p = study["protocol"]
    seeds = list(p["seeds"])
    machine = study.get("machine") or {}
    commit = (study.get("commit") or "unknown")[:12]
    spike, train_end = p.get("spike_at"), p["rows"]
    val_end = train_end + p.get("val_rows", 0)
    grid = ", ".join(f"×{m:g}" for m in p.get("lr_grid", [1.0]))
    lines = [
        f"The committed study: {p['model']} on the bundled set, **{len(seeds)} seeds** "
        f"({', '.join(map(str, seeds))}), **{p['steps']} steps**, batch {p['batch_size']} × {p['seq_len']} tokens, "
        f"arms {', '.join(p['arms'])}. "
        f"Training rows 0–{train_end - 1}; each arm tried at LR multipliers {grid} (further where its best sat at an "
        f"edge) and judged at the one with the lowest loss on validation rows {train_end}–{val_end - 1}; "
        f"**the answer is the held-out loss on test rows {val_end}–{val_end + p.get('test_rows', 0) - 1}**, which "
        f"no choice looked at. Once plain and once with a corrupted batch at step {spike}. "
        f"Wall time {_duration(study['wall_s'])} on {machine.get('cpus', '?')} CPU cores, commit `{commit}`. "
        "Reproduce it with `python -m crma study`.",
        "",
        "A short run on one seed gives one number per effect and no interval; here each effect has a 95 % interval "
        "over the study's seeds. An interval that contains 0 means the study cannot tell the effect from noise.",
        "",
        to_markdown(claims_blocks(study, level=4)).strip(),
    ]
    status = study.get("status") or {}
    for name, summary in study["conditions"].items():
        title = _CONDITION_TITLES.get(name, name) + (f" at step {spike}" if name == "spike" else "")
        lines += ["", f"#### {title}", ""]
        if status.get(name, "finished") != "finished":
            lines += [f"**This condition {status[name]} before it finished: its numbers are partial.**", ""]
        lines.append(attribution_markdown(summary, level=0) or "No attribution in this condition's summary.")
    return "\n".join(lines).rstrip() + "\n"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _missing_message() -> str:
    from crma.ablation.output.study import StudyProtocol

    p = StudyProtocol()
    return (
        "**No published study yet.** The maintainers run `python -m crma study` — "
        f"{p.model}, {len(p.seeds)} seeds, {p.steps} steps, arms {', '.join(p.arms)}, each at its own best LR on a "
        f"validation slice, judged on a held-out test slice, once plain and once with a corrupted batch at step "
        f"{p.spike_at} — and commit its results to `assets/study/`; this panel will show its "
        "effects with 95 % intervals. Until then a run here is the only evidence: run several seeds before trusting "
        "a difference."
    )

"""A run's report files: `summary.md`, `report.html` (the document and every chart of `charts.CHARTS`,
self-contained) and the PNG charts, written into its folder.

The document is built in `sections.py` from blocks of `blocks.py`; this module also re-exports their public names,
so the rest of the code imports the report from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .blocks import Bullets, Code, Figure, Heading, Para, Table, md_table, to_html, to_markdown  # noqa: F401
from .charts import CHARTS, ChartData, draw_charts
from .sections import (  # noqa: F401
    answers_blocks,
    attribution_blocks,
    attribution_markdown,
    attribution_sentences,
    lr_selection_blocks,
    receipt_blocks,
    receipt_markdown,
    run_document,
    status_note,
    summary_markdown,
)

_CHROMIUM = "/usr/bin/chromium"


def report_html(
    records: Sequence[Any],
    summary: dict[str, Any],
    *,
    evals: Sequence[Any] = (),
    title: str = "LoRA vs LoRA+CRMA",
    config: dict[str, Any] | None = None,
    smoothing: float = 0.6,
) -> str:
    """`report.html`: the run's document and every chart of `CHARTS`, self-contained (it opens offline).

    Args:
        records (`Sequence[StepRecord]`), evals (`Sequence[EvalRecord]`): the run's records.
        summary (`dict`): `summary.json`.
        title (`str`): page title and heading.
        config (`dict | None`): the run config, shown as JSON at the end.
        smoothing (`float`): EMA weight of the charts.
    """
    figures = draw_charts(ChartData(records, evals, summary, smoothing=smoothing, baseline=summary.get("baseline")))
    blocks = run_document(summary, title=title)
    blocks[0] = Heading(title, 1)
    blocks += [Heading("Charts", 2), *(Figure(chart.key) for chart in CHARTS)]
    if config is not None:
        blocks += [Heading("Config", 2), Code(json.dumps(config, indent=2, sort_keys=True, default=str))]
    return to_html(blocks, figures, title=title)


def run_title(cfg: Any) -> str:
    """`lora vs lora+crma on smollm2-135m`: what a run's files are headed with."""
    return f"{' vs '.join(cfg.arm_labels)} on {cfg.model}"


def write_reports(folder: Path, result: Any, cfg: Any, *, charts: bool = True) -> None:
    """Write `metrics.csv`, `summary.md`, `report.html` and (with `charts`) the PNG charts of a finished run into
    its folder; a missing browser for the PNGs becomes a note of the run, not a failure."""
    from ..engine.records import write_metrics_csv
    from ..jsonio import atomic_write_text

    title = run_title(cfg)
    summary = {**result.summary, "status": result.status, "error": result.error, "notes": list(result.notes)}
    if not result.records:
        (folder / "summary.md").write_text(f"# {title}\n\nNo step finished: {result.error}\n", encoding="utf-8")
        return
    write_metrics_csv([*result.records, *result.evals], folder / "metrics.csv")
    atomic_write_text(folder / "summary.md", summary_markdown(summary, title=title))
    page = report_html(result.records, summary, evals=result.evals, title=title, config=cfg.to_dict())
    atomic_write_text(folder / "report.html", page)
    if charts:
        figures = draw_charts(ChartData(result.records, result.evals, summary, baseline=summary.get("baseline")))
        try:
            write_png_charts(figures, folder)
        except RuntimeError as exc:  # no Chrome for static export: the HTML report still has every chart
            result.notes.append(f"PNG charts not written: {exc}")


NO_BROWSER = (
    "no Chrome or Chromium on this machine, so the PNG charts are not written (report.html and the page still have "
    "every chart): install Debian's `chromium` (`make app` tries), on a Space via packages.txt, or set BROWSER_PATH"
)


def png_browser() -> str | None:
    """The Chrome/Chromium kaleido would draw the PNG charts with, found as kaleido finds it (None: there is none)."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # choreographer moved or broke: say nothing is there rather than fail a run
        return None


def write_png_charts(
    figures: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    width: int = 1100,
    height: int = 520,
    scale: float = 2.0,
    prefix: str = "",
) -> list[Path]:
    """Export every chart of `figures` (`charts.draw_charts`; None entries are skipped) as `<prefix><key>.png` with
    kaleido.

    kaleido renders through a Chrome/Chromium. When `BROWSER_PATH` is unset and `/usr/bin/chromium` exists, it is
    used (and `BROWSER_PATH` is set for the process). All figures go through one `plotly.io.write_images` call: one
    browser session instead of one per figure, which is most of the export's time.

    Args:
        figures (`dict[str, Figure | None]`): the charts by key.
        out_dir (`str | PathLike`): folder to write into (created).
        width, height (`int`): layout size in pixels (a figure with its own height keeps it); `scale` multiplies the
            output resolution.
        prefix (`str`): put before each file name (the published study's `plain_loss.png`).

    Returns:
        `list[Path]` of the written files.

    Raises:
        `RuntimeError`: static export is impossible (no Chrome/Chromium found, or kaleido failed to drive it).
    """
    chosen = {key: fig for key, fig in figures.items() if fig is not None}
    if not chosen:
        raise ValueError("no chart to export")
    import plotly.io as pio

    if not os.environ.get("BROWSER_PATH") and os.path.exists(_CHROMIUM):
        os.environ["BROWSER_PATH"] = _CHROMIUM
    if png_browser() is None:
        raise RuntimeError(NO_BROWSER)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{key}.png" for key in chosen]
    heights = [int(fig.layout.height or height) for fig in chosen.values()]
    try:
        for fig, h in zip(chosen.values(), heights, strict=True):
            fig.update_layout(height=h)
        pio.write_images(list(chosen.values()), paths, format="png", width=width, height=heights, scale=scale)
    except Exception as err:  # kaleido/choreographer raise RuntimeError, ChromeNotFoundError, OSError, timeouts...
        raise RuntimeError(
            "PNG export failed: kaleido needs a Chrome or Chromium browser (install Debian's `chromium`, on a Space "
            f"via packages.txt, or point BROWSER_PATH at one). BROWSER_PATH={os.environ.get('BROWSER_PATH')!r}. "
            f"Cause: {type(err).__name__}: {str(err).strip()}"
        ) from err
    return paths

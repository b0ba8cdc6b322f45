"""The charts of a run, in one list: the page, `report.html`, the PNG export, the Hub push and the published study
all draw `CHARTS`, so they show the same set. A new chart is a figure function in `plots.py` and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.records import EvalRecord, StepRecord
from ..spec.arms import baseline_arm
from . import plots


@dataclass
class ChartData:
    """What a chart is drawn from.

    Args:
        records (`Sequence[StepRecord]`), evals (`Sequence[EvalRecord]`): the run's records so far.
        summary (`dict | None`): `summary.json` once the run ended (charts of its analysis need it).
        smoothing (`float`): EMA weight of the lines (the raw line stays faint behind).
        log_scale (`bool`): logarithmic gradient-norm axis.
        seed (`int | None`): one seed only (a multi-seed run while it trains); None: the mean over seeds.
        baseline (`str | None`): the arm differences are taken against (default: `arms.baseline_arm`).
    """

    records: Sequence[StepRecord]
    evals: Sequence[EvalRecord] = ()
    summary: dict[str, Any] | None = None
    smoothing: float = 0.6
    log_scale: bool = False
    seed: int | None = None
    baseline: str | None = None
    arms: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.arms = list(dict.fromkeys(r.arm for r in self.records))


@dataclass(frozen=True)
class Chart:
    """One chart: its key (PNG file `<key>.png`, element `chart-<key>`), its title, and how it is drawn (None when
    the run has nothing to show in it)."""

    key: str
    title: str
    draw: Callable[[ChartData], Any]


def _delta(d: ChartData) -> Any:
    base = d.baseline or baseline_arm(d.arms)
    if base not in d.arms:  # the baseline has no record yet (it trains after the other arms): the chart says so
        return plots.make_delta_figure([], baseline=base)
    return (
        plots.make_delta_figure(d.records, baseline=base, smoothing=d.smoothing, seed=d.seed)
        if len(d.arms) > 1
        else None
    )


def _mixing(d: ChartData) -> Any:
    return plots.make_mixing_figure(d.records) if any(r.crma for r in d.records) else None


def _lr(d: ChartData) -> Any:
    selection = (d.summary or {}).get("lr_selection") or {}
    return plots.make_lr_figure(selection) if selection.get("tuned") else None


CHARTS: tuple[Chart, ...] = (
    Chart("loss", "Loss", lambda d: plots.make_loss_figure(d.records, d.evals, smoothing=d.smoothing, seed=d.seed)),
    Chart(
        "grad_norm",
        "Gradient norm",
        lambda d: plots.make_grad_norm_figure(d.records, smoothing=d.smoothing, log_scale=d.log_scale, seed=d.seed),
    ),
    Chart("loss_delta", "Loss difference", _delta),
    Chart("mixing", "CRMA mixing diagnostics", _mixing),
    Chart("lr_sensitivity", "LR sensitivity", _lr),
)
CHART_KEYS = tuple(chart.key for chart in CHARTS)


def draw_charts(data: ChartData) -> dict[str, Any]:
    """`{key: figure or None}` of every chart in `CHARTS` (None: nothing to show for this run)."""
    if not data.records:
        return {chart.key: None for chart in CHARTS}
    return {chart.key: chart.draw(data) for chart in CHARTS}

"""Pure chart builders of the ablation engine: `list[StepRecord] -> plotly Figure`, no I/O, no gradio.

Every figure overlays all arms of a run with a fixed colour *and* dash per arm (`arm_style`), so the charts stay
readable in grey-scale print and for colour-blind readers. When the records hold several seeds and no `seed` is
chosen, each line is the mean over seeds per step with a faint min–max band. The parts they are built from (styles,
series, traces, layout) are in `traces.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from ..analysis.summary import check_weight, spike_steps
from ..engine.records import EvalRecord, StepRecord
from .traces import (
    Layers,
    Series,
    add_arm,
    arm_colour,
    arm_line,
    arm_style,  # noqa: F401 (re-exported: crma.lab.tryout imports it from here)
    as_float,
    empty,
    group_by_arm,
    hover,
    layout,
    markers,
    none_if_bad,
    seed_note,
    select_seed,
    series,
    smoothed,
    smoothing_line,
)

# Panel titles stay short (a phone shows ~40 characters); the page and the report explain each figure.
_CRMA_METRICS = (
    ("sigma2_mean", "σ₂ (1 = no mixing)"),
    ("dist_from_identity_mean", "‖M − I‖_F (0 = identity)"),
    ("composite_gain", "Composite gain over depth"),
)
_NO_RECORDS = "No records yet"


# ----------------------------------------------------------------------------------------------------------------
# loss


def _heldout_traces(evals: Sequence[EvalRecord], seed: int | None, arms: list[str]) -> list[go.Scatter]:
    """Per arm, its test-slice loss at each evaluation (mean over the seeds evaluated): diamonds, dotted line."""
    chosen = [e for e in evals if e.split == "test" and (seed is None or e.seed == seed)]
    out = []
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        for e in chosen:
            if e.arm == arm and math.isfinite(e.loss):
                by_step.setdefault(e.step, []).append(e.loss)
        if not by_step:
            continue
        steps = sorted(by_step)
        out.append(
            arm_line(
                arm,
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                name=f"{arm} held-out",
                dash="dot",
                width=1.5,
                mode="lines+markers",
                marker=dict(symbol="diamond", size=9, color=arm_colour(arm)),
                hovertemplate="held-out %{y:.4f}",
            )
        )
    return out


def make_loss_figure(
    records: Sequence[StepRecord],
    evals: Sequence[EvalRecord] = (),
    *,
    smoothing: float = 0.6,
    seed: int | None = None,
) -> go.Figure:
    """Training loss vs step, every arm overlaid, with each arm's held-out (test) loss at its evaluations.

    Args:
        records (`Sequence[StepRecord]`): the run's records (any arms, any seeds).
        evals (`Sequence[EvalRecord]`): the run's held-out evaluations (its test split is drawn, ◆ on dotted lines).
        smoothing (`float`): debiased EMA weight in [0, 1); when > 0 the raw line is drawn faint behind the smoothed.
        seed (`int | None`): plot this seed only; None with several seeds plots the mean over seeds and a min–max band.

    Returns:
        `go.Figure`: traces in drawing order bands, raw lines, smoothed lines, divergence markers ("x" on the last
        finite value, with hover text).
    """
    check_weight("smoothing", smoothing)
    recs, multi = select_seed(records, seed)
    layers = Layers()
    groups = group_by_arm(recs)
    for arm, by_step in groups.items():
        s = series(by_step, lambda r: r.loss, multi, arm)
        line = dict(customdata=none_if_bad(s.y), hovertemplate=hover(smoothing, ".4f"))
        add_arm(layers, arm, s, smoothed(s.y, smoothing), smoothing, "loss", **line)
    heldout = _heldout_traces(evals, seed, list(groups))
    fig = go.Figure(layers.traces() + heldout)
    if not layers.lines:
        empty(fig, _NO_RECORDS)
    notes = [smoothing_line(smoothing, "training: "), seed_note(multi, seed, recs)]
    if heldout:
        notes.insert(1, "◆ dotted: held-out (test) loss")
    return layout(fig, title="Loss", lines=notes, y_title="loss", revision="loss")


# ----------------------------------------------------------------------------------------------------------------
# gradient norm


def _clipped_trace(arm: str, by_step: dict[int, list[StepRecord]], s: Series, multi: bool) -> go.Scatter | None:
    """A small circle on the raw pre-clip value of every step on which some seed was clipped."""
    raw_at = dict(zip(s.steps, s.y, strict=True))
    points = []
    for step, recs in by_step.items():
        clipped = sum(r.clipped for r in recs)
        if clipped and math.isfinite(raw_at[step]):
            seeds = f" in {clipped}/{len(recs)} seeds" if multi else ""
            points.append((step, raw_at[step], f"{arm} clipped at step {step}{seeds}"))
    if not points:
        return None
    xs, ys, texts = (list(column) for column in zip(*points, strict=True))
    return markers(arm, "clipped", xs, ys, dict(symbol="circle", size=4), texts)


def _spike_trace(arm: str, s: Series) -> go.Scatter | None:
    """A triangle on every spike (`spike_steps`) of the raw pre-clip series."""
    spikes = spike_steps(s.y)
    if not spikes:
        return None
    return markers(
        arm,
        "spike",
        [s.steps[i] for i in spikes],
        [s.y[i] for i in spikes],
        dict(symbol="triangle-up", size=12, line=dict(width=1, color="#000000")),
        [f"{arm} spike at step {s.steps[i]}: {s.y[i]:.3g}" for i in spikes],
    )


def _grad_norm_arm(
    layers: Layers, arm: str, by_step: dict[int, list[StepRecord]], multi: bool, smoothing: float, show_post: bool
) -> None:
    """One arm's traces of the gradient-norm figure: post-clip line, pre-clip line, clipped, spike and divergence
    markers."""
    s = series(by_step, lambda r: r.grad_norm_pre, multi, arm)
    if show_post:
        post = series(by_step, lambda r: r.grad_norm_post, multi, arm)
        layers.posts.append(
            arm_line(
                arm,
                post.steps,
                none_if_bad(post.y),
                name=f"{arm} post-clip",
                dash="dot",
                width=1,
                showlegend=False,
                opacity=0.6,
                hovertemplate="raw %{y:.3f}",
            )
        )
    layers.marks += [m for m in (_clipped_trace(arm, by_step, s, multi), _spike_trace(arm, s)) if m is not None]
    line = dict(customdata=none_if_bad(s.y), hovertemplate=hover(smoothing, ".3f", prefix="pre-clip, "))
    add_arm(layers, arm, s, smoothed(s.y, smoothing), smoothing, "grad norm", **line)


def make_grad_norm_figure(
    records: Sequence[StepRecord],
    *,
    smoothing: float = 0.0,
    log_scale: bool = False,
    seed: int | None = None,
    show_post: bool = True,
) -> go.Figure:
    """Pre-clip global gradient norm per arm, with clipped steps and spikes marked.

    Args:
        records (`Sequence[StepRecord]`): the run's records.
        smoothing (`float`): EMA weight for the pre-clip line; when > 0 the raw line is drawn faint behind it.
        log_scale (`bool`): logarithmic y axis.
        seed (`int | None`): plot this seed only; None with several seeds plots the mean over seeds and a band.
        show_post (`bool`): also draw the post-clip norm (thin, dotted, faint).

    Returns:
        `go.Figure`: clipped steps as small circles, spikes (`report.spike_steps` on the raw pre-clip series) as
        larger triangles, divergence as "x".
    """
    check_weight("smoothing", smoothing)
    recs, multi = select_seed(records, seed)
    layers = Layers()
    for arm, by_step in group_by_arm(recs).items():
        _grad_norm_arm(layers, arm, by_step, multi, smoothing, show_post)
    fig = go.Figure(layers.traces())
    if not layers.lines:
        empty(fig, _NO_RECORDS)
    if log_scale:
        fig.update_yaxes(type="log")
    notes = [
        smoothing_line(smoothing, "pre-clip: "),
        ("dotted: post-clip (raw) · " if show_post else "") + "● clipped · ▲ spike",
        seed_note(multi, seed, recs),
    ]
    return layout(fig, title="Gradient norm (global L2)", lines=notes, y_title="grad norm", revision="grad_norm")


# ----------------------------------------------------------------------------------------------------------------
# loss difference


def _paired_delta(
    arm_steps: dict[int, list[StepRecord]], base_steps: dict[int, list[StepRecord]], multi: bool
) -> Series:
    """loss(arm) − loss(baseline) per step, paired by seed, on the steps both have; non-finite pairs are skipped."""
    s = Series.empty(multi)
    for step in sorted(set(arm_steps) & set(base_steps)):
        base = {r.seed: as_float(r.loss) for r in base_steps[step]}
        diffs = [as_float(r.loss) - base[r.seed] for r in arm_steps[step] if r.seed in base]
        diffs = [d for d in diffs if math.isfinite(d)]
        if diffs:
            s.append(step, diffs)
    return s


def make_delta_figure(
    records: Sequence[StepRecord], *, baseline: str = "lora", smoothing: float = 0.6, seed: int | None = None
) -> go.Figure:
    """Loss difference `loss(arm) − loss(baseline)` per step for every other arm, with a zero line.

    Below zero means the arm's loss is lower. The annotation (and `fig.layout.meta["lower_share"]`) gives, per arm,
    the share of the paired steps on which its raw loss was strictly lower than the baseline's; with several seeds
    and `seed=None` the share is taken on the mean-over-seeds difference.

    Args:
        records (`Sequence[StepRecord]`): the run's records.
        baseline (`str`): the arm everything is compared with.
        smoothing (`float`): EMA weight for the difference line; when > 0 the raw difference is drawn faint behind.
        seed (`int | None`): plot this seed only; None with several seeds plots the mean paired difference and a band.

    Returns:
        `go.Figure`.
    """
    check_weight("smoothing", smoothing)
    recs, multi = select_seed(records, seed)
    groups = group_by_arm(recs)
    if groups and baseline not in groups:
        raise ValueError(f"`baseline` {baseline!r} is not an arm of the records; arms present: {list(groups)}")
    layers, notes, shares = Layers(), [], {}
    for arm, by_step in groups.items():
        if arm == baseline:
            continue
        s = _paired_delta(by_step, groups[baseline], multi)
        if not s.steps:
            continue
        lower = sum(d < 0 for d in s.y)
        shares[arm] = lower / len(s.y)
        notes.append(
            f"<span style='color:{arm_colour(arm)}'>{arm}: lower on {100 * shares[arm]:.0f} % of steps "
            f"({lower}/{len(s.y)})</span>"
        )
        y = smoothed(s.y, smoothing)
        # Signed numbers are formatted here: the "+" flag of a d3 format is not honoured by every plotly.js build
        # (Gradio 6.31's printed 16 digits), and a difference must show its sign.
        signed = [[f"{v:+.4f}", f"{raw:+.4f}"] for v, raw in zip(y, s.y, strict=True)]
        hover_text = f"Δ EMA {smoothing:g}: %{{customdata[0]}} · raw %{{customdata[1]}}"
        line = dict(customdata=signed, hovertemplate=hover_text if smoothing > 0 else "Δ raw %{customdata[1]}")
        add_arm(layers, arm, s, y, smoothing, "Δloss", **line)
    fig = go.Figure(layers.traces())
    fig.add_hline(y=0, line=dict(color="#555555", width=1))
    if not notes:
        empty(fig, f"Need another arm besides {baseline!r} to compare")
    fig.update_layout(meta={"baseline": baseline, "lower_share": shares})
    # One line per arm under the title: each fits a phone's width, where one joined line would be cut.
    lines = [f"below 0: lower loss than {baseline}", smoothing_line(smoothing), seed_note(multi, seed, recs)]
    return layout(
        fig,
        title=f"Loss difference vs {baseline}",
        lines=lines + notes,
        y_title=f"loss − loss({baseline})",
        revision="loss_delta",
    )


# ----------------------------------------------------------------------------------------------------------------
# CRMA mixing, LR sensitivity


def make_mixing_figure(records: Sequence[StepRecord], *, seed: int | None = None) -> go.Figure:
    """CRMA mixing diagnostics over steps for the arms that report them: σ₂, ‖M − I‖_F and the composite gain.

    Args:
        records (`Sequence[StepRecord]`): the run's records; only those with a `crma` dict are used.
        seed (`int | None`): this seed only; None with several seeds plots the mean over seeds.

    Returns:
        `go.Figure` with three stacked panels sharing the step axis, one trace per CRMA arm and panel.
    """
    from plotly.subplots import make_subplots

    recs, multi = select_seed(records, seed)
    fig = make_subplots(
        rows=len(_CRMA_METRICS),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=[label for _, label in _CRMA_METRICS],
    )
    groups = group_by_arm(r for r in recs if r.crma)
    for arm, by_step in groups.items():
        for row, (key, label) in enumerate(_CRMA_METRICS, start=1):
            s = series(by_step, lambda r, k=key: (r.crma or {}).get(k), multi, arm)
            trace = arm_line(
                arm,
                s.steps,
                none_if_bad(s.y),
                mode="lines+markers",
                showlegend=row == 1,
                marker=dict(size=5),
                hovertemplate=f"{label}: %{{y:.4g}}<extra>{arm}</extra>",
            )
            fig.add_trace(trace, row=row, col=1)
    if not groups:
        empty(fig, "No CRMA diagnostics in these records (no CRMA arm, or before the first diag step)")
    layout(fig, title="CRMA mixing diagnostics", lines=[seed_note(multi, seed, recs)], y_title="", revision="mixing")
    fig.update_xaxes(title_text=None)
    fig.update_xaxes(title_text="step", row=len(_CRMA_METRICS), col=1)
    # The first panel's own title sits where the figure's title would: lift the figure's title above it.
    fig.update_layout(height=720, title_pad_b=30)
    return fig


def _lr_traces(arm: str, info: dict[str, Any]) -> list[go.Scatter]:
    """An arm's final validation loss at each multiplier (mean, min–max bar) and a ring on the chosen one."""
    points = [p for p in info["grid"] if p["mean"] is not None]
    if not points:
        return []
    y = [p["mean"] for p in points]
    spread = [[v for v in p["per_seed"] if v is not None] for p in points]
    bars = dict(
        type="data",
        symmetric=False,
        array=[max(s) - m for s, m in zip(spread, y, strict=True)],
        arrayminus=[m - min(s) for s, m in zip(spread, y, strict=True)],
        thickness=1,
    )
    out = [
        arm_line(
            arm,
            [p["lr_scale"] for p in points],
            y,
            mode="lines+markers",
            marker=dict(size=8),
            error_y=bars,
            hovertemplate="×%{x:g}: validation loss %{y:.4f}",
        )
    ]
    if info.get("chosen") is not None:
        best = next(p for p in points if p["lr_scale"] == info["chosen"])
        ring = dict(symbol="circle-open", size=18, line=dict(width=2, color=arm_colour(arm)))
        chosen = f"{arm}: chosen ×%{{x:g}}<extra></extra>"
        out.append(markers(arm, "chosen", [best["lr_scale"]], [best["mean"]], ring, hovertemplate=chosen))
    return out


def make_lr_figure(selection: dict[str, Any]) -> go.Figure:
    """The LR-sensitivity figure of a tuned run: each arm's final validation loss against its LR multiplier (log
    axis), mean over seeds with a min–max bar, the chosen multiplier ringed.

    Args:
        selection (`dict`): a summary's `lr_selection` block (`tuned` True).

    Returns:
        `go.Figure`.
    """
    arms = selection.get("arms") or {}
    fig = go.Figure([trace for arm, info in arms.items() for trace in _lr_traces(arm, info)])
    if not fig.data:
        empty(fig, "No arm was trained at several learning rates")
    n = max((len(p["per_seed"]) for info in arms.values() for p in info["grid"]), default=0)
    layout(
        fig,
        title="LR sensitivity",
        lines=[f"final validation loss, mean of {n} seed(s) (bar: min–max)", "○ the multiplier each arm is judged at"],
        y_title="validation loss",
        revision="lr",
    )
    fig.update_xaxes(type="log", title_text="LR multiplier (× the run's LRs)", dtick=None)
    return fig

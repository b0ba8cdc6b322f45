"""Pure chart builders of the ablation engine: `list[StepRecord] -> plotly Figure`, no I/O, no gradio.

Every figure overlays all arms of a run with a fixed colour *and* dash per arm (`arm_style`), so the charts stay
readable in grey-scale print and for colour-blind readers. When the records hold several seeds and no `seed` is
chosen, each line is the mean over seeds per step with a faint min–max band.

Traces are plain `go.Scatter` (not `Scattergl`): WebGL is missing in headless browsers and in kaleido's static
export, and a 1,000-step × 4-arm run is only a few thousand points anyway.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from ..analysis.summary import check_weight, smooth, spike_steps
from ..engine.records import EvalRecord, StepRecord

# Okabe–Ito palette (colour-blind safe). The four named arms get fixed colours; anything else is hashed
# (crc32, stable across processes, unlike `hash`) onto the rest.
_ARM_COLOURS = {
    "lora": "#0072B2",  # blue
    "lora+crma": "#D55E00",  # vermillion
    "lora+zclip": "#009E73",  # bluish green
    "lora+mix": "#CC79A7",  # reddish purple
    "lora+crma-nomix": "#E69F00",  # orange
    "lora-matched": "#56B4E9",  # sky blue
}
_SPARE_COLOURS = ("#000000", "#F0E442")
_ARM_DASHES = {
    "lora": "solid",
    "lora+crma": "dash",
    "lora+zclip": "dashdot",
    "lora+mix": "longdash",
    "lora+crma-nomix": "dot",
    "lora-matched": "longdashdot",
}
# An arm at several LR multipliers keeps its colour; the multiplier picks the dash.
_SCALE_DASHES = {0.03: "2px,5px", 0.1: "dot", 0.3: "dashdot", 1.0: "solid", 3.0: "dash", 10.0: "longdash"}
_SPARE_DASHES = ("solid", "dash", "dashdot", "longdash")
# A/A copies (`lora#2`, `lora#3`, ...) keep their arm's colour and take one of these instead; "dot" is left to the
# post-clip gradient-norm lines.
_COPY_DASHES = ("longdashdot", "8px,3px,2px,3px,2px,3px", "2px,5px", "12px,4px")

_RAW_OPACITY = 0.25
_BAND_ALPHA = 0.15
# Panel titles stay short (a phone shows ~40 characters); the page and the report explain each figure.
_CRMA_METRICS = (
    ("sigma2_mean", "σ₂ (1 = no mixing)"),
    ("dist_from_identity_mean", "‖M − I‖_F (0 = identity)"),
    ("composite_gain", "Composite gain over depth"),
)


def arm_style(arm: str) -> dict[str, str]:
    """Fixed plotting style of an arm label: `{"color": "#RRGGBB", "dash": plotly dash}`.

    Args:
        arm (`str`): arm label such as `lora+crma`; an A/A copy `lora#2` keeps `lora`'s colour with another dash, and
            so does an arm at an LR multiplier (`lora+crma@x3`: the multiplier picks the dash).

    Returns:
        `dict` with `color` (Okabe–Ito hex colour) and `dash` (a plotly `line.dash` value).
    """
    base, _, copy = arm.partition("#")
    base, at, scale = base.partition("@x")
    if base in _ARM_COLOURS:
        colour, dash = _ARM_COLOURS[base], _ARM_DASHES[base]
    else:
        idx = zlib.crc32(base.encode("utf-8"))
        colour, dash = _SPARE_COLOURS[idx % len(_SPARE_COLOURS)], _SPARE_DASHES[idx % len(_SPARE_DASHES)]
    if at:
        dash = _SCALE_DASHES.get(float(scale), "longdashdot")
    if copy:
        n = int(copy) if copy.isdigit() else zlib.crc32(copy.encode("utf-8"))
        dash = _COPY_DASHES[(max(n, 2) - 2) % len(_COPY_DASHES)]
    return {"color": colour, "dash": dash}


# ----------------------------------------------------------------------------------------------------------------
# record plumbing


def _f(v: object) -> float:
    """Float of a record value; None and junk become NaN."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _none_if_bad(values: Iterable[float]) -> list[float | None]:
    # Plotly draws a gap at None; NaN is converted too, but being explicit keeps the JSON strict.
    return [v if math.isfinite(v) else None for v in values]


def _select_seed(records: Sequence[StepRecord], seed: int | None) -> tuple[list[StepRecord], bool]:
    """Records of `seed` (all when None) and whether several seeds are left to aggregate."""
    seeds = sorted({r.seed for r in records})
    if seed is None:
        return list(records), len(seeds) > 1
    if seed not in seeds:
        raise ValueError(f"`seed` {seed!r} is not in the records; seeds present: {seeds}")
    return [r for r in records if r.seed == seed], False


def _group(records: Iterable[StepRecord]) -> dict[str, dict[int, list[StepRecord]]]:
    """arm -> step -> records (one per seed); arms in order of first appearance, steps sorted."""
    out: dict[str, dict[int, list[StepRecord]]] = {}
    for r in records:
        out.setdefault(r.arm, {}).setdefault(r.step, []).append(r)
    return {arm: dict(sorted(by_step.items())) for arm, by_step in out.items()}


@dataclass
class _Series:
    steps: list[int]
    y: list[float]  # mean over the seeds whose value is finite; NaN where none is
    lo: list[float] | None = None  # min / max over seeds (only when aggregating)
    hi: list[float] | None = None
    bad: list[tuple[int, str]] = field(default_factory=list)  # (step, hover text) of non-finite / diverged points


def _series(
    by_step: dict[int, list[StepRecord]], get: Callable[[StepRecord], float], multi: bool, label: str
) -> _Series:
    s = _Series(steps=[], y=[], lo=[] if multi else None, hi=[] if multi else None)
    for step, recs in by_step.items():
        vals = [_f(get(r)) for r in recs]
        good = [v for v in vals if math.isfinite(v)]
        s.steps.append(step)
        s.y.append(sum(good) / len(good) if good else math.nan)
        if multi:
            s.lo.append(min(good) if good else math.nan)  # type: ignore[union-attr]
            s.hi.append(max(good) if good else math.nan)  # type: ignore[union-attr]
        broken = [r for r, v in zip(recs, vals, strict=True) if not math.isfinite(v) or r.diverged]
        if broken:
            where = ", ".join(f"seed {r.seed}: {_f(get(r))}" for r in broken)
            s.bad.append((step, f"{label} diverged at step {step} ({where})"))
    return s


def _last_finite_before(steps: list[int], y: list[float], step: int) -> float | None:
    best = None
    for s, v in zip(steps, y, strict=True):
        if s > step:
            break
        if math.isfinite(v):
            best = v
    return best


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _band_traces(arm: str, s: _Series, weight: float, what: str) -> list[go.Scatter]:
    """Faint min–max band over seeds: a lower edge, then an upper edge filled down to it (`tonexty`)."""
    if s.lo is None or s.hi is None:
        return []
    lo, hi = (smooth(s.lo, weight), smooth(s.hi, weight)) if weight > 0 else (s.lo, s.hi)
    colour = arm_style(arm)["color"]
    common = dict(
        x=s.steps, mode="lines", line=dict(width=0, color=colour), legendgroup=arm, showlegend=False, hoverinfo="skip"
    )
    return [
        go.Scatter(y=_none_if_bad(lo), name=f"{arm} {what} min", **common),
        go.Scatter(
            y=_none_if_bad(hi),
            name=f"{arm} {what} max",
            fill="tonexty",
            fillcolor=_rgba(colour, _BAND_ALPHA),
            **common,
        ),
    ]


def _diverged_trace(arm: str, s: _Series, line_y: list[float]) -> go.Scatter | None:
    """An "x" on the last finite value of the plotted line before each diverged step."""
    xs, ys, texts = [], [], []
    for step, text in s.bad:
        y = _last_finite_before(s.steps, line_y, step)
        if y is None:
            continue
        xs.append(step)
        ys.append(y)
        texts.append(text)
    if not xs:
        return None
    colour = arm_style(arm)["color"]
    return go.Scatter(
        x=xs,
        y=ys,
        mode="markers",
        name=f"{arm} diverged",
        legendgroup=arm,
        showlegend=False,
        marker=dict(symbol="x", size=13, color=colour, line=dict(width=1, color="#000000")),
        hovertext=texts,
        hovertemplate="%{hovertext}<extra></extra>",
    )


def _raw_trace(arm: str, steps: list[int], y: list[float | None] | list[float]) -> go.Scatter:
    """The unsmoothed line, drawn behind the smoothed one: thin, faint, solid, no legend entry, no hover."""
    # Solid on purpose: a dash pattern on a noisy line only reads as clutter; the smoothed line carries the dash.
    return go.Scatter(
        x=steps,
        y=y,
        mode="lines",
        name=f"{arm} (raw)",
        legendgroup=arm,
        showlegend=False,
        opacity=_RAW_OPACITY,
        hoverinfo="skip",
        line=dict(color=arm_style(arm)["color"], width=1),
    )


def _arm_line(arm: str, steps: Sequence[int], y: Sequence[float | None], **kwargs: Any) -> go.Scatter:
    """An arm's main line: its colour and dash, width 2, grouped with the arm's other traces in the legend."""
    style = arm_style(arm)
    return go.Scatter(
        x=steps,
        y=y,
        mode=kwargs.pop("mode", "lines"),
        name=arm,
        legendgroup=arm,
        line=dict(color=style["color"], dash=style["dash"], width=2),
        **kwargs,
    )


def _layout(fig: go.Figure, *, title: str, lines: Sequence[str] = (), y_title: str, revision: str) -> go.Figure:
    """Title on top, legend at the bottom, integer step ticks.

    The title is short and its explanation goes on `lines` of its own under it: one long line is cut on a phone.
    The legend sits under the plot (anchored to the figure's bottom edge, which grows with it), so however many rows
    it wraps into on a narrow screen, it can never cover the title.
    """
    text = title + "".join(f"<br><sup>{line}</sup>" for line in lines if line)
    fig.update_layout(
        # automargin with the default container reference: the top margin grows to fit every title line.
        title=dict(
            text=text,
            x=0.01,
            xanchor="left",
            xref="container",
            y=1.0,
            yanchor="bottom",
            yref="paper",
            pad=dict(b=12),
            automargin=True,
        ),
        xaxis_title="step",
        yaxis_title=y_title,
        hovermode="x unified",
        template="plotly_white",
        legend=dict(
            orientation="h", yref="container", y=0.0, yanchor="bottom", xref="container", x=0.01, xanchor="left"
        ),
        margin=dict(t=40, l=60, r=20, b=40),
        # A constant uirevision lets Plotly.react keep the user's zoom/pan and legend toggles on the same element;
        # the page re-creates the element on every update, so it also restores them by this key (see app.py).
        uirevision=revision,
    )
    # Steps are integers: with only a few of them Plotly would otherwise label 1, 1.5, 2, ... A fixed step of 1, not
    # an integer tick format, which would label a visitor's zoom into a long run 2, 3, 3, 4, 4.
    last = max((max(t.x) for t in fig.data if getattr(t, "x", None) is not None and len(t.x)), default=0)
    fig.update_xaxes(dtick=1 if last <= 10 else None)
    return fig


def _smoothing_line(smoothing: float, what: str = "") -> str:
    """How a chart's lines are drawn, for the line under its title."""
    if smoothing > 0:
        return f"{what}EMA {smoothing:g} (smoothed); faint line: raw"
    return f"{what}raw values (no smoothing)"


def _seed_note(multi: bool, seed: int | None, records: Sequence[StepRecord]) -> str:
    if multi:
        return f"mean of {len({r.seed for r in records})} seeds (band: min–max)"
    return f"seed {seed}" if seed is not None else ""


def _hover(smoothing: float, fmt: str, prefix: str = "") -> str:
    """Hover text of a main line: a smoothed value always says so and shows the raw value beside it."""
    if smoothing > 0:
        return f"{prefix}EMA {smoothing:g}: %{{y:{fmt}}} · raw %{{customdata:{fmt}}}"
    return f"{prefix}raw %{{y:{fmt}}}"


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    return fig


# ----------------------------------------------------------------------------------------------------------------
# figures


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
        style = arm_style(arm)
        out.append(
            go.Scatter(
                x=steps,
                y=[sum(by_step[s]) / len(by_step[s]) for s in steps],
                mode="lines+markers",
                name=f"{arm} held-out",
                legendgroup=arm,
                line=dict(color=style["color"], dash="dot", width=1.5),
                marker=dict(symbol="diamond", size=9, color=style["color"]),
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
    recs, multi = _select_seed(records, seed)
    fig = go.Figure()
    bands, raws, lines, marks = [], [], [], []
    for arm, by_step in _group(recs).items():
        s = _series(by_step, lambda r: r.loss, multi, arm)
        bands += _band_traces(arm, s, smoothing, "loss")
        y = smooth(s.y, smoothing) if smoothing > 0 else s.y
        if smoothing > 0:
            raws.append(_raw_trace(arm, s.steps, _none_if_bad(s.y)))
        lines.append(
            _arm_line(
                arm,
                s.steps,
                _none_if_bad(y),
                customdata=_none_if_bad(s.y),
                hovertemplate=_hover(smoothing, ".4f"),
            )
        )
        mark = _diverged_trace(arm, s, y)
        if mark is not None:
            marks.append(mark)
    heldout = _heldout_traces(evals, seed, list(_group(recs)))
    fig.add_traces(bands + raws + lines + marks + heldout)
    if not lines:
        _empty(fig, "No records yet")
    notes = [_smoothing_line(smoothing, "training: "), _seed_note(multi, seed, recs)]
    if heldout:
        notes.insert(1, "◆ dotted: held-out (test) loss")
    return _layout(fig, title="Loss", lines=notes, y_title="loss", revision="loss")


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
    recs, multi = _select_seed(records, seed)
    fig = go.Figure()
    bands, raws, posts, lines, marks = [], [], [], [], []
    for arm, by_step in _group(recs).items():
        style = arm_style(arm)
        s = _series(by_step, lambda r: r.grad_norm_pre, multi, arm)
        bands += _band_traces(arm, s, smoothing, "grad norm")
        y = smooth(s.y, smoothing) if smoothing > 0 else s.y
        if smoothing > 0:
            raws.append(_raw_trace(arm, s.steps, _none_if_bad(s.y)))
        if show_post:
            post = _series(by_step, lambda r: r.grad_norm_post, multi, arm)
            posts.append(
                go.Scatter(
                    x=post.steps,
                    y=_none_if_bad(post.y),
                    mode="lines",
                    name=f"{arm} post-clip",
                    legendgroup=arm,
                    showlegend=False,
                    opacity=0.6,
                    line=dict(color=style["color"], dash="dot", width=1),
                    hovertemplate="raw %{y:.3f}",
                )
            )
        lines.append(
            _arm_line(
                arm,
                s.steps,
                _none_if_bad(y),
                customdata=_none_if_bad(s.y),
                hovertemplate=_hover(smoothing, ".3f", prefix="pre-clip, "),
            )
        )
        n_seeds = {step: len(rs) for step, rs in by_step.items()}
        clipped = [(step, sum(r.clipped for r in rs)) for step, rs in by_step.items() if any(r.clipped for r in rs)]
        raw_at = dict(zip(s.steps, s.y, strict=True))
        pts = [(st, raw_at[st], c) for st, c in clipped if math.isfinite(raw_at[st])]
        if pts:
            texts = [
                f"{arm} clipped at step {st}" + (f" in {c}/{n_seeds[st]} seeds" if multi else "") for st, _, c in pts
            ]
            marks.append(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="markers",
                    name=f"{arm} clipped",
                    legendgroup=arm,
                    showlegend=False,
                    marker=dict(symbol="circle", size=4, color=style["color"]),
                    hovertext=texts,
                    hovertemplate="%{hovertext}<extra></extra>",
                )
            )
        spikes = spike_steps(s.y)
        if spikes:
            marks.append(
                go.Scatter(
                    x=[s.steps[i] for i in spikes],
                    y=[s.y[i] for i in spikes],
                    mode="markers",
                    name=f"{arm} spike",
                    legendgroup=arm,
                    showlegend=False,
                    marker=dict(
                        symbol="triangle-up", size=12, color=style["color"], line=dict(width=1, color="#000000")
                    ),
                    hovertext=[f"{arm} spike at step {s.steps[i]}: {s.y[i]:.3g}" for i in spikes],
                    hovertemplate="%{hovertext}<extra></extra>",
                )
            )
        mark = _diverged_trace(arm, s, y)
        if mark is not None:
            marks.append(mark)
    fig.add_traces(bands + raws + posts + lines + marks)
    if not lines:
        _empty(fig, "No records yet")
    if log_scale:
        fig.update_yaxes(type="log")
    lines = [
        _smoothing_line(smoothing, "pre-clip: "),
        ("dotted: post-clip (raw) · " if show_post else "") + "● clipped · ▲ spike",
        _seed_note(multi, seed, recs),
    ]
    return _layout(fig, title="Gradient norm (global L2)", lines=lines, y_title="grad norm", revision="grad_norm")


def _paired_delta(
    arm_steps: dict[int, list[StepRecord]], base_steps: dict[int, list[StepRecord]], multi: bool
) -> _Series:
    """loss(arm) − loss(baseline) per step, paired by seed, on the steps both have; non-finite pairs are skipped."""
    s = _Series(steps=[], y=[], lo=[] if multi else None, hi=[] if multi else None)
    for step in sorted(set(arm_steps) & set(base_steps)):
        base = {r.seed: _f(r.loss) for r in base_steps[step]}
        diffs = [_f(r.loss) - base[r.seed] for r in arm_steps[step] if r.seed in base]
        diffs = [d for d in diffs if math.isfinite(d)]
        if not diffs:
            continue
        s.steps.append(step)
        s.y.append(sum(diffs) / len(diffs))
        if multi:
            s.lo.append(min(diffs))  # type: ignore[union-attr]
            s.hi.append(max(diffs))  # type: ignore[union-attr]
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
    recs, multi = _select_seed(records, seed)
    groups = _group(recs)
    if groups and baseline not in groups:
        raise ValueError(f"`baseline` {baseline!r} is not an arm of the records; arms present: {list(groups)}")
    fig = go.Figure()
    bands, raws, lines, notes = [], [], [], []
    shares: dict[str, float] = {}
    for arm, by_step in groups.items():
        if arm == baseline:
            continue
        style = arm_style(arm)
        s = _paired_delta(by_step, groups[baseline], multi)
        if not s.steps:
            continue
        lower = sum(d < 0 for d in s.y)
        shares[arm] = lower / len(s.y)
        notes.append(
            f"<span style='color:{style['color']}'>{arm}: lower on {100 * shares[arm]:.0f} % of steps "
            f"({lower}/{len(s.y)})</span>"
        )
        bands += _band_traces(arm, s, smoothing, "Δloss")
        y = smooth(s.y, smoothing) if smoothing > 0 else s.y
        if smoothing > 0:
            raws.append(_raw_trace(arm, s.steps, s.y))
        # Signed numbers are formatted here: the "+" flag of a d3 format is not honoured by every plotly.js build
        # (Gradio 6.31's printed 16 digits), and a difference must show its sign.
        signed = [[f"{v:+.4f}", f"{raw:+.4f}"] for v, raw in zip(y, s.y, strict=True)]
        hover = f"Δ EMA {smoothing:g}: %{{customdata[0]}} · raw %{{customdata[1]}}"
        lines.append(
            _arm_line(
                arm,
                s.steps,
                y,
                customdata=signed,
                hovertemplate=hover if smoothing > 0 else "Δ raw %{customdata[1]}",
            )
        )
    fig.add_traces(bands + raws + lines)
    fig.add_hline(y=0, line=dict(color="#555555", width=1))
    if not notes:
        _empty(fig, f"Need another arm besides {baseline!r} to compare")
    fig.update_layout(meta={"baseline": baseline, "lower_share": shares})
    # One line per arm under the title: each fits a phone's width, where one joined line would be cut.
    lines = [f"below 0: lower loss than {baseline}", _smoothing_line(smoothing), _seed_note(multi, seed, recs)]
    return _layout(
        fig,
        title=f"Loss difference vs {baseline}",
        lines=lines + notes,
        y_title=f"loss − loss({baseline})",
        revision="loss_delta",
    )


def make_mixing_figure(records: Sequence[StepRecord], *, seed: int | None = None) -> go.Figure:
    """CRMA mixing diagnostics over steps for the arms that report them: σ₂, ‖M − I‖_F and the composite gain.

    Args:
        records (`Sequence[StepRecord]`): the run's records; only those with a `crma` dict are used.
        seed (`int | None`): this seed only; None with several seeds plots the mean over seeds.

    Returns:
        `go.Figure` with three stacked panels sharing the step axis, one trace per CRMA arm and panel.
    """
    from plotly.subplots import make_subplots

    recs, multi = _select_seed(records, seed)
    fig = make_subplots(
        rows=len(_CRMA_METRICS),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=[label for _, label in _CRMA_METRICS],
    )
    groups = _group(r for r in recs if r.crma)
    for arm, by_step in groups.items():
        for row, (key, label) in enumerate(_CRMA_METRICS, start=1):
            s = _series(by_step, lambda r, k=key: (r.crma or {}).get(k), multi, arm)
            fig.add_trace(
                _arm_line(
                    arm,
                    s.steps,
                    _none_if_bad(s.y),
                    mode="lines+markers",
                    showlegend=row == 1,
                    marker=dict(size=5),
                    hovertemplate=f"{label}: %{{y:.4g}}<extra>{arm}</extra>",
                ),
                row=row,
                col=1,
            )
    if not groups:
        _empty(fig, "No CRMA diagnostics in these records (no CRMA arm, or before the first diag step)")
    _layout(fig, title="CRMA mixing diagnostics", lines=[_seed_note(multi, seed, recs)], y_title="", revision="mixing")
    fig.update_xaxes(title_text=None)
    fig.update_xaxes(title_text="step", row=len(_CRMA_METRICS), col=1)
    # The first panel's own title sits where the figure's title would: lift the figure's title above it.
    fig.update_layout(height=720, title_pad_b=30)
    return fig


def make_lr_figure(selection: dict[str, Any]) -> go.Figure:
    """The LR-sensitivity figure of a tuned run: each arm's final validation loss against its LR multiplier (log
    axis), mean over seeds with a min–max bar, the chosen multiplier ringed.

    Args:
        selection (`dict`): a summary's `lr_selection` block (`tuned` True).

    Returns:
        `go.Figure`.
    """
    fig = go.Figure()
    for arm, info in (selection.get("arms") or {}).items():
        style = arm_style(arm)
        points = [p for p in info["grid"] if p["mean"] is not None]
        if not points:
            continue
        x = [p["lr_scale"] for p in points]
        y = [p["mean"] for p in points]
        spread = [[v for v in p["per_seed"] if v is not None] for p in points]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=arm,
                legendgroup=arm,
                line=dict(color=style["color"], dash=_ARM_DASHES.get(arm, "solid"), width=2),
                marker=dict(size=8),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[max(s) - m for s, m in zip(spread, y, strict=True)],
                    arrayminus=[m - min(s) for s, m in zip(spread, y, strict=True)],
                    thickness=1,
                ),
                hovertemplate="×%{x:g}: validation loss %{y:.4f}",
            )
        )
        if info.get("chosen") is not None:
            best = next(p for p in points if p["lr_scale"] == info["chosen"])
            fig.add_trace(
                go.Scatter(
                    x=[best["lr_scale"]],
                    y=[best["mean"]],
                    mode="markers",
                    name=f"{arm} chosen",
                    legendgroup=arm,
                    showlegend=False,
                    marker=dict(symbol="circle-open", size=18, line=dict(width=2, color=style["color"])),
                    hovertemplate=f"{arm}: chosen ×%{{x:g}}<extra></extra>",
                )
            )
    if not fig.data:
        _empty(fig, "No arm was trained at several learning rates")
    n = max((len(p["per_seed"]) for info in (selection.get("arms") or {}).values() for p in info["grid"]), default=0)
    _layout(
        fig,
        title="LR sensitivity",
        lines=[f"final validation loss, mean of {n} seed(s) (bar: min–max)", "○ the multiplier each arm is judged at"],
        y_title="validation loss",
        revision="lr",
    )
    fig.update_xaxes(type="log", title_text="LR multiplier (× the run's LRs)", dtick=None)
    return fig

"""What the figures of `plots.py` are built from: each arm's fixed style, its records as one series per step (the
mean over seeds, with a min–max band), the traces drawn from a series, and the shared layout.

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

from ..analysis.summary import smooth
from ..engine.records import StepRecord

# Okabe–Ito palette (colour-blind safe) and a dash per named arm; anything else is hashed (crc32, stable across
# processes, unlike `hash`) onto the spares.
_ARM_STYLES = {
    "lora": ("#0072B2", "solid"),  # blue
    "lora+crma": ("#D55E00", "dash"),  # vermillion
    "lora+zclip": ("#009E73", "dashdot"),  # bluish green
    "lora+mix": ("#CC79A7", "longdash"),  # reddish purple
    "lora+crma-nomix": ("#E69F00", "dot"),  # orange
    "lora-matched": ("#56B4E9", "longdashdot"),  # sky blue
}
_SPARE_COLOURS = ("#000000", "#F0E442")
# An arm at several LR multipliers keeps its colour; the multiplier picks the dash.
_SCALE_DASHES = {0.03: "2px,5px", 0.1: "dot", 0.3: "dashdot", 1.0: "solid", 3.0: "dash", 10.0: "longdash"}
_SPARE_DASHES = ("solid", "dash", "dashdot", "longdash")
# A/A copies (`lora#2`, `lora#3`, ...) keep their arm's colour and take one of these instead; "dot" is left to the
# post-clip gradient-norm lines.
_COPY_DASHES = ("longdashdot", "8px,3px,2px,3px,2px,3px", "2px,5px", "12px,4px")

_RAW_OPACITY = 0.25
_BAND_ALPHA = 0.15


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
    if base in _ARM_STYLES:
        colour, dash = _ARM_STYLES[base]
    else:
        idx = zlib.crc32(base.encode("utf-8"))
        colour, dash = _SPARE_COLOURS[idx % len(_SPARE_COLOURS)], _SPARE_DASHES[idx % len(_SPARE_DASHES)]
    if at:
        dash = _SCALE_DASHES.get(float(scale), "longdashdot")
    if copy:
        n = int(copy) if copy.isdigit() else zlib.crc32(copy.encode("utf-8"))
        dash = _COPY_DASHES[(max(n, 2) - 2) % len(_COPY_DASHES)]
    return {"color": colour, "dash": dash}


def arm_colour(arm: str) -> str:
    return arm_style(arm)["color"]


# ----------------------------------------------------------------------------------------------------------------
# records -> series


def as_float(v: object) -> float:
    """Float of a record value; None and junk become NaN."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def none_if_bad(values: Iterable[float]) -> list[float | None]:
    # Plotly draws a gap at None; NaN is converted too, but being explicit keeps the JSON strict.
    return [v if math.isfinite(v) else None for v in values]


def select_seed(records: Sequence[StepRecord], seed: int | None) -> tuple[list[StepRecord], bool]:
    """Records of `seed` (all when None) and whether several seeds are left to aggregate."""
    seeds = sorted({r.seed for r in records})
    if seed is None:
        return list(records), len(seeds) > 1
    if seed not in seeds:
        raise ValueError(f"`seed` {seed!r} is not in the records; seeds present: {seeds}")
    return [r for r in records if r.seed == seed], False


def group_by_arm(records: Iterable[StepRecord]) -> dict[str, dict[int, list[StepRecord]]]:
    """arm -> step -> records (one per seed); arms in order of first appearance, steps sorted."""
    out: dict[str, dict[int, list[StepRecord]]] = {}
    for r in records:
        out.setdefault(r.arm, {}).setdefault(r.step, []).append(r)
    return {arm: dict(sorted(by_step.items())) for arm, by_step in out.items()}


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    y: list[float] = field(default_factory=list)  # mean over the seeds whose value is finite; NaN where none is
    lo: list[float] | None = None  # min / max over seeds (only when aggregating)
    hi: list[float] | None = None
    bad: list[tuple[int, str]] = field(default_factory=list)  # (step, hover text) of non-finite / diverged points

    @classmethod
    def empty(cls, multi: bool) -> Series:
        return cls(lo=[] if multi else None, hi=[] if multi else None)

    def append(self, step: int, good: list[float]) -> None:
        """One step: the mean (and, when aggregating, the min and max) of its finite values; NaN when none is."""
        self.steps.append(step)
        self.y.append(sum(good) / len(good) if good else math.nan)
        if self.lo is not None and self.hi is not None:
            self.lo.append(min(good) if good else math.nan)
            self.hi.append(max(good) if good else math.nan)


def series(by_step: dict[int, list[StepRecord]], get: Callable[[StepRecord], Any], multi: bool, label: str) -> Series:
    """One value per step of `get` over an arm's records (see `Series`), with hover text for the broken points."""
    s = Series.empty(multi)
    for step, recs in by_step.items():
        vals = [as_float(get(r)) for r in recs]
        s.append(step, [v for v in vals if math.isfinite(v)])
        broken = [r for r, v in zip(recs, vals, strict=True) if not math.isfinite(v) or r.diverged]
        if broken:
            where = ", ".join(f"seed {r.seed}: {as_float(get(r))}" for r in broken)
            s.bad.append((step, f"{label} diverged at step {step} ({where})"))
    return s


# ----------------------------------------------------------------------------------------------------------------
# series -> traces


@dataclass
class Layers:
    """A figure's traces by layer, drawn in this order (every arm's band under every arm's line)."""

    bands: list[go.Scatter] = field(default_factory=list)
    raws: list[go.Scatter] = field(default_factory=list)
    posts: list[go.Scatter] = field(default_factory=list)
    lines: list[go.Scatter] = field(default_factory=list)
    marks: list[go.Scatter] = field(default_factory=list)

    def traces(self) -> list[go.Scatter]:
        return self.bands + self.raws + self.posts + self.lines + self.marks


def smoothed(values: list[float], smoothing: float) -> list[float]:
    return smooth(values, smoothing) if smoothing > 0 else values


def add_arm(layers: Layers, arm: str, s: Series, y: list[float], smoothing: float, what: str, **line: Any) -> None:
    """An arm's min–max band (`what` names it), its raw line (when `smoothing`), its main line through `y` (`line`:
    more plotly arguments) and its divergence markers."""
    layers.bands += _band_traces(arm, s, smoothing, what)
    if smoothing > 0:
        layers.raws.append(_raw_trace(arm, s.steps, none_if_bad(s.y)))
    layers.lines.append(arm_line(arm, s.steps, none_if_bad(y), **line))
    mark = _diverged_trace(arm, s, y)
    if mark is not None:
        layers.marks.append(mark)


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _band_traces(arm: str, s: Series, weight: float, what: str) -> list[go.Scatter]:
    """Faint min–max band over seeds: a lower edge, then an upper edge filled down to it (`tonexty`)."""
    if s.lo is None or s.hi is None:
        return []
    lo, hi = smoothed(s.lo, weight), smoothed(s.hi, weight)
    common = dict(
        x=s.steps,
        mode="lines",
        line=dict(width=0, color=arm_colour(arm)),
        legendgroup=arm,
        showlegend=False,
        hoverinfo="skip",
    )
    return [
        go.Scatter(y=none_if_bad(lo), name=f"{arm} {what} min", **common),
        go.Scatter(
            y=none_if_bad(hi),
            name=f"{arm} {what} max",
            fill="tonexty",
            fillcolor=_rgba(arm_colour(arm), _BAND_ALPHA),
            **common,
        ),
    ]


def _last_finite_before(steps: list[int], y: list[float], step: int) -> float | None:
    best = None
    for s, v in zip(steps, y, strict=True):
        if s > step:
            break
        if math.isfinite(v):
            best = v
    return best


def _diverged_trace(arm: str, s: Series, line_y: list[float]) -> go.Scatter | None:
    """An "x" on the last finite value of the plotted line before each diverged step."""
    points = [(step, _last_finite_before(s.steps, line_y, step), text) for step, text in s.bad]
    points = [p for p in points if p[1] is not None]
    if not points:
        return None
    xs, ys, texts = (list(column) for column in zip(*points, strict=True))
    return markers(arm, "diverged", xs, ys, dict(symbol="x", size=13, line=dict(width=1, color="#000000")), texts)


def _raw_trace(arm: str, steps: list[int], y: list[float | None]) -> go.Scatter:
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
        line=dict(color=arm_colour(arm), width=1),
    )


def arm_line(
    arm: str,
    steps: Sequence[Any],
    y: Sequence[float | None],
    *,
    name: str | None = None,
    dash: str | None = None,
    width: float = 2,
    mode: str = "lines",
    **kwargs: Any,
) -> go.Scatter:
    """An arm's line in its colour (and, unless `dash` says otherwise, its dash), grouped with the arm's other
    traces in the legend; `name` defaults to the arm."""
    return go.Scatter(
        x=steps,
        y=y,
        mode=mode,
        name=name or arm,
        legendgroup=arm,
        line=dict(color=arm_colour(arm), dash=dash or arm_style(arm)["dash"], width=width),
        **kwargs,
    )


def markers(
    arm: str,
    what: str,
    x: Sequence[Any],
    y: Sequence[Any],
    marker: dict[str, Any],
    texts: Sequence[str] | None = None,
    hovertemplate: str = "%{hovertext}<extra></extra>",
) -> go.Scatter:
    """Markers `{arm} {what}` in the arm's colour (unless `marker` sets one), no legend entry; hover: `texts`."""
    return go.Scatter(
        x=x,
        y=y,
        mode="markers",
        name=f"{arm} {what}",
        legendgroup=arm,
        showlegend=False,
        marker={"color": arm_colour(arm), **marker},
        hovertext=texts,
        hovertemplate=hovertemplate,
    )


# ----------------------------------------------------------------------------------------------------------------
# layout and the lines under a title


def layout(fig: go.Figure, *, title: str, lines: Sequence[str] = (), y_title: str, revision: str) -> go.Figure:
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


def smoothing_line(smoothing: float, what: str = "") -> str:
    """How a chart's lines are drawn, for the line under its title."""
    if smoothing > 0:
        return f"{what}EMA {smoothing:g} (smoothed); faint line: raw"
    return f"{what}raw values (no smoothing)"


def seed_note(multi: bool, seed: int | None, records: Sequence[StepRecord]) -> str:
    if multi:
        return f"mean of {len({r.seed for r in records})} seeds (band: min–max)"
    return f"seed {seed}" if seed is not None else ""


def hover(smoothing: float, fmt: str, prefix: str = "") -> str:
    """Hover text of a main line: a smoothed value always says so and shows the raw value beside it."""
    if smoothing > 0:
        return f"{prefix}EMA {smoothing:g}: %{{y:{fmt}}} · raw %{{customdata:{fmt}}}"
    return f"{prefix}raw %{{y:{fmt}}}"


def empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    return fig

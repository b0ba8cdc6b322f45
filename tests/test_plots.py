"""Chart builders on synthetic records: traces, markers, bands, deltas, styles."""

from __future__ import annotations

import re
import zlib

import pytest
from synthetic import CRMA_CLIPPED, DIVERGE_STEP, SPIKE_STEP, STEPS, _diag, _pre, _rec

from crma.ablation.analysis.summary import smooth
from crma.ablation.report.plots import (
    arm_style,
    make_delta_figure,
    make_grad_norm_figure,
    make_loss_figure,
    make_lr_figure,
    make_mixing_figure,
)
from crma.ablation.spec.arms import ARM_SPECS


def _trace(fig, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, f"expected one trace named {name!r}, got {[t.name for t in fig.data]}"
    return matches[0]


def _index(fig, name: str) -> int:
    return [t.name for t in fig.data].index(name)


def test_arm_style_distinct_and_stable():
    named = list(ARM_SPECS)
    styles = [arm_style(a) for a in named]
    assert len({s["color"] for s in styles}) == len(named)
    assert len({s["dash"] for s in styles}) == len(named)
    assert all(re.fullmatch(r"#[0-9A-F]{6}", s["color"]) for s in styles)
    copy = arm_style("lora#2")
    assert copy["color"] == arm_style("lora")["color"] and copy["dash"] != arm_style("lora")["dash"]
    assert arm_style("lora#3")["dash"] not in (copy["dash"], arm_style("lora")["dash"])
    # An arm at several LR multipliers keeps its colour; each multiplier its own dash.
    scaled = [arm_style(f"lora+crma@x{m}") for m in (0.3, 1, 3)]
    assert {s["color"] for s in scaled} == {arm_style("lora+crma")["color"]} and len({s["dash"] for s in scaled}) == 3
    # Other names are hashed with crc32 (stable across processes, unlike `hash`) onto the spare colours and dashes.
    spare_colours, spare_dashes = ("#000000", "#F0E442"), ("solid", "dash", "dashdot", "longdash")
    idx = zlib.crc32(b"my-arm")
    assert arm_style("my-arm") == {"color": spare_colours[idx % 2], "dash": spare_dashes[idx % 4]}


def test_loss_figure_traces_raw_behind_smoothed(records):
    fig = make_loss_figure(records, smoothing=0.6)
    arms = ["lora", "lora+crma", "lora+zclip", "lora#2"]
    lines = [_trace(fig, a) for a in arms]
    assert len({(t.line.color, t.line.dash) for t in lines}) == 4
    assert len({t.line.color for t in lines[:3]}) == 3
    for arm in arms:
        raw = _trace(fig, f"{arm} (raw)")
        assert _index(fig, f"{arm} (raw)") < _index(fig, arm)  # drawn first = behind
        assert raw.opacity == pytest.approx(0.25) and raw.showlegend is False
        assert raw.line.color == arm_style(arm)["color"]
    lora = _trace(fig, "lora")
    expected = smooth([2.0 - 0.02 * s for s in range(1, STEPS + 1)], 0.6)
    assert list(lora.x) == list(range(1, STEPS + 1)) and list(lora.y) == pytest.approx(expected)
    assert fig.layout.hovermode == "x unified" and fig.layout.legend.orientation == "h"
    assert fig.layout.uirevision == "loss" and fig.layout.xaxis.title.text == "step"
    assert fig.layout.template.layout.paper_bgcolor == "white"  # plotly_white
    assert all(t.type == "scatter" for t in fig.data)  # never scattergl

    empty = make_loss_figure([])  # the live chart before the first step
    assert len(empty.data) == 0 and empty.layout.annotations[0].text == "No records yet"

    plain = make_loss_figure(records, smoothing=0.0)
    assert not any(t.name.endswith("(raw)") for t in plain.data)


def test_loss_figure_marks_divergence_on_last_finite_value(records):
    fig = make_loss_figure(records, smoothing=0.0)
    mark = _trace(fig, "lora+zclip diverged")
    assert mark.marker.symbol == "x"
    assert list(mark.x) == [DIVERGE_STEP]
    assert mark.y[0] == pytest.approx(2.0 - 0.02 * (DIVERGE_STEP - 1) + 0.05)
    assert "diverged at step 15" in mark.hovertext[0]
    line = _trace(fig, "lora+zclip")
    assert line.y[DIVERGE_STEP - 1] is None  # a gap, not a drop to 0
    assert not any(t.name == "lora diverged" for t in fig.data)


def test_loss_figure_seed_mean_and_band(records2):
    fig = make_loss_figure(records2, smoothing=0.6)
    mean = [2.0 - 0.02 * s + 0.05 for s in range(1, STEPS + 1)]
    assert list(_trace(fig, "lora").y) == pytest.approx(smooth(mean, 0.6))
    upper = _trace(fig, "lora loss max")
    assert upper.fill == "tonexty" and _index(fig, "lora loss min") == _index(fig, "lora loss max") - 1
    single = make_loss_figure(records2, smoothing=0.0, seed=2)
    assert _trace(single, "lora").y[0] == pytest.approx(2.0 - 0.02 + 0.1)
    assert not any("max" in t.name for t in single.data)
    with pytest.raises(ValueError, match=r"`seed` 7 is not in the records; seeds present: \[1, 2\]"):
        make_loss_figure(records2, seed=7)


def test_grad_norm_figure_markers_and_log_axis(records):
    fig = make_grad_norm_figure(records, log_scale=True)
    assert fig.layout.yaxis.type == "log"
    assert make_grad_norm_figure(records).layout.yaxis.type in (None, "linear", "-")
    spike = _trace(fig, "lora spike")
    assert list(spike.x) == [SPIKE_STEP] and list(spike.y) == [30.0]
    assert not any(t.name == "lora+crma spike" for t in fig.data)
    clipped = _trace(fig, "lora+crma clipped")
    assert list(clipped.x) == list(CRMA_CLIPPED)
    assert clipped.marker.size < spike.marker.size
    post = _trace(fig, "lora post-clip")
    assert post.line.dash == "dot" and post.y[SPIKE_STEP - 1] == 1.5
    assert _trace(fig, "lora").y[SPIKE_STEP - 1] == 30.0
    assert _trace(fig, "lora+zclip diverged").marker.symbol == "x"
    no_post = make_grad_norm_figure(records, show_post=False)
    assert not any("post-clip" in t.name for t in no_post.data)
    assert len(no_post.data) == len(fig.data) - 4


def test_delta_figure_values_and_share_lower(records, records2):
    fig = make_delta_figure(records, baseline="lora", smoothing=0.0)
    assert "lora" not in [t.name for t in fig.data]
    crma = _trace(fig, "lora+crma")
    assert list(crma.x) == list(range(1, STEPS + 1))
    assert list(crma.y) == pytest.approx([-0.01] * 30 + [0.01] * 10)
    zclip = _trace(fig, "lora+zclip")
    assert list(zclip.x) == list(range(1, DIVERGE_STEP))  # the NaN step has no pair
    assert list(zclip.y) == pytest.approx([0.05] * (DIVERGE_STEP - 1))
    assert list(_trace(fig, "lora#2").y) == [0.0] * STEPS
    note = fig.layout.title.text  # the shares sit under the title, one line each, clear of the curves
    assert "lora+crma: lower on 75 % of steps (30/40)</span></sup>" in note
    assert "lora#2: lower on 0 % of steps (0/40)</span></sup>" in note
    assert fig.layout.meta["lower_share"] == {"lora+crma": 0.75, "lora+zclip": 0.0, "lora#2": 0.0}
    assert any(s.type == "line" and s.y0 == 0 and s.y1 == 0 for s in fig.layout.shapes)  # zero line

    smoothed = make_delta_figure(records, smoothing=0.6)
    assert _index(smoothed, "lora+crma (raw)") < _index(smoothed, "lora+crma")
    # Two seeds: the paired difference per seed is the same, so the mean is too.
    both = make_delta_figure(records2, smoothing=0.0)
    assert list(_trace(both, "lora+crma").y) == pytest.approx([-0.01] * 30 + [0.01] * 10)
    with pytest.raises(ValueError, match=r"`baseline` 'lora\+mix' is not an arm"):
        make_delta_figure(records, baseline="lora+mix")


def test_mixing_figure_only_crma_arms(records):
    fig = make_mixing_figure(records)
    assert {t.name for t in fig.data} == {"lora+crma"}
    assert len(fig.data) == 3
    sigma2 = fig.data[0]
    assert list(sigma2.x) == [10, 20, 30, 40] and list(sigma2.y) == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert list(fig.data[1].y) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    empty = make_mixing_figure([r for r in records if r.arm == "lora"])
    assert len(empty.data) == 0 and "No CRMA diagnostics" in empty.layout.annotations[-1].text


def test_long_runs_draw_a_few_traces_per_arm_not_one_per_point():
    recs = []
    for step in range(1, 1001):
        for i, arm in enumerate(["lora", "lora+crma", "lora+zclip", "lora+mix"]):
            recs.append(
                _rec(
                    arm,
                    0,
                    step,
                    2.0 / step**0.5 + 0.001 * i,
                    _pre(step) + i,
                    clipped=step % 7 == 0,
                    crma=_diag(step % 100) if i % 2 and step % 10 == 0 else None,
                )
            )
    figs = [
        make_loss_figure(recs),
        make_grad_norm_figure(recs, smoothing=0.6),
        make_delta_figure(recs),
        make_mixing_figure(recs),
    ]
    assert max(len(f.data) for f in figs) <= 24  # a handful of traces per arm, not one per point


def test_few_steps_get_integer_ticks(records):
    short = [r for r in records if r.step <= 5]
    fig = make_loss_figure(short, smoothing=0.0)
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat is None
    assert make_loss_figure(records, smoothing=0.0).layout.xaxis.dtick is None


def test_titles_are_short_lines_and_the_legend_sits_under_the_plot(records, records2):
    """A phone shows about 45 characters of a chart's width: the title and each line under it fit, and the legend,
    however many rows it wraps into, sits at the bottom where it cannot cover them."""
    figs = [
        make_loss_figure(records),
        make_grad_norm_figure(records, smoothing=0.6),
        make_delta_figure(records),
        make_mixing_figure(records),
        make_loss_figure(records2),
    ]
    for fig in figs:
        title = fig.layout.title
        lines = [re.sub(r"<[^>]+>", "", line) for line in title.text.split("<br>")]
        assert len(lines[0]) <= 30 and all(len(line) <= 48 for line in lines), lines
        assert title.yref == "paper" and title.yanchor == "bottom" and title.automargin is True
        assert (
            fig.layout.legend.yref == "container"
            and fig.layout.legend.y == 0
            and fig.layout.legend.yanchor == ("bottom")
        )
    assert "mean of 2 seeds (band: min–max)" in figs[-1].layout.title.text
    for annotation in figs[3].layout.annotations:  # the mixing panels' own titles
        assert len(annotation.text) <= 30


def test_hover_labels_say_smoothed_or_raw(records):
    loss = _trace(make_loss_figure(records, smoothing=0.6), "lora")
    assert loss.hovertemplate == "EMA 0.6: %{y:.4f} · raw %{customdata:.4f}"
    assert list(loss.customdata) == pytest.approx([2.0 - 0.02 * s for s in range(1, STEPS + 1)])  # the raw values
    assert _trace(make_loss_figure(records, smoothing=0.0), "lora").hovertemplate == "raw %{y:.4f}"
    grad = make_grad_norm_figure(records, smoothing=0.6)
    pre = _trace(grad, "lora")
    # The smoothed pre-clip line shows its raw value beside it, so it never pairs a smoothed value with a raw one.
    assert pre.hovertemplate == "pre-clip, EMA 0.6: %{y:.3f} · raw %{customdata:.3f}"
    assert pre.customdata[SPIKE_STEP - 1] == 30.0 and pre.y[SPIKE_STEP - 1] < 30.0
    assert _trace(grad, "lora post-clip").hovertemplate == "raw %{y:.3f}"
    assert "pre-clip, raw %{y:.3f}" in _trace(make_grad_norm_figure(records), "lora").hovertemplate
    # The delta's signed numbers are formatted in Python (a "+" d3 format printed 16 digits in Gradio's plotly.js).
    delta = _trace(make_delta_figure(records, smoothing=0.6), "lora+crma")
    assert delta.hovertemplate == "Δ EMA 0.6: %{customdata[0]} · raw %{customdata[1]}"
    assert [list(c) for c in delta.customdata[:2]] == [["-0.0100", "-0.0100"], ["-0.0100", "-0.0100"]]
    assert all(re.fullmatch(r"[+-]\d+\.\d{4}", text) for pair in delta.customdata for text in pair)
    assert _trace(make_delta_figure(records, smoothing=0.0), "lora+crma").hovertemplate == "Δ raw %{customdata[1]}"


def test_lr_figure_means_bars_and_the_chosen_multiplier_ringed_in_the_arms_colour():
    def point(scale, per_seed):
        good = [v for v in per_seed if v is not None]
        return {"lr_scale": scale, "per_seed": per_seed, "mean": sum(good) / len(good) if good else None}

    grid = [point(1.0, [2.0, 2.2]), point(3.0, [1.5, 1.7]), point(10.0, [None, None])]
    selection = {"tuned": True, "arms": {"lora+crma": {"grid": grid, "chosen": 3.0}, "lora": {"grid": grid[2:]}}}
    fig = make_lr_figure(selection)
    assert [t.name for t in fig.data] == ["lora+crma", "lora+crma chosen"]  # an arm with no finished point: none
    line, ring = fig.data
    assert list(line.x) == [1.0, 3.0] and list(line.y) == pytest.approx([2.1, 1.6])
    assert list(line.error_y.array) == pytest.approx([0.1, 0.1]) and list(line.error_y.arrayminus) == pytest.approx(
        [0.1, 0.1]
    )
    assert line.line.color == arm_style("lora+crma")["color"] and line.line.dash == arm_style("lora+crma")["dash"]
    # An open marker is stroked in the marker's colour: the ring is the arm's, not the next colour of the template.
    assert (ring.x, ring.y) == ((3.0,), (pytest.approx(1.6),)) and ring.marker.symbol == "circle-open"
    assert ring.marker.color == ring.marker.line.color == arm_style("lora+crma")["color"]
    assert fig.layout.xaxis.type == "log" and "mean of 2 seed(s)" in fig.layout.title.text
    assert "No arm was trained at several learning rates" in make_lr_figure({}).layout.annotations[0].text

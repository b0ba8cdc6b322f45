"""Charts, summaries and report files of the ablation engine, on synthetic records with hand-known numbers."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time

import pytest

from crma.ablation.config import StepRecord
from crma.ablation.plots import (
    arm_style,
    make_delta_figure,
    make_grad_norm_figure,
    make_loss_figure,
    make_mixing_figure,
    smooth,
)
from crma.ablation.report import (
    read_metrics_jsonl,
    spike_steps,
    summarize_arm,
    summarize_run,
    summary_markdown,
    write_metrics_jsonl,
    write_png_charts,
    write_report_html,
)

STEPS = 40
SPIKE_STEP = 25
DIVERGE_STEP = 15
CRMA_CLIPPED = (10, 20)


def _pre(step: int) -> float:
    """A flat grad norm with a small wiggle: 1.00, 1.01, 1.02, ..."""
    return 1.0 + 0.01 * (step % 3)


def _diag(step: int) -> dict[str, float]:
    return {
        "sigma1_mean": 1.0,
        "sigma2_mean": 1.0 - 0.01 * step,
        "max_rowcol_err": 1e-7,
        "dist_from_identity_mean": 0.005 * step,
        "composite_gain": 1.0,
        "alpha_mean": 1.0 + 0.001 * step,
    }


def _rec(
    arm: str,
    seed: int,
    step: int,
    loss: float,
    pre: float,
    post: float | None = None,
    clipped: bool = False,
    diverged: bool = False,
    crma: dict | None = None,
) -> StepRecord:
    return StepRecord(
        arm=arm,
        seed=seed,
        step=step,
        loss=loss,
        grad_norm_pre=pre,
        grad_norm_post=pre if post is None else post,
        clipped=clipped,
        lr=1e-4,
        tokens=64 * step,
        step_time_s=0.5,
        memory_mb=100.0 + step,
        diverged=diverged,
        crma=crma,
    )


def make_records(seeds: tuple[int, ...] = (1,)) -> list[StepRecord]:
    """Four arms in lockstep, interleaved per step like the runner yields them.

    lora: loss 2 − 0.02·step (+0.1 per extra seed), flat grad norm with a spike of 30 at step 25, clipped at 1.5.
    lora+crma: loss 0.01 lower on steps 1–30 and 0.01 higher on 31–40; ZClip clips steps 10 and 20 (post = 0.9·pre);
      mixing diagnostics every 10 steps.
    lora+zclip: loss +0.05; diverges (NaN loss, inf grad) at step 15 and stops.
    lora#2: an A/A copy of lora.
    """
    recs = []
    for seed in seeds:
        offset = 0.1 * (seed - seeds[0])
        for step in range(1, STEPS + 1):
            base = 2.0 - 0.02 * step + offset
            pre = 30.0 if step == SPIKE_STEP else _pre(step)
            recs.append(_rec("lora", seed, step, base, pre, post=min(pre, 1.5), clipped=pre > 1.5))
            clipped = step in CRMA_CLIPPED
            recs.append(
                _rec(
                    "lora+crma",
                    seed,
                    step,
                    base - 0.01 if step <= 30 else base + 0.01,
                    _pre(step),
                    post=0.9 * _pre(step) if clipped else None,
                    clipped=clipped,
                    crma=_diag(step) if step % 10 == 0 else None,
                )
            )
            if step < DIVERGE_STEP:
                recs.append(_rec("lora+zclip", seed, step, base + 0.05, _pre(step)))
            elif step == DIVERGE_STEP:
                recs.append(_rec("lora+zclip", seed, step, math.nan, math.inf, post=math.inf, diverged=True))
            recs.append(_rec("lora#2", seed, step, base, pre, post=min(pre, 1.5), clipped=pre > 1.5))
    return recs


@pytest.fixture(scope="module")
def records() -> list[StepRecord]:
    return make_records()


@pytest.fixture(scope="module")
def records2() -> list[StepRecord]:
    return make_records(seeds=(1, 2))


def _trace(fig, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, f"expected one trace named {name!r}, got {[t.name for t in fig.data]}"
    return matches[0]


def _index(fig, name: str) -> int:
    return [t.name for t in fig.data].index(name)


# ---------------------------------------------------------------------------------------------------------------
# styles and smoothing


def test_arm_style_distinct_and_stable():
    named = ["lora", "lora+crma", "lora+zclip", "lora+mix"]
    styles = [arm_style(a) for a in named]
    assert len({s["color"] for s in styles}) == 4
    assert len({s["dash"] for s in styles}) == 4
    assert all(re.fullmatch(r"#[0-9A-F]{6}", s["color"]) for s in styles)
    copy = arm_style("lora#2")
    assert copy["color"] == arm_style("lora")["color"] and copy["dash"] != arm_style("lora")["dash"]
    assert arm_style("lora#3")["dash"] not in (copy["dash"], arm_style("lora")["dash"])
    assert arm_style("my-arm") == arm_style("my-arm")  # hashed, not random


def test_smooth_debiased_ema_and_nan_safe():
    assert smooth([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    assert smooth([5.0] * 4, 0.9) == pytest.approx([5.0] * 4)  # debiasing: a constant stays constant
    # w = 0.5: 1/(0.5)=1; (0.25+1)/0.75; (0.625+1.5)/0.875
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    out = smooth([1.0, math.nan, 2.0, None, 3.0], 0.5)
    assert math.isnan(out[1]) and math.isnan(out[3])
    assert [out[0], out[2], out[4]] == pytest.approx(smooth([1.0, 2.0, 3.0], 0.5))
    with pytest.raises(ValueError, match="`weight`"):
        smooth([1.0], 1.0)


# ---------------------------------------------------------------------------------------------------------------
# figures


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
    note = fig.layout.title.text  # the shares sit under the title, clear of the curves
    assert "lora+crma lower on 75 % of steps (30/40)" in note
    assert "lora#2 lower on 0 % of steps (0/40)" in note
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


def test_figures_build_fast_for_1000_steps_4_arms():
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
    start = time.perf_counter()
    figs = [
        make_loss_figure(recs),
        make_grad_norm_figure(recs, smoothing=0.6),
        make_delta_figure(recs),
        make_mixing_figure(recs),
    ]
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"building 4 figures took {elapsed:.2f} s"
    assert max(len(f.data) for f in figs) <= 24  # a handful of traces per arm, not one per point


# ---------------------------------------------------------------------------------------------------------------
# numbers


def test_spike_steps_finds_injected_spike_not_noise():
    import random

    rnd = random.Random(0)
    noisy = [1.0 + 0.05 * rnd.gauss(0, 1) for _ in range(300)]
    assert spike_steps(noisy) == []
    assert spike_steps([2.0] * 100) == []  # flat: the floor keeps MAD = 0 from flagging anything
    assert spike_steps([2.0] * 50 + [2.1] + [2.0] * 10) == []  # +5 % is not a spike
    spiky = list(noisy)
    spiky[150] = 5.0
    assert spike_steps(spiky) == [150]
    assert spike_steps([1.0] * 3 + [50.0]) == []  # too little history
    assert spike_steps([1.0, math.nan] * 10 + [9.0]) == [20]  # NaNs are left out of the history
    with pytest.raises(ValueError, match="`window`"):
        spike_steps([1.0], window=0)
    with pytest.raises(ValueError, match="`k`"):
        spike_steps([1.0], k=0)


def test_summarize_arm_hand_computed(records):
    lora = summarize_arm([r for r in records if r.arm == "lora"], trainable_params=4096)
    assert lora["final_loss"] == pytest.approx(1.2)
    losses = [2.0 - 0.02 * s for s in range(1, STEPS + 1)]
    assert lora["final_loss_ema"] == pytest.approx(smooth(losses, 0.9)[-1])
    assert lora["grad_norm_pre_peak"] == 30.0
    assert lora["grad_norm_pre_mean"] == pytest.approx(69.39 / 40)  # 40.4 − 1.01 + 30 over 40 steps
    assert lora["grad_norm_post_peak"] == 1.5
    assert lora["steps_clipped"] == 1 and lora["spike_count"] == 1 and lora["spike_at"] == [SPIKE_STEP]
    assert lora["steps"] == STEPS and lora["diverged"] is False and lora["diverged_at"] is None
    assert lora["tokens"] == 64 * STEPS and lora["wall_s"] == pytest.approx(20.0)
    assert lora["tokens_per_s"] == pytest.approx(128.0) and lora["memory_mb_peak"] == 140.0
    assert lora["trainable_params"] == 4096
    assert lora["spectral_norm"] is None and lora["sigma2"] is None

    crma = summarize_arm([r for r in records if r.arm == "lora+crma"], wall_s=40.0)
    assert crma["steps_clipped"] == 2 and crma["spike_count"] == 0
    assert crma["grad_norm_post_peak"] == pytest.approx(1.02)
    assert crma["wall_s"] == 40.0 and crma["tokens_per_s"] == pytest.approx(64.0)
    assert crma["spectral_norm"] == 1.0 and crma["max_rowcol_err"] == 1e-7
    assert crma["sigma2"] == pytest.approx(0.6) and crma["dist_from_identity"] == pytest.approx(0.2)
    assert crma["composite_gain"] == 1.0 and crma["alpha"] == pytest.approx(1.04)

    zclip = summarize_arm([r for r in records if r.arm == "lora+zclip"])
    assert zclip["diverged"] is True and zclip["diverged_at"] == DIVERGE_STEP and zclip["steps"] == DIVERGE_STEP
    assert zclip["final_loss"] == pytest.approx(2.0 - 0.02 * 14 + 0.05)  # last finite loss
    assert zclip["grad_norm_pre_peak"] == pytest.approx(1.02)  # inf is not a peak
    json.dumps(zclip, allow_nan=False)  # strict JSON: no NaN leaks into a summary

    with pytest.raises(ValueError, match="one arm and one seed"):
        summarize_arm(records)
    with pytest.raises(ValueError, match="empty"):
        summarize_arm([])


def test_summarize_run_single_seed_deltas(records):
    info = {"lora": {"trainable_params": 4096}, "lora+crma": {"trainable_params": 5000, "wall_s": 30.0}}
    summary = summarize_run(records, baseline="lora", arm_info=info)
    assert list(summary["arms"]) == ["lora", "lora+crma", "lora+zclip", "lora#2"]
    assert "seeds" not in summary and "across_seeds" not in summary and summary["seed_list"] == [1]
    assert summary["arms"]["lora+crma"]["wall_s"] == 30.0
    d = summary["deltas"]["lora+crma"]
    assert "lora" not in summary["deltas"]
    assert d["final_loss"]["abs"] == pytest.approx(0.01) and d["final_loss"]["rel_pct"] == pytest.approx(100 / 120)
    assert d["grad_norm_pre_peak"]["abs"] == pytest.approx(1.02 - 30.0)
    assert d["grad_norm_pre_peak"]["rel_pct"] == pytest.approx(100 * (1.02 - 30.0) / 30.0)
    assert d["steps_clipped"] == {"abs": 1.0, "rel_pct": 100.0}
    assert d["trainable_params"]["rel_pct"] == pytest.approx(100 * 904 / 4096)
    assert "sigma2" not in d  # the baseline has no mixing figures
    assert summary["deltas"]["lora#2"]["final_loss"] == {"abs": 0.0, "rel_pct": 0.0}
    json.dumps(summary, allow_nan=False)
    with pytest.raises(ValueError, match=r"`baseline` 'lora\+mix' is not an arm"):
        summarize_run(records, baseline="lora+mix")
    with pytest.raises(ValueError, match="`arm_info` names arm"):
        summarize_run(records, arm_info={"lora+mix": {}})


def test_summarize_run_across_seeds(records2):
    summary = summarize_run(records2)
    assert sorted(summary["seeds"]) == [1, 2] and summary["seed_list"] == [1, 2]
    assert summary["seeds"][2]["arms"]["lora"]["final_loss"] == pytest.approx(1.3)
    stat = summary["across_seeds"]["lora"]["final_loss"]
    assert stat["mean"] == pytest.approx(1.25) and stat["n"] == 2
    assert stat["std"] == pytest.approx(statistics.stdev([1.2, 1.3]))  # sample std: 0.0707, not 0.05
    assert summary["across_seeds"]["lora"]["grad_norm_pre_peak"] == {"mean": 30.0, "std": 0.0, "n": 2}
    assert summary["arms"]["lora"]["final_loss"] == pytest.approx(1.25)
    assert summary["arms"]["lora+zclip"]["diverged"] is True and summary["arms"]["lora+zclip"]["n_seeds"] == 2
    assert summary["deltas"]["lora+crma"]["final_loss"]["abs"] == pytest.approx(0.01)
    assert summary["seeds"][1]["deltas"]["lora+crma"]["final_loss"]["abs"] == pytest.approx(0.01)
    json.dumps(summary, allow_nan=False)


def test_summary_markdown_table(records, records2):
    two = [r for r in records if r.arm in ("lora", "lora+crma")]
    md = summary_markdown(
        summarize_run(two, arm_info={"lora": {"trainable_params": 4096}, "lora+crma": {"trainable_params": 5000}})
    )
    assert md.startswith("## LoRA vs LoRA+CRMA")
    for row in [
        "| Metric | lora | lora+crma | Delta |",
        "| Final loss | 1.2000 | 1.2100 | +0.8% |",
        "| Peak grad norm (pre-clip) | 30.00 | 1.02 | -96.6% |",
        "| Steps clipped | 1 | 2 | +100.0% |",
        "| Gradient spikes | 1 | 0 | -100.0% |",
        "| Spectral norm ‖M‖₂ | – | 1.000000 | – |",
        "| Max row/col error | – | 1.0e-07 | – |",
        "| σ₂ | – | 0.6000 | – |",
        "| ‖M − I‖_F | – | 0.2000 | – |",
        "| Composite gain | – | 1.0000 | – |",
        "| Trainable params | 4,096 | 5,000 | +22.1% |",
        "| Wall time | 20.0 s | 20.0 s | +0.0% |",
        "| Tokens/s | 128.0 | 128.0 | +0.0% |",
    ]:
        assert row in md, f"missing row {row!r} in\n{md}"
    assert "Final loss (EMA)" in md and "Mean grad norm" in md
    assert "doubly stochastic" in md and "noise" in md

    run = summarize_run(records)
    run["notes"] = ["CPU fallback: no GPU found"]  # remarks the engine attaches are kept as footnotes
    full = summary_markdown(run, title="Four arms")
    assert full.startswith("## Four arms") and "- CPU fallback: no GPU found" in full
    assert "| Metric | lora | lora+crma | lora+zclip | lora#2 | Δ lora+crma | Δ lora+zclip | Δ lora#2 |" in full
    assert "1.7700 (diverged @ 15)" in full and "lora+zclip diverged at step 15" in full

    multi = summary_markdown(summarize_run(records2))
    assert "### Mean ± sample std (n − 1) over 2 seeds" in multi
    assert "| Final loss | 1.2500 ± 0.0707 |" in multi
    # lora+crma ends 0.01 above lora in both seeds; the A/A copy ties, which is not "lower"
    assert "lora+crma in 0 of 2 seeds; lora+zclip in 0 of 2 seeds; lora#2 in 0 of 2 seeds" in multi
    with pytest.raises(ValueError, match="summarize_run"):
        summary_markdown({"rows": []})


# ---------------------------------------------------------------------------------------------------------------
# files


def test_report_html_self_contained(records, tmp_path):
    summary = summarize_run(records)
    path = write_report_html(
        records,
        summary,
        tmp_path / "sub" / "report.html",
        title="Run <1> & co",
        config={"lr": 1e-4, "note": "<b>bold</b>"},
    )
    text = path.read_text(encoding="utf-8")
    assert path.name == "report.html"
    assert text.count("plotly.js v") == 1  # the bundle, once
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing loaded from anywhere
    assert text.count("Plotly.newPlot(") == 4  # loss, grad norm, delta, mixing
    assert "<title>Run &lt;1&gt; &amp; co</title>" in text
    assert "<td>Peak grad norm (pre-clip)</td><td>30.00</td>" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and '"lr": 0.0001' in text


def test_metrics_jsonl_round_trip(records, tmp_path):
    path = write_metrics_jsonl(records, tmp_path / "run" / "metrics.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    for line in lines:
        json.loads(line, parse_constant=no_constants)  # strict JSON, readable by jq / JavaScript
    back = read_metrics_jsonl(path)
    assert len(back) == len(records)
    for a, b in zip(records, back, strict=True):
        da, db = a.to_dict(), b.to_dict()
        for key in ("loss", "grad_norm_pre", "grad_norm_post"):
            x, y = da.pop(key), db.pop(key)
            assert (math.isnan(x) and math.isnan(y)) or x == y
        assert da == db
    assert math.isinf(back[[r.diverged for r in back].index(True)].grad_norm_pre)

    write_metrics_jsonl(records[:2], path, append=True)
    assert len(read_metrics_jsonl(path)) == len(records) + 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + '\n\n{"arm": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a StepRecord"):
        read_metrics_jsonl(bad)


@pytest.mark.skipif(
    not os.path.exists("/usr/bin/chromium"),
    reason="PNG export needs Chromium at /usr/bin/chromium (kaleido renders through a browser)",
)
def test_png_charts_written(records, tmp_path):
    paths = write_png_charts(records, tmp_path / "png")
    assert [p.name for p in paths] == ["loss.png", "grad_norm.png", "loss_delta.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", p
        assert len(data) > 20_000, f"{p} is only {len(data)} bytes"


def test_png_charts_without_browser_raise_runtime_error(records, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    with pytest.raises(RuntimeError, match="needs a Chrome or Chromium"):
        write_png_charts(records, tmp_path / "png")


def test_few_steps_get_integer_ticks(records):
    short = [r for r in records if r.step <= 5]
    fig = make_loss_figure(short, smoothing=0.0)
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"
    assert make_loss_figure(records, smoothing=0.0).layout.xaxis.dtick is None

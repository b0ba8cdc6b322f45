"""Renderers: one document for summary.md and report.html, the PNG charts, the receipt; and one set of charts for the
page, the report and the PNG export."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest

from crma.ablation.analysis.attribution import attribution
from crma.ablation.analysis.summary import summarize_run
from crma.ablation.report import render
from crma.ablation.report.charts import CHART_KEYS, ChartData, draw_charts
from crma.ablation.report.render import (
    attribution_markdown,
    receipt_blocks,
    report_html,
    status_note,
    summary_markdown,
    to_html,
    write_png_charts,
)


def test_summary_markdown_table(records, records2):
    two = [r for r in records if r.arm in ("lora", "lora+crma")]
    md = summary_markdown(
        summarize_run(two, arm_info={"lora": {"trainable_params": 4096}, "lora+crma": {"trainable_params": 5000}})
    )
    assert md.startswith("## LoRA vs LoRA+CRMA")
    for row in [
        "| Metric | lora | lora+crma | Delta |",
        "| Final training loss | 1.2000 | 1.2100 | +0.8% |",
        "| Final training loss (EMA 0.9) | 1.3680 | 1.3712 | +0.2% |",  # the weight is named
        "| Peak grad norm (pre-clip) | 30.00 | 1.02 | -96.6% |",
        # Against the fixed clip's cap or a count, a percentage means nothing: plain differences.
        "| Peak grad norm (post-clip) | 1.50 | 1.02 | -0.48 |",
        "| Steps clipped | 1 | 2 | +1 |",
        "| Gradient spikes | 1 | 0 | -1 |",
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
    assert "Mean grad norm" in md and "%" not in md.split("| Steps clipped")[1].split("\n")[0]
    assert "doubly stochastic" in md and "noise" in md
    assert "smoothed with weight 0.9" in md  # the footnote says what the EMA row is
    assert "stopped" not in md  # a run without a status (or finished) carries no banner
    # The author's two-arm recipe: the attribution section says why nothing can be credited.
    assert "### What can be credited to what" in md and "two things at once" in md

    run = summarize_run(records)
    run["notes"] = ["CPU fallback: no GPU found"]  # remarks the engine attaches are kept as footnotes
    full = summary_markdown(run, title="Four arms")
    assert full.startswith("## Four arms") and "- CPU fallback: no GPU found" in full
    assert "| Metric | lora | lora+crma | lora+zclip | lora#2 | Δ lora+crma | Δ lora+zclip | Δ lora#2 |" in full
    assert "1.7700 (diverged @ 15)" in full and "lora+zclip diverged at step 15" in full

    multi = summary_markdown(summarize_run(records2))
    assert "### Mean ± sample std (n − 1) over 2 seeds" in multi
    assert "| Final training loss | 1.2500 ± 0.0707 |" in multi
    # lora+crma ends 0.01 above lora in both seeds; the A/A copy ties, which is not "lower"
    assert "lora+crma in 0 of 2 seeds; lora+zclip in 0 of 2 seeds; lora#2 in 0 of 2 seeds" in multi
    with pytest.raises(ValueError, match="summarize_run"):
        summary_markdown({"rows": []})


def test_a_stopped_or_failed_run_says_so_in_both_reports(records):
    summary = {**summarize_run(records), "status": "stopped", "error": "stopped by request"}
    banner = "This run stopped before it finished (stopped by request): the numbers are partial, from the 40 steps"
    assert status_note(summary).startswith(banner)
    md = summary_markdown(summary, title="t")
    assert md.startswith(f"## t\n\n**{banner}")
    assert '<p class="status"><strong>' + banner in report_html(records, summary)
    failed = {**summarize_run([r for r in records if r.step <= 7]), "status": "failed", "error": "out of memory"}
    assert "failed before it finished (out of memory)" in summary_markdown(failed) and "from the 7 steps" in (
        status_note(failed) or ""
    )
    assert status_note({**summary, "status": "finished"}) is None and status_note(summarize_run(records)) is None


def test_attribution_markdown_one_seed_and_without_the_grid(records):
    # A one-seed 2x2 grid: lora and lora+crma as they are, lora#2 as lora+mix, a copy of lora as lora+zclip.
    renamed = {"lora": "lora", "lora+crma": "lora+crma", "lora#2": "lora+mix"}
    one = [replace(r, arm=renamed[r.arm]) for r in records if r.arm in renamed]
    one += [replace(r, arm="lora+zclip") for r in records if r.arm == "lora"]
    summary = summarize_run(one)
    summary["attribution"] = attribution(summary)
    text = attribution_markdown(summary)
    assert text.startswith("### What can be credited to what")
    assert "on one seed (an interval needs two or more)" in text and "**At the shared LR**" in text
    sentences = [line for line in text.splitlines() if line.startswith("- ")]
    # No held-out slice here: the primary outcome is the training loss, and every block says so.
    assert (
        sentences[0]
        == "- Primary outcome: the final training loss, a training figure: no held-out slice was evaluated."
    )
    assert sentences[1].startswith("- LRs not tuned: every arm trained at one shared LR")
    # One sentence per contrast on the primary figure (the other effects stay in the table on one seed): the grid's
    # three and CRMA against ZClip LoRA.
    assert len(sentences) == 2 + 4 and all("no interval can be given with one seed" in line for line in sentences[2:])
    assert attribution_markdown(summary, level=0).startswith("**At the shared LR**")
    two = summarize_run([r for r in records if r.arm in ("lora", "lora+crma")])
    two["attribution"] = attribution(two)
    assert "two things at once" in attribution_markdown(two)
    three = summarize_run([r for r in records if r.arm in ("lora", "lora+crma", "lora+zclip")])
    three["attribution"] = attribution(three)
    # lora+crma vs lora+zclip differ in the adapter only: that contrast stands without the grid.
    assert "CRMA (lora+crma vs ZClip LoRA) lowered the final training loss" in attribution_markdown(three)
    alone = summarize_run([r for r in records if r.arm == "lora"])
    alone["attribution"] = attribution(alone)
    assert "two things at once" not in attribution_markdown(alone)


def test_report_html_self_contained(records):
    summary = _with_receipt(records)
    text = report_html(records, summary, title="Run <1> & co", config={"lr": 1e-4, "note": "<b>bold</b>"})
    assert text.count("plotly.js v") == 1  # the bundle, once
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing loaded from anywhere
    assert text.count("Plotly.newPlot(") == 4  # loss, grad norm, delta, mixing
    assert [f"chart-{key}" in text for key in CHART_KEYS] == [True, True, True, True, False]  # no LR grid here
    assert "<title>Run &lt;1&gt; &amp; co</title>" in text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text  # readable on a phone
    assert "<td>Peak grad norm (pre-clip)</td><td>30.00</td>" in text
    assert text.count('<div class="table-wrap"><table') >= 3  # every table scrolls inside its own box
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and '"lr": 0.0001' in text
    # The fairness receipt is in the report, as on the page.
    receipt = text.split("<h3>Fairness receipt: what is identical between the arms</h3>")[1]
    assert "<td>42</td><td>✅ yes</td><td>✅ yes</td><td>✅ yes</td><td><code>bbbbbbbbbbbbbbbb…</code></td>" in receipt
    assert (
        '<table class="wrap">' in receipt and "<td>clipper</td><td>clip_grad_norm(1.0)</td><td>zclip</td>" in receipt
    )
    blocks = receipt_blocks({"receipt": {**RECEIPT, "problems": ["lora+crma: batches differ"]}})
    assert "<strong>Problems found:</strong> lora+crma: batches differ" in to_html(blocks, {}, title="t")
    assert "No fairness receipt" in report_html(records, summarize_run(records))


RECEIPT = {
    "seed": 42,
    "lora_init_sha256": {"lora": "a" * 64, "lora+crma": "a" * 64},
    "lora_init_equal": True,
    "batch_order_sha256": "b" * 64,
    "batches_seen_equal": True,
    "differs_only_in_adapter": True,
    "config_diff": {"clipper": {"lora": "clip_grad_norm(1.0)", "lora+crma": "zclip"}},
}


def _with_receipt(records):
    return {**summarize_run(records), "receipt": RECEIPT}


@pytest.mark.skipif(
    not os.path.exists("/usr/bin/chromium"),
    reason="PNG export needs Chromium at /usr/bin/chromium (kaleido renders through a browser)",
)
def test_png_charts_written(records, tmp_path):
    paths = write_png_charts(draw_charts(ChartData(records)), tmp_path / "png")
    assert [p.name for p in paths] == ["loss.png", "grad_norm.png", "loss_delta.png", "mixing.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", p
        assert len(data) > 20_000, f"{p} is only {len(data)} bytes"


def test_png_charts_without_browser_raise_runtime_error(records, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    with pytest.raises(RuntimeError, match="needs a Chrome or Chromium"):
        write_png_charts(draw_charts(ChartData(records)), tmp_path / "png")


def test_the_page_the_report_and_the_png_export_show_the_same_charts(records, tmp_path, monkeypatch):
    """One list of charts (`charts.CHARTS`): the page draws a plot per entry, report.html a div per entry that has
    something to show, the PNG export a file per such entry."""
    import plotly.io as pio

    from crma.ablation.spec.config import AblationConfig
    from crma.lab.live import LiveView

    summary = _with_receipt(records)
    figures = draw_charts(ChartData(records, summary=summary, baseline="lora"))
    shown = {key for key, fig in figures.items() if fig is not None}
    html = report_html(records, summary)
    assert {key for key in CHART_KEYS if f'id="chart-{key}"' in html} == shown
    written: list[str] = []
    monkeypatch.setattr(pio, "write_images", lambda figs, paths, **kw: written.extend(p.name for p in paths))
    write_png_charts(figures, tmp_path)
    assert set(written) == {f"{key}.png" for key in shown}
    view = LiveView(AblationConfig(arms=sorted({r.arm.partition("#")[0] for r in records})))
    for record in records:
        view.update(record)
    view.finish(summary)
    assert {key for key, fig in view.figures().items() if fig is not None} == shown
    from crma.ui.layout import build_page  # the page: one plot per chart of the list, in its order

    assert list(build_page().charts.plots) == list(CHART_KEYS)


def test_a_machine_without_chromium_says_so_in_the_run_and_on_the_page(records, tmp_path, monkeypatch):
    from choreographer.browsers.chromium import Chromium

    from crma.ui.layout import build_page

    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(render, "_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setattr(Chromium, "find_browser", staticmethod(lambda **kwargs: None))
    assert render.png_browser() is None
    with pytest.raises(RuntimeError, match="no Chrome or Chromium on this machine"):
        write_png_charts(draw_charts(ChartData(records)), tmp_path / "png")
    assert not (tmp_path / "png").exists()
    by_id = {b.elem_id: b for b in build_page().demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["no-png-note"].value.startswith("ℹ️ No Chrome or Chromium on this machine")


def test_a_machine_with_chromium_has_no_such_note(monkeypatch):
    from crma.ui.layout import build_page

    monkeypatch.setattr(render, "png_browser", lambda: "/usr/bin/chromium")
    ids = {getattr(b, "elem_id", None) for b in build_page().demo.blocks.values()}
    assert "no-png-note" not in ids and "default-note" in ids

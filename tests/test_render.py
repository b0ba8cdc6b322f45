"""Renderers: the Markdown table, the self-contained HTML report, PNG charts, the receipt."""

from __future__ import annotations

import os
import re

import pytest

from crma.ablation.render import report_html, summary_markdown, write_png_charts
from crma.ablation.summary import summarize_run


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


def test_report_html_self_contained(records):
    summary = summarize_run(records)
    text = report_html(records, summary, title="Run <1> & co", config={"lr": 1e-4, "note": "<b>bold</b>"})
    assert text.count("plotly.js v") == 1  # the bundle, once
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing loaded from anywhere
    assert text.count("Plotly.newPlot(") == 4  # loss, grad norm, delta, mixing
    assert "<title>Run &lt;1&gt; &amp; co</title>" in text
    assert "<td>Peak grad norm (pre-clip)</td><td>30.00</td>" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and '"lr": 0.0001' in text


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

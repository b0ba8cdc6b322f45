"""End to end in a real browser: the page loads, a run streams every default arm into the charts, Stop ends it
mid-run with its partial results shown. Headless Debian Chromium driven by Playwright; skipped where either is
missing. The run's PNG export is replaced by one that fails as without a browser: the page is what is checked here,
and a second Chromium (kaleido's) would only cost time."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from crma.ablation.arms import GRID_ARMS

REPO = Path(__file__).resolve().parents[1]
ARMS = list(GRID_ARMS)  # the form's default arms
STEPS = 1000  # the most the form allows: far more than the few steps that pass before Stop arrives


def _load_driver():
    # The page-driving helpers live in the screenshot script, so the test and the README image use the same flow.
    spec = importlib.util.spec_from_file_location("take_screenshot", REPO / "scripts" / "take_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = _load_driver()
CHROMIUM = driver.find_chromium()
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="playwright is not installed (pip install playwright; never `playwright install`)",
    ),
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium, or set CHROMIUM_PATH)"),
]


@pytest.fixture
def app_url(tmp_path, monkeypatch):
    """The app served in this process on a free 127.0.0.1 port; its run folders go to tmp_path."""
    from crma.ablation import writer

    def no_browser(*args, **kwargs):
        raise RuntimeError("no browser")

    monkeypatch.setattr(writer, "write_png_charts", no_browser)
    monkeypatch.setenv("CRMA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with driver.serve_app() as url:
        yield url


def test_run_streams_every_arm_and_stop_keeps_partial_results(app_url, tmp_path):
    errors: list[str] = []
    with driver.open_page(app_url, chromium=CHROMIUM, errors=errors) as page:
        driver.choose_model(page, "tiny-random")
        # tiny-random's byte tokenizer makes long prompts: 256 tokens keep every bundled row's answer in the window.
        driver.fill_numbers(page, {"Rows": 32, "Steps": STEPS, "Batch size": 2, "Seq len": 256})
        # The grid button fills the arms in the browser (a JS handler, no round trip).
        page.get_by_label("lora+zclip", exact=True).uncheck()
        assert not page.get_by_label("lora+zclip", exact=True).is_checked()
        page.get_by_role("button", name="2×2 attribution grid").click()
        page.wait_for_function(
            "(arms) => arms.every(a => [...document.querySelectorAll('input[type=checkbox]')]"
            ".some(box => box.checked && box.closest('label')?.innerText.trim() === a))",
            arg=ARMS,
            timeout=5_000,
        )
        driver.start_run(page)

        driver.wait_for_arms(page, ARMS, timeout_s=60)
        running = driver.progress_text(page)
        assert re.match(rf"Step \d+/{STEPS} ", running), running

        page.click("#stop-btn")
        page.get_by_text("Stopping after the current step").wait_for(state="visible", timeout=10_000)
        ended = driver.wait_for_end(page, timeout_s=60)

        match = re.match(r"Stopped at step (\d+)/(\d+) \(stopped by request\); partial results kept", ended)
        assert match, ended
        done, total = int(match[1]), int(match[2])
        assert total == STEPS and 1 <= done < STEPS
        # The results section shows what was kept: the status line, and a summary naming every arm and the model.
        page.get_by_text("Status: stopped").wait_for(state="visible", timeout=5_000)
        page.get_by_text("PNG charts not written: no browser").wait_for(state="visible", timeout=5_000)
        summary = page.locator("#summary").inner_text()
        assert f"{' vs '.join(ARMS)} on tiny-random" in summary
        assert "Final loss" in summary
        # The last redraw still shows every arm in every chart; the delta chart plots each arm against lora.
        for plot in ("#loss-plot", "#grad-plot"):
            driver.wait_for_arms(page, ARMS, plot=plot, timeout_s=5)
        driver.wait_for_arms(page, ARMS[1:], plot="#delta-plot", timeout_s=5)
        # The form's values reached the server: the reproduce command names them.
        page.get_by_text("Reproduce: CLI and Python client").click()
        repro = page.locator(".cm-content").filter(has_text="python -m crma ablate").first.inner_text()
        for flag in ("--model tiny-random", "--rows 32", f"--steps {STEPS}", "--seq-len 256"):
            assert flag in repro, repro
        # Stop is disabled again and Run enabled: a second run can start.
        assert page.locator("#stop-btn").is_disabled()
        assert page.locator("#run-btn").is_enabled()

        shot = tmp_path / "stopped.png"
        page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == driver.PNG_MAGIC
    assert len(data) > 50_000  # a page of charts and tables, not a blank or spinner-only capture
    assert errors == [], errors

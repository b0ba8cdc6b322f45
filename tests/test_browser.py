"""End to end in a real browser: the page loads, a run streams every default arm into the charts, the visitor's zoom
and hidden traces survive the live updates, Stop ends it mid-run with its partial results and attribution shown, the
hover labels say what they show, and at a phone's width (390 px) the page and the run's report.html stay readable.
Headless Debian Chromium driven by Playwright; skipped where either is missing. The run's PNG export is replaced by
one that fails as without a browser: the page is what is checked here, and a second Chromium (kaleido's) would only
cost time."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from crma.ablation.engine.records import Phase
from crma.ablation.spec.arms import GRID_ARMS
from crma.ablation.spec.config import AblationConfig
from crma.lab.live import LiveView

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
    from crma.ablation.report import render

    def no_browser(*args, **kwargs):
        raise RuntimeError("no browser")

    monkeypatch.setattr(render, "write_png_charts", no_browser)
    # Runs train in this process (the ZeroGPU call path), where the stand-in above applies; the app's child process
    # has its own tests.
    from crma.lab import launcher
    from crma.ui import space

    monkeypatch.setattr(space, "GPU_CALL", launcher.visitor_run)
    monkeypatch.setenv("CRMA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CRMA_STUDY_DIR", str(tmp_path / "no-study"))  # the page as it is before a study is committed
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with driver.serve_app() as url:
        yield url
        # A test that failed before pressing Stop leaves a 1000-step run going, which the server would wait for.
        from crma.lab import runs

        for folder in (tmp_path / "runs").glob("*"):
            runs.request_stop(folder.name, tmp_path / "runs")


PHONE = {"width": 390, "height": 844}
_ANSWERED_JS = """(n) => {
  const cols = [...document.querySelectorAll('#crma-answers .crma-answer')];
  return cols.length === n && cols.every(c => c.innerText.includes(' tokens · '));
}"""
_ANSWER_COLUMNS_JS = """() => [...document.querySelectorAll('#crma-answers .crma-answer')].map(c => ({
  arm: c.dataset.arm, text: c.innerText, right: c.getBoundingClientRect().right,
}))"""
_ARMS_CHECKED_JS = """(arms) => {
  const checked = [...document.querySelectorAll('input[type=checkbox]')]
    .filter(box => box.checked).map(box => box.closest('label')?.innerText.trim());
  return arms.every(a => checked.includes(a)) && checked.filter(a => a.startsWith('lora')).length === arms.length;
}"""
# Zoom into steps 2-4 of a chart and hide one arm, through Plotly's own API on the chart element (what a drag and a
# legend click call); retried when a live update replaced the element mid-way. Returns the number of retries.
_ZOOM_AND_HIDE_JS = """async ([sel, arm]) => {
  for (let i = 0; i < 20; i++) {
    const gd = document.querySelector(sel + ' .js-plotly-plot');
    await Plotly.relayout(gd, {'xaxis.range': [2, 4]});
    await Plotly.restyle(gd, {visible: 'legendonly'}, [gd.data.findIndex(t => t.name === arm)]);
    if (gd.isConnected) { gd.dataset.zoomed = 'yes'; return i; }
  }
  return -1;
}"""
# The chart's state once a live update has replaced the element that was zoomed.
_REDRAWN_VIEW_JS = """(sel) => {
  const gd = document.querySelector(sel + ' .js-plotly-plot');
  if (!gd || gd.dataset.zoomed || !gd._fullLayout) return null;
  return {range: gd._fullLayout.xaxis.range, hidden: gd.data.filter(t => t.visible === 'legendonly').map(t => t.name)};
}"""
_HOVER_JS = """([sel, step]) => {
  const gd = document.querySelector(sel + ' .js-plotly-plot');
  Plotly.Fx.hover(gd, {xval: step});
  const text = gd.querySelector('.hoverlayer').textContent;
  Plotly.Fx.unhover(gd);
  return text;
}"""
# Table cells under `sel` whose text takes more than one line (a header broken letter by letter, a number split).
_BROKEN_CELLS_JS = """(sel) => {
  const broken = [];
  for (const cell of document.querySelectorAll(sel)) {
    if (!cell.innerText.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(cell);
    const tops = [...range.getClientRects()].map(r => r.top).sort((a, b) => a - b);
    if (tops.length && tops[tops.length - 1] - tops[0] > 4) broken.push(cell.innerText.trim());
  }
  return broken;
}"""
# Per chart: its title inside the chart, and the legend clear of the title.
_TITLES_JS = """(sels) => sels.map(sel => {
  const gd = document.querySelector(sel + ' .js-plotly-plot');
  const box = (el) => el.getBoundingClientRect();
  // What is drawn of the legend: its symbols and texts (not the wider, invisible click targets).
  const items = [...gd.querySelectorAll('.infolayer .legend :is(.legendtext, .legendsymbols)')].map(box);
  const l = {left: Math.min(...items.map(r => r.left)), right: Math.max(...items.map(r => r.right)),
             top: Math.min(...items.map(r => r.top)), bottom: Math.max(...items.map(r => r.bottom))};
  const g = box(gd), t = box(gd.querySelector('.gtitle'));
  return {
    sel, width: g.width,
    title_inside: t.left >= g.left - 1 && t.right <= g.right + 1 && t.top >= g.top - 1 && t.width > 0,
    legend_inside: l.left >= g.left - 1 && l.right <= g.right + 1 && l.bottom <= g.bottom + 1,
    overlap: !(l.bottom <= t.top || l.top >= t.bottom || l.right <= t.left || l.left >= t.right),
  };
})"""
_PAGE_WIDTH_JS = "() => [document.documentElement.scrollWidth, window.innerWidth]"


def _check_readable_at_phone_width(page, tables: str, charts: list[str]) -> None:
    width, viewport = page.evaluate(_PAGE_WIDTH_JS)
    assert width <= viewport, f"the page scrolls sideways: {width} px wide in a {viewport} px window"
    assert page.locator(tables).count() > 10
    assert page.evaluate(_BROKEN_CELLS_JS, tables) == []
    for chart in page.evaluate(_TITLES_JS, charts):
        assert chart["width"] <= viewport and chart["title_inside"] and chart["legend_inside"], chart
        assert not chart["overlap"], chart


def test_run_streams_every_arm_and_stop_keeps_partial_results(app_url, tmp_path):
    errors: list[str] = []
    with driver.open_page(app_url, chromium=CHROMIUM, errors=errors) as page:
        page.wait_for_timeout(2_000)  # the page's load events (re-attach, estimate) have answered
        assert page.locator("#run-btn").inner_text() == "Run"  # no load event blanks the button
        assert page.locator(".error").count() == 0  # nor marks a chart or the progress line as failed
        # Run is on the first screen, even of a 1280 x 720 laptop.
        run_box = page.locator("#run-btn").bounding_box()
        assert run_box["y"] + run_box["height"] <= 720, run_box
        driver.choose_model(page, "tiny-random")
        # tiny-random's byte tokenizer makes long prompts: 256 tokens keep every bundled row's answer in the window.
        driver.fill_numbers(page, {"Rows": 32, "Steps": STEPS, "Batch size": 2, "Seq len": 256})
        # The arm buttons fill the arms in the browser (JS handlers, no round trip).
        page.get_by_role("button", name="Author's recipe: two changes at once").click()
        page.wait_for_function(_ARMS_CHECKED_JS, arg=["lora", "lora+crma"], timeout=5_000)
        assert not page.get_by_label("lora+zclip", exact=True).is_checked()
        page.get_by_role("button", name="2×2 grid").click()
        page.wait_for_function(_ARMS_CHECKED_JS, arg=ARMS, timeout=5_000)
        driver.start_run(page)

        driver.wait_for_arms(page, ARMS, timeout_s=60)
        running = driver.progress_text(page)
        assert re.match(rf"Step \d+/{STEPS} ", running), running

        # A reload mid-run: the page re-attaches to the run (its id is in localStorage), and the run went on.
        before = int(re.match(r"Step (\d+)/", running)[1])
        page.reload(wait_until="domcontentloaded")
        driver.wait_for_arms(page, ARMS, timeout_s=60)
        page.wait_for_function(
            "(n) => Number((document.querySelector('#run-progress').innerText.match(/Step (\\d+)\\//) || [])[1]) > n",
            arg=before,
            timeout=30_000,
        )
        assert page.locator("#stop-btn").is_enabled() and page.locator("#run-btn").is_disabled()

        # Zoom and a hidden arm survive the next live update, which re-creates the chart element.
        assert page.evaluate(_ZOOM_AND_HIDE_JS, ["#plot-loss", "lora+zclip"]) >= 0
        page.wait_for_function(_REDRAWN_VIEW_JS, arg="#plot-loss", timeout=10_000)
        view = page.evaluate(_REDRAWN_VIEW_JS, "#plot-loss")
        assert view == {"range": [2, 4], "hidden": ["lora+zclip"]}, view
        assert re.match(rf"Step \d+/{STEPS} ", driver.progress_text(page))  # it was a live update

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
        assert "Final training loss (EMA 0.9)" in summary and "This run stopped before it finished" in summary
        assert "Held-out loss (final)" in summary
        # Under the charts: what can be credited to what, on one seed without an interval, and which figure it is.
        attribution = page.locator("#attribution").inner_text()
        assert "What can be credited to what" in attribution and "CRMA's side channel" in attribution
        assert "no interval can be given with one seed" in attribution
        assert "Primary outcome: the final held-out (test) loss" in attribution and "At the shared LR" in attribution
        assert "No published study yet" in page.locator("#study").inner_text()
        # The last redraw still shows every arm in every chart; the delta chart plots each arm against lora.
        for plot in ("#plot-loss", "#plot-grad_norm"):
            driver.wait_for_arms(page, ARMS, plot=plot, timeout_s=5)
        driver.wait_for_arms(page, ARMS[1:], plot="#plot-loss_delta", timeout_s=5)
        # ... and the visitor's zoom.
        assert page.evaluate("() => document.querySelector('#plot-loss .js-plotly-plot').layout.xaxis.range") == [2, 4]
        # Hover labels say which value is smoothed and which is raw; signed differences show 4 decimals.
        grad = page.evaluate(_HOVER_JS, ["#plot-grad_norm", 2])
        assert re.search(r"lora : pre-clip, EMA 0\.6: \d+\.\d{3} · raw \d+\.\d{3}", grad), grad
        assert re.search(r"lora post-clip : raw \d+\.\d{3}", grad), grad
        delta = page.evaluate(_HOVER_JS, ["#plot-loss_delta", 2])
        pairs = re.findall(r"Δ EMA 0\.6: ([+-]\d+\.\d+) · raw ([+-]\d+\.\d+)", delta)
        assert len(pairs) == len(ARMS) - 1 and all(len(x.split(".")[1]) == 4 for p in pairs for x in p), delta
        # The form's values reached the server: the reproduce command names them.
        page.get_by_text("Reproduce: CLI and Python client").click()
        repro = page.locator(".cm-content").filter(has_text="python -m crma ablate").first.inner_text()
        for flag in ("--model tiny-random", "--rows 32", f"--steps {STEPS}", "--seq-len 256"):
            assert flag in repro, repro
        # Stop is disabled again and Run enabled: a second run can start.
        assert page.locator("#stop-btn").is_disabled()
        assert page.locator("#run-btn").is_enabled()

        # A reload keeps the results: the run id lives in the browser (localStorage), and the page re-attaches.
        page.reload(wait_until="domcontentloaded")
        page.get_by_text("Status: stopped").wait_for(state="visible", timeout=30_000)
        assert f"{' vs '.join(ARMS)} on tiny-random" in page.locator("#summary").inner_text()
        assert driver.progress_text(page).startswith(f"Stopped at step {done}/{STEPS}")
        driver.wait_for_arms(page, ARMS, plot="#plot-loss", timeout_s=10)
        assert page.locator("#run-btn").is_enabled() and page.locator("#stop-btn").is_disabled()
        assert page.locator("#run-btn").inner_text() == "Run" and page.locator("#stop-btn").inner_text() == "Stop"

        # Try the adapters: every arm and the base model answer one prompt side by side, headed in the chart colours.
        page.locator("#try-prompt textarea").fill("Name a colour of the sky.")
        page.click("#try-answer")
        page.wait_for_function(_ANSWERED_JS, arg=len(ARMS) + 1, timeout=60_000)
        columns = page.evaluate(_ANSWER_COLUMNS_JS)
        assert [c["arm"] for c in columns] == ["base", *ARMS], columns
        assert all(re.search(r"\d+ tokens · \d+\.\d s", c["text"]) for c in columns), columns

        # The progress line's clocks tick in the browser between server updates (a set-up can last minutes).
        view = LiveView(AblationConfig(model="tiny-random"), clock=lambda: 75.0)
        view.update(Phase("seed 42: setting up 4 arms", seed=42))
        view.started = 0.0
        page.evaluate("(html) => { document.querySelector('#run-progress').innerHTML = html; }", view.progress_html())
        assert "setting up 4 arms (1:15)" in driver.progress_text(page)
        page.wait_for_function("() => document.querySelector('#run-progress').innerText.includes('(1:16)')")

        shot = tmp_path / "stopped.png"
        page.screenshot(path=str(shot), full_page=True)

        # A phone: every result table readable (no header or number broken over lines; the tables scroll sideways
        # inside their own boxes), every chart title whole and clear of the legend.
        page.set_viewport_size(PHONE)
        # Plotly lays a chart out again once it has noticed the new size: wait for every chart's new layout.
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot')].every(gd => gd._fullLayout.width <= 390)"
        )
        page.evaluate("() => window.scrollTo(0, 0)")
        assert page.locator("#run-btn").bounding_box()["y"] < PHONE["height"]
        _check_readable_at_phone_width(
            page,
            "#summary th, #summary td, #attribution th, #attribution td",
            ["#plot-loss", "#plot-grad_norm", "#plot-loss_delta"],
        )
        # The answers stack at a phone's width: every column within the screen, nothing to scroll sideways.
        columns = page.evaluate(_ANSWER_COLUMNS_JS)
        assert all(c["right"] <= PHONE["width"] + 1 for c in columns), columns
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)

        # The run's report.html in a phone's browser (mobile emulation: without a viewport tag a phone lays a page
        # out 980 px wide and shrinks it).
        (report,) = (tmp_path / "runs").glob("*/*/report.html")
        phone = page.context.browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            mobile = phone.new_page()
            mobile.goto(report.as_uri())
            mobile.wait_for_selector(".js-plotly-plot .legend", timeout=30_000)
            assert mobile.evaluate("() => window.innerWidth") == PHONE["width"]
            assert "This run stopped before it finished" in mobile.locator(".status").inner_text()
            assert mobile.get_by_text("Fairness receipt: what is identical between the arms").is_visible()
            _check_readable_at_phone_width(
                mobile,
                "table:not(.wrap) th, table:not(.wrap) td",
                ["#chart-loss", "#chart-grad_norm", "#chart-loss_delta"],
            )
        finally:
            phone.close()
    data = shot.read_bytes()
    assert data[:8] == driver.PNG_MAGIC
    assert len(data) > 50_000  # a page of charts and tables, not a blank or spinner-only capture
    assert errors == [], errors

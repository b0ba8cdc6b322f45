"""Run an ablation in the CRMA Lab page like a visitor (headless Chromium) and save the README screenshot.

    python scripts/take_screenshot.py                    # the CPU defaults: SmolLM2-135M, 30 steps, ~80 s
    python scripts/take_screenshot.py --model tiny-random --steps 120 --seq-len 256 --spike-at 80

The app is served in-process on 127.0.0.1 and driven through Playwright with the system's Chromium (never a
Playwright browser download). `tests/test_browser.py` reuses the helpers below, so the test and the screenshot drive
the page the same way.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT_PATH = REPO / "assets" / "screenshot.png"
# Chromium flags that work here without a sandbox, a GPU or the network (docs/machine-notes.md).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
END_PATTERN = re.compile(r"^(Finished|Stopped at step (\d+)/(\d+)|Failed)")

# True once the chart `sel` has drawn a line for every arm: Plotly renders one `.trace` group per visible trace and
# one `.legendtext` per legend entry (the smoothed line of each arm; raw lines and bands have no entry).
_ARMS_DRAWN_JS = """([sel, arms]) => {
  const root = document.querySelector(sel);
  if (!root) return false;
  const traces = root.querySelectorAll('.js-plotly-plot .scatterlayer .trace');
  const names = new Set([...root.querySelectorAll('.legend .legendtext')].map(e => e.textContent.trim()));
  return traces.length >= arms.length && arms.every(a => names.has(a));
}"""
_RUN_ENDED_JS = """(pattern) => {
  const el = document.querySelector('#run-progress');
  return !!el && new RegExp(pattern).test(el.innerText.trim());
}"""


def find_chromium() -> str | None:
    """Path of the system Chromium: `$CHROMIUM_PATH`, else `chromium` on PATH, else /usr/bin/chromium if present."""
    for candidate in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    # The OS picks a free port; the tiny window before gradio binds it again is harmless on a test machine.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app() -> Iterator[str]:
    """Build the page (`crma.ui.layout.build_demo()`, what app.py serves), serve it on a free 127.0.0.1 port in this
    process and yield its URL."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no call home at start-up (machine-notes.md)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from crma.ui.layout import build_demo
    from crma.ui.space import LAUNCH_OPTIONS

    demo = build_demo()
    port = _free_port()
    demo.queue().launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextmanager
def open_page(
    url: str, *, chromium: str, width: int = 1400, height: int = 1000, errors: list[str] | None = None
) -> Iterator[Any]:
    """A headless Chromium page on `url`, loaded up to the Run button; uncaught page errors go to `errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            if errors is not None:
                page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#run-btn", state="visible", timeout=30_000)
            yield page
        finally:
            browser.close()


def choose_model(page: Any, name: str) -> None:
    """Pick preset `name` in the Model dropdown, as a visitor does: type to filter, click the option."""
    box = page.get_by_label("Model", exact=True)
    box.click()
    box.fill(name)
    page.locator("[role=option]").filter(has_text=f"{name}:").first.click()
    page.wait_for_function(
        "([el, name]) => el.value.startsWith(name + ':')", arg=[box.element_handle(), name], timeout=5_000
    )


def fill_numbers(page: Any, values: Mapping[str, int]) -> None:
    """Type `values` into the number boxes labelled by the keys (opening the Hyperparameters accordion when one of
    them lives there: a closed accordion does not render its fields)."""
    for label, value in values.items():
        field = page.get_by_label(label, exact=True)
        if field.count() == 0:
            page.get_by_text("Hyperparameters", exact=True).click()
            field.wait_for(state="visible", timeout=5_000)
        field.fill(str(value))
        field.press("Tab")  # blur: gradio commits the value, as when a visitor moves on


def start_run(page: Any) -> None:
    """Click Run and wait until the page accepted it (Stop becomes clickable)."""
    page.click("#run-btn")
    page.wait_for_selector("#stop-btn:not([disabled])", timeout=30_000)


def wait_for_arms(page: Any, arms: list[str], *, plot: str = "#plot-loss", timeout_s: float = 60) -> None:
    """Wait until chart `plot` has drawn a named line for every arm in `arms`."""
    page.wait_for_function(_ARMS_DRAWN_JS, arg=[plot, arms], timeout=timeout_s * 1000)


def progress_text(page: Any) -> str:
    """The progress line under the bar (`Step k/N ...`, then `Finished ...` / `Stopped at step k/N ...`)."""
    return page.locator("#run-progress").inner_text().strip()


def wait_for_end(page: Any, *, timeout_s: float = 60) -> str:
    """Wait until the run ended (finished, stopped or failed) and its results are shown; return the progress line."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(_RUN_ENDED_JS, arg=END_PATTERN.pattern, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        raise TimeoutError(f"the run did not end within {timeout_s:g} s; progress: {progress_text(page)!r}") from None
    text = progress_text(page)
    if not text.startswith("Failed"):
        page.wait_for_selector("#summary", state="visible", timeout=30_000)
    page.wait_for_selector("#run-btn:not([disabled])", timeout=10_000)
    return text


def to_png(image_bytes: bytes, *, width: int, max_bytes: int) -> bytes:
    """`image_bytes` scaled to `width` px wide, then palette-quantised only if the PNG is still over `max_bytes`."""
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    if image.width != width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    for candidate in (image, image.quantize(colors=256, dither=Image.Dither.NONE)):
        out = io.BytesIO()
        candidate.save(out, format="PNG", optimize=True)
        if out.tell() <= max_bytes:
            break
    return out.getvalue()


def screenshot_top(page: Any, *, below: str = "#plot-loss_delta", margin: int = 12) -> bytes:
    """PNG of the page from the top to `margin` px under element `below` (the settings and the three charts)."""
    # Move the mouse away so no hover label covers a chart.
    page.mouse.move(0, 0)
    box = page.locator(below).bounding_box()
    scroll_y = page.evaluate("window.scrollY")
    bottom = box["y"] + scroll_y + box["height"] + margin
    width = page.viewport_size["width"]
    return page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": width, "height": bottom})


def main(argv: list[str] | None = None) -> int:
    """Run one ablation in the page until it finishes and write the README screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--spike-at", type=int, default=0, help="stress step (0 = off)")
    parser.add_argument("--out", type=Path, default=SCREENSHOT_PATH)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--max-kb", type=int, default=400)
    parser.add_argument("--timeout-s", type=float, default=900, help="longest wait for the run to finish")
    args = parser.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        parser.error("no Chromium found: install Debian's `chromium` (make browser) or set CHROMIUM_PATH")
    started = time.monotonic()
    with serve_app() as url, open_page(url, chromium=chromium, width=args.width) as page:
        choose_model(page, args.model)
        fill_numbers(
            page,
            {
                "Rows": args.rows,
                "Steps": args.steps,
                "Batch size": args.batch_size,
                "Seq len": args.seq_len,
                "Spike stress at step (0 = off)": args.spike_at,
            },
        )
        if page.get_by_label("Batch size", exact=True).is_visible():  # close it again: the charts matter here
            page.get_by_text("Hyperparameters", exact=True).click()
        start_run(page)
        wait_for_arms(page, ["lora", "lora+crma"], timeout_s=args.timeout_s)
        print(f"charts drawing after {time.monotonic() - started:.0f} s: {progress_text(page)}")
        ended = wait_for_end(page, timeout_s=args.timeout_s)
        print(f"ended after {time.monotonic() - started:.0f} s: {ended}")
        if not ended.startswith("Finished"):
            print("the run did not finish; no screenshot written", file=sys.stderr)
            return 1
        png = to_png(screenshot_top(page), width=args.width, max_bytes=args.max_kb * 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"wrote {args.out} ({len(png) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

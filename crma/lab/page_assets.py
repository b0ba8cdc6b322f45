"""The page's static pieces, kept as files of their own in `assets/page/`: its CSS, the script that runs once per
page load (ticking clocks; zoom and hidden traces kept through live updates), and the "How CRMA works" text."""

from __future__ import annotations

import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "page"


def _read(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


CSS = _read("page.css")
# gr.Blocks.load(js=...) takes one function expression: the file's leading comment lines are for its readers.
PAGE_JS = re.sub(r"^(//[^\n]*\n)+", "", _read("page.js")).strip()
METHOD = _read("method.md")

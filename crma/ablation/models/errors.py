"""`ModelLoadError`, and the helpers that keep its message to one line a visitor may see."""

from __future__ import annotations

import re


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line that says why and what to do."""


# Absolute paths (POSIX, home-relative or Windows) inside upstream error text: they name files of the machine the
# app runs on (its HF cache, site-packages), which a visitor of a hosted app has no use for.
_PATH = re.compile(r"(?<![\w.:/~\\])(?:~?/|[A-Za-z]:\\)[^\s'\"`,;()<>]+")


def scrub_paths(text: str) -> str:
    """`text` with each absolute path cut to its last component (`/root/.cache/x/config.json` -> `config.json`)."""

    def last(match: re.Match[str]) -> str:
        parts = [p for p in re.split(r"[/\\]", match.group(0)) if p]
        return parts[-1] if parts else match.group(0)

    return _PATH.sub(last, text)


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """`exc` and its causes / contexts, outermost first (each once)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message with paths scrubbed, or its type name when the message is empty."""
    text = str(exc).strip()
    return scrub_paths(text.splitlines()[0]) if text else type(exc).__name__

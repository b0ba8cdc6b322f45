"""The data layer's exception and the helpers that keep its messages one line long and safe to print."""

from __future__ import annotations

import re
import reprlib
from typing import Any


class DataError(ValueError):
    """A data set, row or batch problem; the message is one line naming the file, row and column."""


# JSON decodes "\ud800" to a lone surrogate: a str Python holds happily but that no UTF-8 encoder (tokenizers, log
# files, the browser) accepts. A valid pair such as "\ud83d\ude00" is joined into one character by the decoder.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxother, _REPR.maxstring = 2, 4, 4, 40, 40


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters; a huge or deeply nested value is never rendered whole."""
    text = repr(value[: limit + 1]) if isinstance(value, str) else _REPR.repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_text(value: str, where: str) -> None:
    """Raise `DataError` if `value` holds a lone surrogate; `where` names the row and column in the message."""
    match = _LONE_SURROGATE.search(value)
    if match is not None:
        raise DataError(
            f"{where} holds a lone surrogate {ascii(match.group())} at character {match.start()}, which is not "
            "valid Unicode text (a broken \\u escape); fix or remove it"
        )

""" "Try the adapters": every arm of a finished run answers one prompt beside the base model, streamed token by token,
bounded for a public Space (token budget, prompt length, a wall cap for the whole request), sharing the run slot.

`stream_answers` takes plain arguments so that on ZeroGPU it runs inside `spaces.GPU`'s worker, as a run does; it
reads the run folder's adapters (`AdapterBank`), so it works on any finished run the server still has.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crma.ablation.engine.generation import GenerationConfig
from crma.ablation.output.adapters import BASE, AdapterBank
from crma.ablation.report.plots import arm_style

from .runs import VISITOR_HUB

# What one request may ask of a public Space.
TRY_CAPS = {"max_new_tokens": 256, "prompt_chars": 2000, "prompt_tokens": 512, "seconds": 180.0}


def decoding(max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any) -> GenerationConfig:
    """The decoding of a request, within `TRY_CAPS` (`ValueError` names what is off)."""
    try:
        max_new = int(max_new_tokens)
        cfg = GenerationConfig(
            max_new_tokens=max_new,
            temperature=float(temperature or 0.0),
            top_p=float(top_p if top_p not in (None, "") else 1.0),
            seed=int(seed or 0),
            max_prompt_tokens=int(TRY_CAPS["prompt_tokens"]),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the decoding settings are not valid: {exc}") from None
    if max_new > TRY_CAPS["max_new_tokens"]:
        raise ValueError(f"at most {TRY_CAPS['max_new_tokens']} new tokens per answer on this Space; got {max_new}")
    return cfg


def check_prompt(instruction: Any) -> str:
    """The instruction, stripped; `ValueError` for an empty one or one over the Space's length cap."""
    text = instruction.strip() if isinstance(instruction, str) else ""
    if not text:
        raise ValueError("the prompt is empty: type an instruction, or pick a held-out row")
    if len(text) > TRY_CAPS["prompt_chars"]:
        raise ValueError(f"the prompt has {len(text)} characters; at most {TRY_CAPS['prompt_chars']} on this Space")
    return text


def held_out_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out rows the run answered at its end (instruction, input, reference), to pick from."""
    return list((summary.get("answers") or {}).get("prompts") or [])


def stream_answers(
    out_dir: str,
    instruction: str,
    input_text: str,
    decoding_json: str,
    arms: list[str] | None = None,
    stop_file: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The base model's answer, then each arm's, token by token: `{"arm", "text", "done", "tokens", "seconds",
    "ended"}` after every new token (plain values: on ZeroGPU this runs in a forked worker and its events travel
    back pickled). The whole request stops at `TRY_CAPS["seconds"]`, or when `stop_file` appears."""
    from .runs import StopSignal

    cfg = GenerationConfig.from_json(decoding_json)
    stop = StopSignal(stop_file) if stop_file else threading.Event()
    deadline = time.monotonic() + TRY_CAPS["seconds"]
    with AdapterBank.from_run(out_dir, **VISITOR_HUB) as bank:
        chosen = arms or bank.labels
        unknown = [a for a in chosen if a not in bank.labels]
        if unknown:
            raise ValueError(f"no arm {unknown} in this run; it has {bank.labels}")
        ids = bank.prompt_ids({"instruction": instruction, "input": input_text})
        for arm in [BASE, *chosen]:
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                yield {"arm": arm, "text": "", "done": True, "tokens": 0, "seconds": 0.0, "ended": "stopped"}
                continue
            budget = GenerationConfig.from_dict({**cfg.to_dict(), "max_seconds": left})
            for text, answer in bank.stream(arm, ids, budget, stop=stop):
                if answer is None:
                    yield {"arm": arm, "text": text, "done": False}
                else:
                    yield {**answer.to_dict(), "done": True}


def answers_html(columns: dict[str, dict[str, Any]], *, reference: str | None = None) -> str:
    """The answers side by side: one column per arm (the base first), headed in the arm's chart colour, with its
    tokens and time once done; the reference answer of a held-out row above them."""
    cells = []
    for arm, column in columns.items():
        colour = "#555555" if arm == BASE else arm_style(arm)["color"]
        name = "base model (every adapter off)" if arm == BASE else arm
        done = column.get("done")
        foot = f"{column.get('tokens', 0)} tokens · {column.get('seconds', 0.0):.1f} s" if done else "answering…"
        if done and column.get("ended") in ("time", "stopped"):
            foot += " · cut off" if column["ended"] == "time" else " · stopped"
        cells.append(
            f'<div class="crma-answer" data-arm="{html.escape(arm)}" style="border-top:4px solid {colour};'
            'padding:6px 8px;min-width:0">'
            f'<div style="font-weight:600;color:{colour};overflow-wrap:anywhere">{html.escape(name)}</div>'
            f'<div style="white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0">'
            f"{html.escape(column.get('text', ''))}</div>"
            f'<div style="font-size:0.85em;opacity:0.75">{foot}</div></div>'
        )
    top = ""
    if reference:
        top = (
            '<div class="crma-reference" style="margin-bottom:8px"><b>Reference answer:</b> '
            f"{html.escape(reference)}</div>"
        )
    grid = "display:grid;gap:10px;grid-template-columns:repeat(auto-fit,minmax(220px,1fr))"
    return f'<div id="crma-answers">{top}<div style="{grid}">{"".join(cells)}</div></div>'


def stop_file_of(run_root: Path) -> Path:
    """The flag that stops the answers of a run's "Try the adapters" (apart from the run's own stop flag)."""
    return run_root / "STOP_ANSWERS"

"""Text the page hands out: the CLI line and the Python client call that reproduce a run, the embed snippet, and the
events the `/ablate` API streams."""

from __future__ import annotations

import importlib.metadata
import pprint
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crma.ablation.engine.records import EvalRecord, Phase, StepRecord
from crma.ablation.jsonio import plain
from crma.ablation.output.run_folder import StoredRun
from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import config_to_values, field_spec


def cli_command(cfg: AblationConfig, *, out: str | None = None) -> str:
    """The `python -m crma ablate ...` line that reproduces `cfg` (only fields that differ from the defaults).

    An uploaded data file appears under its file name (the visitor has it under that name; the server path is not
    theirs to use).
    """
    default = config_to_values(AblationConfig())
    parts = ["python -m crma ablate"]
    for key, value in config_to_values(cfg).items():
        spec = field_spec(key)
        if value == default[key] or (key == "seed" and cfg.seeds):
            continue
        if key == "dataset" and value not in ("bundled", "alpaca"):
            value = Path(value).name
        if isinstance(value, bool):
            parts.append(spec.flag if value else "--no-" + spec.flag.removeprefix("--"))
            continue
        if value is None:
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        else:
            text = _number(value) if isinstance(value, float) else str(value)
        parts.append(f"{spec.flag} {shlex.quote(text)}")
    if out is not None:
        parts.append(f"--out {shlex.quote(out)}")
    return " \\\n    ".join(parts)


def _number(value: float) -> str:
    # `:g` is the short form of round values (1500.0 -> "1500") but keeps only 6 digits; repr is exact.
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def event_json(event: Phase | StepRecord | EvalRecord, *, run_id: str) -> dict[str, Any]:
    """One record or phase of a run as the `/ablate` API streams it: `{"type": "phase" | "record" | "eval", ...}`."""
    if isinstance(event, StepRecord):
        return plain({"type": "record", "run_id": run_id, **event.to_dict()})
    if isinstance(event, EvalRecord):
        return plain({"type": "eval", "run_id": run_id, **event.to_dict()})
    return {"type": "phase", "run_id": run_id, "message": event.message, "seed": event.seed}


def result_json(run: StoredRun, *, run_id: str) -> dict[str, Any]:
    """The last event of an `/ablate` stream: how the run ended, its summary and its files, read from its folder."""
    summary = run.summary or {}
    return plain(
        {
            "type": "result",
            "run_id": run_id,
            "status": run.status,
            "error": summary.get("error"),
            "records": len(run.records),
            "wall_s": summary.get("wall_s"),
            "summary": summary,
            "files": run.files,
            "notes": summary.get("notes") or [],
        }
    )


def _space_host(space_id: str) -> str:
    # Spaces are served at <owner>-<name>.hf.space, lower-cased, with '_' and '.' turned into '-'.
    return re.sub(r"[^a-z0-9-]", "-", space_id.lower().replace("/", "-")) + ".hf.space"


def embed_snippet(space_id: str | None) -> str:
    """HTML to embed the Space in a page: an `<iframe>` and the `<gradio-app>` web component.

    Args:
        space_id (`str | None`): `owner/name` (the `SPACE_ID` variable on a Space); None gives a placeholder.
    """
    placeholder = not (space_id and "/" in space_id)
    sid = "YOUR-NAME/crma-lab" if placeholder else space_id
    host = _space_host(sid)
    try:
        version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        version = "6.31.0"
    return (
        f"<!-- Option 1: an iframe (sign-in opens in a new tab when embedded) -->\n"
        f'<iframe src="https://{host}" title="CRMA Lab" width="100%" height="1200" frameborder="0" '
        f'allow="clipboard-write"></iframe>\n\n'
        f"<!-- Option 2: the Gradio web component (sizes itself to the app) -->\n"
        f'<script type="module" src="https://gradio.s3-us-west-2.amazonaws.com/{version}/gradio.js"></script>\n'
        f'<gradio-app src="https://{host}"></gradio-app>\n'
        # The note goes with the placeholder, whatever the reason for it (no SPACE_ID, or one that is not owner/name).
        + ("<!-- replace YOUR-NAME/crma-lab with the Space id -->\n" if placeholder else "")
    )


def api_payload(cfg: AblationConfig) -> dict[str, Any]:
    """The `/ablate` JSON object of `cfg`: the fields that differ from the defaults (model and steps always),
    nested CRMA / ZClip settings as objects; the Space's time cap is left to the Space."""
    default = config_to_values(AblationConfig())
    payload: dict[str, Any] = {}
    for key, value in config_to_values(cfg).items():
        if key == "max_wall_s" or (value == default[key] and key not in ("model", "steps")):
            continue
        if key == "seed" and cfg.seeds:
            continue
        if key == "dataset" and value not in ("bundled", "alpaca"):
            value = "upload"  # the file travels as the second argument
        parent, _, leaf = key.rpartition(".")
        (payload.setdefault(parent, {}) if parent else payload)[leaf] = value
    return payload


def app_url(headers: Mapping[str, str]) -> str | None:
    """The address a visitor reached the app at, from their request's headers (a proxy's `x-forwarded-*` first);
    None when there is no `host` header."""
    lower = {k.lower(): v for k, v in headers.items()}
    host = (lower.get("x-forwarded-host") or lower.get("host") or "").split(",")[0].strip()
    if not host or not re.fullmatch(r"[\w.\-\[\]:]+", host):
        return None
    proto = (lower.get("x-forwarded-proto") or "http").split(",")[0].strip()
    return f"{'https' if proto == 'https' else 'http'}://{host}"


def client_snippet(cfg: AblationConfig, space_id: str | None, *, url: str | None = None) -> str:
    """Python that runs `cfg` through the `/ablate` endpoint with gradio_client and streams its events.

    The settings are written as a Python literal (`True`, `None`), so the snippet runs as pasted.

    Args:
        cfg (`AblationConfig`): the run.
        space_id (`str | None`): `owner/name` on a Space (what `Client` takes there).
        url (`str | None`): else the address the visitor uses (`app_url`); else the local default.
    """
    sid = space_id or url or "http://127.0.0.1:7860"
    payload = api_payload(cfg)
    data_file = "None" if payload.get("dataset") != "upload" else 'handle_file("my_data.jsonl")'
    imports = "from gradio_client import Client" + (", handle_file" if data_file != "None" else "")
    return (
        f"{imports}\n\n"
        f"client = Client({sid!r})\n"
        f"settings = {pprint.pformat(payload, indent=4, width=100, sort_dicts=False)}\n"
        f'job = client.submit(settings, {data_file}, api_name="/ablate")\n'
        "for event, archive in job:  # a started event, one event per phase and step record, then the result\n"
        '    print(event["type"], event.get("arm"), event.get("step"), event.get("loss"))\n'
        'print(event["status"], archive)\n'
    )

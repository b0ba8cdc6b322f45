"""The endpoints gradio_client calls (and the page's preview and push, which are endpoints too).

`/ablate` streams a run from one JSON object of settings, `/follow` streams a run by its id (from `/ablate`'s first
event, after a lost connection), `/stop` ends a run at the next step, `/generate` has every arm of a finished run
answer a prompt, `/push` uploads a run with the visitor's own Hub sign-in, `/preview` shows a data slice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import gradio as gr

from crma.ablation.output.publish import PushError, push_results
from crma.ablation.output.run_folder import load_run
from crma.lab import estimates, form, launcher, runs, snippets, tryout
from crma.lab.live import watch
from crma.ui import errors, slot, space
from crma.ui.errors import guard


@guard
def preview(dataset: str, upload: str | None, start: float, rows: float) -> tuple[list[list[str]], str]:
    """The first rows of the selected slice, or the reason it cannot be used."""
    try:
        source = form.resolve_dataset(dataset, upload)
        table = form.preview_rows(source, start, rows)
    except ValueError as exc:
        return [], f"⚠️ {exc}"
    return table, f"The slice reads fine; its first {len(table)} rows:"


def _follow_events(folder: runs.RunFolder) -> Iterator[tuple[dict, str | None]]:
    """The API's stream of a run: one event per phase and record as the folder grows, then the result and the
    archive. The run does not depend on the stream: a client that goes away can `/follow` it again by its id."""
    for look in watch(folder.out_dir):
        for event in [look.phase] if look.phase is not None else []:
            yield snippets.event_json(event, run_id=folder.run_id), None
        for record in look.records:
            yield snippets.event_json(record, run_id=folder.run_id), None
    run = load_run(folder.out_dir)
    if errors.failed_without_results(run):
        raise errors.run_error(run)
    yield snippets.result_json(run, run_id=folder.run_id), str(runs.make_archive(run.folder))


def _settings_object(config: dict | str | None) -> dict:
    """`/ablate`'s settings as a dict: a JSON text is parsed, nothing is no settings; anything else is refused."""
    if isinstance(config, str):
        try:
            config = json.loads(config) if config.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"the config is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("the config is nested too deeply: send one JSON object of settings") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"the config must be a JSON object of settings; got {type(config).__name__}")
    return config


@guard
def ablate(config: dict | str | None, data_file: str | None) -> Iterator[tuple[dict, str | None]]:
    """API: run one ablation from a JSON object of settings (the CLI's fields) and stream its events.

    Yields `(event, archive)`: first `{"type": "started", "run_id", "config", "gpu_seconds"}`, then one
    `{"type": "record" | "eval", ...}` per step record and held-out evaluation, last `{"type": "result", "status",
    "summary", "files", ...}` with the path of the zip archive. The run trains on if the client goes away: stop it
    with `/stop`, or pick the stream up again with `/follow`, by its `run_id`. `data_file` is an uploaded
    .json/.jsonl/.csv used when `dataset` is "upload" (or absent).
    """
    settings = _settings_object(config)
    if data_file and settings.get("dataset", "upload") != "upload":
        raise ValueError(
            f"a data_file was sent but Data is {settings['dataset']!r}: set `dataset` to 'upload' (or leave "
            "it out) to train on the file"
        )
    cfg = form.config_from_form(settings, upload=data_file)
    data_name = slot.data_name(cfg, data_file)
    for _ in slot.wait_for_slot():
        yield {"type": "phase", "run_id": None, "message": slot.WAITING_FOR_SLOT, "seed": None}, None
    folder = slot.start(cfg, data_name)
    shown = dataclasses.replace(cfg, dataset=data_name) if data_name else cfg  # the file's name, not its server path
    started = {"type": "started", "run_id": folder.run_id, "config": shown.to_dict()}
    yield {**started, "gpu_seconds": estimates.estimate_gpu_seconds(cfg)}, None
    yield from _follow_events(folder)


@guard
def follow_run(run_id: str) -> Iterator[tuple[dict, str | None]]:
    """API: the events of run `run_id` (from `/ablate`'s first event) from its first record on, as `/ablate`
    streams them; a run that ended gives its records and its result at once."""
    folder = runs.get_run(run_id)
    if folder is None or load_run(folder.out_dir) is None:
        raise ValueError(f"no run with id {run_id!r} (runs are kept for 6 hours)")
    yield from _follow_events(folder)


@guard
def generate(run_id: str, prompt: str, settings: dict | None = None) -> Iterator[dict]:
    """API: every arm of finished run `run_id`, and the base model, answer `prompt`; streams `{"arm", "text",
    "done", ...}` after each token (the last event of an arm has its `tokens`, `seconds` and `ended`). `settings`:
    `max_new_tokens`, `temperature`, `top_p`, `seed`, `arms` (a list of labels; default every arm), `input`."""
    settings = settings if isinstance(settings, dict) else {}
    folder = runs.get_run(run_id)
    run = load_run(folder.out_dir) if folder is not None else None
    if run is None or not run.complete:
        raise ValueError(f"no finished run with id {run_id!r} (runs are kept for 6 hours)")
    instruction = tryout.check_prompt(prompt)
    decoding = tryout.decoding(
        settings.get("max_new_tokens", 64), settings.get("temperature", 0), settings.get("top_p", 1),
        settings.get("seed", 0),
    )  # fmt: skip
    arms = settings.get("arms")
    for _ in slot.wait_for_slot():
        yield {"arm": None, "text": "", "done": False, "waiting": True}
    try:
        yield from space.ANSWERS_CALL(
            str(run.folder), instruction, str(settings.get("input", "")), decoding.to_json(), arms,
            str(tryout.stop_file_of(folder.root)),
        )  # fmt: skip
    finally:
        launcher.RUN_SLOT.release()


def stop(run_id: str) -> str:
    """API: stop the run `run_id` (from `/ablate`'s first event) at its next step; its partial results are kept."""
    if runs.request_stop(run_id):
        return f"stopping run {run_id} after the current step"
    return f"no running run with id {run_id!r} (it may have ended already)"


def push(run_id: str | None, repo_id: str, private: bool, oauth_token: gr.OAuthToken | None) -> str:
    """Push the session's results to a Hub model repo with the visitor's own token (never logged or stored)."""
    if oauth_token is None or not getattr(oauth_token, "token", None):
        where = "the button above" if space.ON_SPACE else "available when the app runs as a Hugging Face Space"
        raise gr.Error(f"Sign in with Hugging Face first ({where}): the push uses your own account.")
    folder = runs.get_run(run_id)
    if folder is None or not folder.finished():
        raise gr.Error("There are no finished results to push yet: run (or stop) an ablation first.")
    try:
        url = push_results(folder.out_dir, repo_id, token=oauth_token.token, private=bool(private))
    except PushError as exc:
        raise gr.Error(f"{exc} (your results are still available to download)") from None
    except Exception as exc:  # never log the traceback here: its frames hold the token
        errors.logger.error("push failed unexpectedly: %s", type(exc).__name__)
        raise gr.Error(errors.GENERIC_ERROR) from None
    return f"Pushed to [{url}]({url})."

"""What a visitor (or an API client) sees of a failure: its own message when it is theirs to fix, a generic one
otherwise, with the details in the server log."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from crma.ablation.output.publish import PushError
from crma.ablation.output.run_folder import StoredRun

logger = logging.getLogger("crma.app")

GENERIC_ERROR = "Something went wrong on our side (the details are in the server log). Your results so far are kept."


def _convert(exc: Exception, name: str) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, (ValueError, PushError)):
        return gr.Error(str(exc))
    logger.exception("unexpected error in %s", name)
    return gr.Error(GENERIC_ERROR)


def guard(fn: Callable) -> Callable:
    """Expected errors (bad input, failed push) become `gr.Error(message)`; anything else is logged with its
    traceback and shown as a generic error. The app keeps serving either way."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _convert(exc, fn.__name__) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _convert(exc, fn.__name__) from None

    return wrapper


def failed_without_results(run: StoredRun | None) -> bool:
    """Whether a run that ended left nothing to show: no folder to read, or a failure before its first record."""
    return run is None or (run.status == "failed" and not run.records)


def run_error(run: StoredRun | None) -> gr.Error:
    """The error for a run that left nothing to show: the run's own reason when it wrote one."""
    return gr.Error(((run.summary or {}).get("error") if run is not None else None) or GENERIC_ERROR)

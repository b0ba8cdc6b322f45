"""Where a visitor's run trains, and who makes sure it ends: the preflight, the one run slot, and a watcher that
completes the run folder whatever happens to the process that trains it.

A run trains in a process of its own — a child the app starts (`run_in_child`) or, on ZeroGPU, the worker that
`spaces.GPU` forks (`gpu_call`) — which runs `visitor_run`: the same `run_to_folder` as the CLI, writing the same run
folder. Nothing is sent back; pages follow the folder (`live.follow`). The watcher thread holds the slot until the
folder is complete: the engine stops itself at the first step boundary past the time cap or a Stop; a phase that
never reaches one is killed `grace_s` later; a process that dies (killed, out of memory, ZeroGPU's duration) leaves a
staging folder, and the watcher completes it with `finish_run_folder` — marked `stopped` (cut off) or `failed`, its
finished steps intact.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from crma.ablation.output.run_folder import finish_run_folder, locate, read_progress
from crma.ablation.spec.config import AblationConfig

from . import estimates, form
from .runs import VISITOR_HUB, RunFolder, StopSignal

logger = logging.getLogger(__name__)
# One run trains at a time on this process's device. Gradio's queue serialises the handlers; this also covers a run
# whose page went away (its watcher holds the slot until the run ends, at its time cap at the latest).
RUN_SLOT = threading.BoundedSemaphore(1)
# The server forks each run's child from a clean interpreter that has torch and the engine imported already: no
# per-run import cost (spawn) and no fork of the app's threads (fork).
_PRELOAD = ["torch", "crma.ablation.engine.loop", "crma.ablation.output.run_folder", "crma.lab.launcher"]


def preflight(cfg: AblationConfig, data_name: str | None, *, zero_gpu: bool) -> AblationConfig:
    """Everything that can fail before a GPU is asked for, in the cheapest order: the data slice, the model id (no
    token, no local folder), one step's memory against the device; on ZeroGPU, the run's wall cap inside its lease.

    Raises:
        `ValueError`: one line for the visitor (`DataError`, `ModelLoadError`).
    """
    form.check_data(cfg, data_name)
    # On ZeroGPU this process has no GPU before the lease: no device checks here.
    model_config = form.check_model(cfg, device_checks=not zero_gpu)
    form.check_memory(cfg, model_config=model_config, zero_gpu=zero_gpu)
    if zero_gpu:
        cfg = estimates.fit_wall_cap(cfg, estimates.estimate_gpu_seconds(cfg))
    return cfg


def visitor_run(cfg_json: str, out_dir: str, stop_file: str, data_name: str | None = None) -> None:
    """The whole job of a run's process: train into the run folder (Hub access: `VISITOR_HUB`). Plain, picklable
    arguments, so it runs in a child process or in ZeroGPU's forked worker alike."""
    from crma.ablation.output.run_folder import run_to_folder

    cfg = AblationConfig.from_json(cfg_json)
    run_to_folder(cfg, out_dir, stop=StopSignal(stop_file), data_name=data_name, **VISITOR_HUB)


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _without_main_script() -> Iterator[None]:
    """Start children without the parent's main script: multiprocessing re-imports it in every child (where pickled
    functions might live), but a run's child needs nothing of it — its target lives here — and the app's script
    builds a whole page at import."""
    main = sys.modules.get("__main__")
    path = None
    if main is not None and getattr(main, "__spec__", None) is None:
        path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


def _child(target: str, *args: Any) -> None:
    module, _, name = target.rpartition(".")
    getattr(importlib.import_module(module), name)(*args)


class Launch:
    """One visitor run, started and watched: `start()` returns at once, the run's folder is complete once `done`.

    Args:
        cfg (`AblationConfig`): the run (its `max_wall_s` is the cap; None means none).
        folder (`RunFolder`): where it writes.
        data_name (`str | None`): what the run calls an uploaded file (its own name).
        slot (`threading.Semaphore | None`): released once the folder is complete (the caller acquired it).
        gpu_call (`Callable | None`): on ZeroGPU, `spaces.GPU(...)(visitor_run)`; None: a child process of this app.
        target (`str`): `module.function` the child runs (tests put a stand-in engine here).
        grace_s (`float`): how long past the wall cap, or past a stop, a phase may run before the child is killed.
        poll_s (`float`): how often the watcher looks at the child and the clock.
    """

    def __init__(
        self,
        cfg: AblationConfig,
        folder: RunFolder,
        *,
        data_name: str | None = None,
        slot: threading.Semaphore | None = None,
        gpu_call: Callable[..., Any] | None = None,
        target: str = f"{__name__}.visitor_run",
        grace_s: float = 30.0,
        poll_s: float = 0.25,
    ):
        self.cfg, self.folder, self.data_name, self.slot = cfg, folder, data_name, slot
        self.gpu_call, self.target, self.grace_s, self.poll_s = gpu_call, target, grace_s, poll_s
        self.ending: tuple[str, str] | None = None  # (status, reason) the watcher completed the folder with
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"crma-run-{folder.run_id[:8]}", daemon=True)

    @property
    def done(self) -> bool:
        """The run ended and its folder is complete."""
        return self._done.is_set()

    def start(self) -> Launch:
        """Start the run's process and its watcher; returns at once."""
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True when it did."""
        return self._done.wait(timeout)

    def _args(self) -> tuple[Any, ...]:
        return (self.cfg.to_json(), str(self.folder.out_dir), str(self.folder.stop_file), self.data_name)

    def _watch(self) -> None:
        try:
            try:
                ending = self._run_on_gpu() if self.gpu_call is not None else self._run_in_child()
            except Exception as exc:  # the process could not start, or watching it broke: still end the folder
                logger.exception("the run's process could not be started or watched")
                ending = ("failed", f"the training process could not start ({type(exc).__name__}: {exc})")
            if locate(self.folder.out_dir) != self.folder.out_dir:  # the process is gone, its folder incomplete
                self.ending = ending or ("failed", "the training process ended without completing its run folder")
                finish_run_folder(self.folder.out_dir, self.cfg, status=self.ending[0], error=self.ending[1])
        finally:
            self._done.set()
            if self.slot is not None:
                self.slot.release()

    def _run_on_gpu(self) -> tuple[str, str] | None:
        """ZeroGPU: the call blocks while its worker trains and raises when ZeroGPU ends it (its duration is over)."""
        try:
            self.gpu_call(*self._args())
        except Exception as exc:  # the worker is gone: what it wrote is all there is
            return "stopped", f"the GPU worker was ended before the run finished ({type(exc).__name__}: {exc})"
        return None

    def _phase(self) -> str:
        folder = locate(self.folder.out_dir)
        return (read_progress(folder).get("phase") if folder is not None else None) or "starting"

    def _run_in_child(self) -> tuple[str, str] | None:
        ctx = _context()
        child = ctx.Process(target=_child, args=(self.target, *self._args()), name="crma-run", daemon=True)
        started = time.monotonic()
        with _without_main_script():
            child.start()
        stop, stop_seen, cap = StopSignal(self.folder.stop_file), None, self.cfg.max_wall_s
        try:
            while True:
                child.join(self.poll_s)
                if not child.is_alive():
                    code = child.exitcode
                    why = f"the training process ended unexpectedly (exit code {code}; out of memory?)"
                    return None if code == 0 else ("failed", why)
                now = time.monotonic()
                if stop_seen is None and stop.is_set():
                    stop_seen = now
                over_cap = cap is not None and now - started > cap + self.grace_s
                over_stop = stop_seen is not None and now - stop_seen > self.grace_s
                if over_cap or over_stop:
                    phase = self._phase()
                    child.kill()
                    child.join()
                    why = f"time cap of {cap:.0f} s" if over_cap else "stop request"
                    reason = f"cut off {self.grace_s:.0f} s after the {why}: '{phase}' did not reach a step boundary"
                    return "stopped", reason
        finally:
            if child.is_alive():  # pragma: no cover - only an exception in this loop gets here
                child.kill()
                child.join()


def launch(
    cfg: AblationConfig,
    folder: RunFolder,
    *,
    data_name: str | None,
    gpu_call: Callable[..., Any] | None = None,
    slot: threading.Semaphore = RUN_SLOT,
) -> Launch:
    """Start `cfg` into `folder` (the caller holds `slot`; the launch gives it back when the run ends)."""
    return Launch(cfg, folder, data_name=data_name, slot=slot, gpu_call=gpu_call).start()

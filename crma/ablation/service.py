"""Everything the Gradio Space needs besides the widgets: form parsing, caps, estimates, live-view throttling, run
folders, archives and snippets. No gradio import here, so all of it is unit-tested without a server.

The app calls, per run:
    cfg = config_from_form(**form_values, upload=uploaded_path)      # the one place the UI builds configs
    check_data(cfg)                                                  # fail fast, before any GPU is requested
    space = new_run()                                                # a private folder per run id
    view = LiveView(cfg, device=device_label(cfg))
    for event in train_events(cfg, str(space.out_dir), str(space.stop_file)):
        if view.update(event): ... view.figures(), view.progress_html() ...
    make_archive(space.out_dir)
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import typing
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config import ARM_SPECS, AblationConfig, Phase, RunResult, StepRecord

# Caps of a public Space: one visitor's run must not hold the shared GPU (or the disk) for long.
SPACE_CAPS: Mapping[str, int | float] = MappingProxyType(
    {
        "steps": 1000,
        "rows": 5000,
        "seq_len": 2048,
        "batch_size": 32,
        "seeds": 5,  # number of seeds in one run
        "arms": 4,  # number of arms in one run (A/A copies included)
        "lora_r": 256,
        "crma_streams": 16,
        "crma_rank": 64,
        "max_wall_s": 1500,  # the longest GPU duration `estimate_gpu_seconds` asks for
    }
)
GPU_SECONDS_RANGE = (60, 1500)
DATASET_CHOICES = ("alpaca", "bundled", "upload")
PREVIEW_CELL_CHARS = 300
RUNS_ENV = "CRMA_RUNS_DIR"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_SIZE_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([bBmM])(?![A-Za-z])")


# --------------------------------------------------------------------------------------------------------------------
# Defaults


def default_config(has_gpu: bool) -> tuple[AblationConfig, str]:
    """The page's starting config and a sentence saying which setting it is and why.

    Args:
        has_gpu (`bool`): a CUDA GPU (or ZeroGPU) is available to the runs.

    Returns:
        `(AblationConfig, str)`: on a GPU the author's setting (TinyLlama-1.1B on 200 Alpaca rows, seed 42, 100
        steps, batch 4 x 256 tokens); on CPU a setting that finishes in a few minutes (SmolLM2-135M on 200 bundled
        rows, seed 42, 30 steps, batch 2 x 128 tokens), and the note says so.
    """
    if has_gpu:
        cfg = AblationConfig(
            model="tinyllama-1.1b", dataset="alpaca", rows=200, seed=42, steps=100, batch_size=4, seq_len=256
        )
        note = (
            f"GPU found: the defaults reproduce the author's setting (TinyLlama-1.1B, 200 Alpaca rows, seed 42, "
            f"{cfg.steps} steps, batch {cfg.batch_size} x {cfg.seq_len} tokens), about "
            f"{_minutes(estimate_run_seconds(cfg, gpu=True))} for two arms."
        )
        return cfg, note
    cfg = AblationConfig(
        model="smollm2-135m", dataset="bundled", rows=200, seed=42, steps=30, batch_size=2, seq_len=128
    )
    note = (
        f"No GPU here, so the defaults are a CPU setting that finishes in about "
        f"{_minutes(estimate_run_seconds(cfg, gpu=False))}: SmolLM2-135M on 200 bundled rows (offline), seed 42, "
        f"{cfg.steps} steps, batch {cfg.batch_size} x {cfg.seq_len} tokens. The author's setting (TinyLlama-1.1B, "
        "200 Alpaca rows, 100 steps, batch 4 x 256) needs a GPU."
    )
    return cfg, note


def on_zero_gpu() -> bool:
    """This process is a ZeroGPU Space (a GPU is attached per `@spaces.GPU` call, in a forked worker)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_available() -> bool:
    """A CUDA GPU is usable here, or this is a ZeroGPU Space."""
    if on_zero_gpu():
        return True
    import torch

    return torch.cuda.is_available()


def device_label(cfg: AblationConfig) -> str:
    """Short name of the device a run of `cfg` trains on, for the progress line."""
    if on_zero_gpu() and cfg.device != "cpu":
        return "ZeroGPU"
    import torch

    if cfg.device != "cpu" and torch.cuda.is_available():
        try:
            return f"GPU {torch.cuda.get_device_name(0)}"
        except (RuntimeError, AssertionError):  # the name needs a CUDA context some hosts only grant per call
            return "GPU"
    return f"CPU ({os.cpu_count() or 1} cores)"


# --------------------------------------------------------------------------------------------------------------------
# Form -> config


def _parse_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ValueError(f"`{name}` is empty; enter a whole number")
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a whole number; got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"`{name}` must be a whole number; got {value!r}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"`{name}` must be a whole number; got {value!r}")
        return int(value)
    raise ValueError(f"`{name}` must be a whole number; got {value!r}")


def _parse_float(name: str, value: Any, *, optional: bool = False) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ValueError(f"`{name}` is empty; enter a number such as 2e-4")
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number; got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"`{name}` must be a number such as 2e-4; got {value!r}") from None
    else:
        raise ValueError(f"`{name}` must be a number; got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}")
    return number


def _parse_str_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"`{name}` must be a list of names or a comma-separated text; got {value!r}")


def _parse_seeds(value: Any) -> list[int]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    parts = value.replace(";", ",").split(",") if isinstance(value, str) else value
    if isinstance(parts, (int, float)) and not isinstance(parts, bool):
        parts = [parts]
    if not isinstance(parts, (list, tuple)):
        raise ValueError(f"`seeds` must be whole numbers separated by commas, e.g. 1,2,3; got {value!r}")
    seeds = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        try:
            seed = _parse_int("seeds", part)
        except ValueError:
            raise ValueError(f"`seeds` must be whole numbers separated by commas, e.g. 1,2,3; got {value!r}") from None
        if not 0 <= seed < 2**32:
            raise ValueError(f"`seeds` values must be in [0, 2^32); got {seed}")
        seeds.append(seed)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` lists a seed twice; got {value!r}")
    return seeds


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"`{name}` must be true or false; got {value!r}")


def resolve_dataset(dataset: Any, upload: str | os.PathLike[str] | None) -> str:
    """The engine's data source for the form's choice: `alpaca`, `bundled`, or the uploaded file's path.

    A visitor never names a server path: `upload` comes from the app's file widget, so arbitrary paths (which the data
    loader would happily read) cannot be reached through the form or the API.
    """
    choice = dataset.strip().lower() if isinstance(dataset, str) else dataset
    if choice in ("alpaca", "bundled"):
        return choice
    if choice == "upload" or (choice is None and upload):
        if not upload:
            raise ValueError("`dataset` is 'upload' but no file was uploaded: choose a .json, .jsonl or .csv file")
        return str(upload)
    raise ValueError(f"`dataset` must be one of {list(DATASET_CHOICES)} (upload: send the file); got {dataset!r}")


def config_from_form(
    *, upload: str | os.PathLike[str] | None = None, caps: Mapping[str, int | float] | None = SPACE_CAPS, **form: Any
) -> AblationConfig:
    """Build and validate an `AblationConfig` from UI or API values: the one place where the app makes configs.

    Text boxes give strings ("2e-4", "1,2,3"), number boxes floats, checkbox groups lists; JSON clients give proper
    types. Every field is optional (the dataclass default applies). `seeds` takes one seed or several ("1,2,3"); one
    seed sets `seed`. `spike_at` empty or 0 means no stress step. `dataset` is `alpaca`, `bundled` or `upload`.

    Args:
        upload (`str | PathLike | None`): path of the uploaded data file (used when `dataset` is `upload`).
        caps (`Mapping | None`): upper bounds (`SPACE_CAPS` by default; None for no caps). `max_wall_s` is also
            filled in from the cap when the form leaves it empty.
        **form: `AblationConfig` field names with raw values.

    Returns:
        `AblationConfig`: a valid config.

    Raises:
        `ValueError`: a message naming the field, for unknown fields, non-numeric or out-of-range values, values over
        a cap, and a model that looks like a local path.
    """
    hints = typing.get_type_hints(AblationConfig)
    known = {f.name for f in fields(AblationConfig)}
    unknown = sorted(set(form) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
    values: dict[str, Any] = {}
    for name, raw in form.items():
        hint = hints[name]
        if name == "seeds":
            seeds = _parse_seeds(raw)
            if len(seeds) == 1:
                values["seed"], values["seeds"] = seeds[0], None
            elif seeds:
                values["seeds"] = seeds  # `seed` is unused then; left at its default, as the CLI does
            else:
                values["seeds"] = None
        elif name == "seed" and "seeds" in form and _parse_seeds(form["seeds"]):
            continue  # the seeds box wins over a stray `seed`
        elif name == "dataset":
            values[name] = resolve_dataset(raw, upload)
        elif name == "spike_at":
            spike = _parse_int(name, raw, optional=True)
            values[name] = spike or None  # 0 in a number box means "off"
        elif hint is int:
            values[name] = _parse_int(name, raw)
        elif hint == int | None:
            values[name] = _parse_int(name, raw, optional=True)
        elif hint is float:
            values[name] = _parse_float(name, raw)
        elif hint == float | None:
            values[name] = _parse_float(name, raw, optional=True)
        elif hint is bool:
            values[name] = _parse_bool(name, raw)
        elif hint == list[str]:
            values[name] = _parse_str_list(name, raw)
        elif isinstance(raw, str):
            values[name] = raw.strip()
        else:
            raise ValueError(f"`{name}` must be text; got {raw!r}")
    if "dataset" not in values and upload:
        values["dataset"] = resolve_dataset("upload", upload)
    _check_names(values)
    if caps is not None and "max_wall_s" in caps:
        wall = values.get("max_wall_s")
        values["max_wall_s"] = float(caps["max_wall_s"]) if wall is None else wall
    cfg = AblationConfig(**values)
    if caps is not None:
        check_caps(cfg, caps)
    from crma import CRMAConfig

    if any(ARM_SPECS[arm].crma for arm in cfg.arms):
        try:
            CRMAConfig(n_streams=cfg.crma_streams, rank=cfg.crma_rank)
        except ValueError as exc:
            # CRMAConfig names its own fields; the form calls them crma_streams / crma_rank.
            message = str(exc).replace("`n_streams`", "`crma_streams`").replace("`rank`", "`crma_rank`")
            raise ValueError(message) from None
    return cfg


def _check_names(values: dict[str, Any]) -> None:
    model = values.get("model")
    if model is not None:
        if not model:
            raise ValueError("`model` is empty: pick a preset or type a Hub id like 'org/name'")
        if not _HUB_ID.match(model) or ".." in model:
            raise ValueError(f"`model` must be a preset or a Hub id like 'org/name' (no local paths); got {model!r}")
    if "arms" in values and not values["arms"]:
        raise ValueError("`arms` is empty: tick at least one arm (e.g. lora and lora+crma)")
    for target in values.get("lora_targets", ["q_proj"]):
        if not _MODULE_NAME.match(target):
            raise ValueError(f"`lora_targets` must be module names such as q_proj,v_proj; got {target!r}")
    if values.get("lora_targets") == []:
        raise ValueError("`lora_targets` is empty: name at least one module, e.g. q_proj,v_proj")


def check_caps(cfg: AblationConfig, caps: Mapping[str, int | float] = SPACE_CAPS) -> None:
    """Raise `ValueError` naming the first field of `cfg` over its cap (`seeds` and `arms` count entries)."""
    for name, cap in caps.items():
        if name == "seeds":
            value = len(cfg.seed_list)
        elif name == "arms":
            value = len(cfg.arms)
        else:
            value = getattr(cfg, name)
        if value is not None and value > cap:
            shown = f"{value} of them" if name in ("seeds", "arms") else repr(value)
            raise ValueError(f"`{name}` must be at most {cap:g} on this Space; got {shown}")


def cli_command(cfg: AblationConfig, *, out: str = "runs/latest") -> str:
    """The `python -m crma ablate ...` line that reproduces `cfg` (only fields that differ from the defaults)."""
    default = AblationConfig()
    parts = ["python -m crma ablate"]
    for f in fields(AblationConfig):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if value == base or (f.name == "seed" and cfg.seeds):
            continue
        if f.name == "dataset" and value not in DATASET_CHOICES:
            value = Path(value).name  # an uploaded file: the visitor has it under this name
        if f.name == "save_adapters":
            parts.append("--no-save-adapters")
            continue
        if value is None:
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"--{f.name.replace('_', '-')} {_shell_quote(text)}")
    parts.append(f"--out {out}")
    return " \\\n    ".join(parts)


def _shell_quote(text: str) -> str:
    return text if re.fullmatch(r"[\w.,/+:=@-]+", text) else "'" + text.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------------------------------
# Estimates


def _model_size(model: str) -> tuple[float, bool]:
    """(parameters, loaded in 4-bit) of a preset, or read from a Hub id such as `Qwen2.5-7B`; 1.5B when unknown."""
    from .models import PRESETS

    preset = PRESETS.get(model)
    if preset is not None:
        return float(preset.approx_params), preset.quantize_4bit
    sizes = [float(n) * (1e9 if unit in "bB" else 1e6) for n, unit in _SIZE_IN_NAME.findall(model.split("/")[-1])]
    return (max(sizes) if sizes else 1.5e9), False


def estimate_step_seconds(cfg: AblationConfig, *, gpu: bool) -> float:
    """Rough wall time of one optimizer step of one arm (forward, backward, clip, update)."""
    params, four_bit = _model_size(cfg.model)
    tokens = cfg.batch_size * cfg.seq_len
    if gpu:
        # ~4 flops per parameter per token for a LoRA step (no weight grads of the frozen base) at ~50 TFLOP/s
        # sustained in bf16 on a ZeroGPU slice, plus per-layer launch and Python overhead; nf4 dequant ~doubles it.
        seconds = 0.08 + 4 * params * tokens / 5e13
        return seconds * (2.0 if four_bit else 1.0)
    # Measured on 2 CPU cores: SmolLM2-135M at batch 2 x 64 ~0.85 s, batch 4 x 128 ~3.7 s (docs/machine-notes.md).
    return 0.02 + 5e-11 * params * tokens


def estimate_run_seconds(cfg: AblationConfig, *, gpu: bool) -> float:
    """Rough wall time of a whole run: load, per-seed set-up, the lockstep steps, saving and the report."""
    params, _ = _model_size(cfg.model)
    load = 10 + 20 * params / 1e9  # download + load, ~20 s per billion parameters
    setup = 2 + (3 if gpu else 15) * params / 1e9  # PiSSA's SVD of every target matrix, once per seed
    steps = cfg.steps * len(cfg.arms) * estimate_step_seconds(cfg, gpu=gpu)
    finish = 15 + 3 * len(cfg.arms)  # adapters, report.html and the PNG charts (a headless browser starts)
    return load + len(cfg.seed_list) * (setup + steps) + finish


def estimate_gpu_seconds(cfg: AblationConfig) -> int:
    """GPU seconds to request for `cfg` on ZeroGPU (`@spaces.GPU(duration=...)`): the run estimate with a 25 %
    margin, clamped to `GPU_SECONDS_RANGE` (60 to 1500 s)."""
    low, high = GPU_SECONDS_RANGE
    return int(min(high, max(low, math.ceil(1.25 * estimate_run_seconds(cfg, gpu=True)))))


def fit_wall_cap(cfg: AblationConfig, gpu_seconds: float) -> AblationConfig:
    """`cfg` with `max_wall_s` inside the GPU lease, leaving time to save: ZeroGPU kills a call that overruns, and a
    killed run would lose every file, whereas a capped run stops cleanly with partial results."""
    reserve = 20 + 5 * len(cfg.arms)
    cap = max(30.0, gpu_seconds - reserve)
    return replace(cfg, max_wall_s=min(cfg.max_wall_s or cap, cap))


def _minutes(seconds: float) -> str:
    return f"{max(1, round(seconds / 60))} min"


# --------------------------------------------------------------------------------------------------------------------
# Data preview and preflight


def check_model(cfg: AblationConfig, *, device_checks: bool = True) -> None:
    """Resolve the run's model without loading weights, so an unknown, gated, remote-code or too large model fails
    before a GPU is requested (`ModelLoadError`); `device_checks=False` where the GPU only comes with the lease."""
    from .models import check_model as check

    check(cfg.model, device=cfg.device, dtype=cfg.dtype, device_checks=device_checks)


def check_data(cfg: AblationConfig) -> None:
    """Read the run's data slice now, so a bad file or slice fails before a GPU is requested (`DataError`)."""
    from .data import DataError, load_instruction_rows

    try:
        load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows)
    except DataError as exc:
        raise DataError(_hide_dir(str(exc), cfg.dataset)) from None


def _hide_dir(message: str, source: str) -> str:
    # An uploaded file lives in a server temp folder: name the file, not where the server keeps it.
    if source not in DATASET_CHOICES and os.sep in source:
        return message.replace(source, Path(source).name)
    return message


def preview_rows(
    source: str, start: Any, rows: Any, limit: int = 20, *, caps: Mapping[str, int | float] | None = SPACE_CAPS
) -> list[list[str]]:
    """The first `limit` rows of the selected slice as table rows `[row, instruction, input, output]`.

    The whole slice is validated, so a slice past the end or a bad row shows up here, before a run.

    Args:
        source (`str`): `alpaca`, `bundled` or a path to an uploaded file.
        start, rows: the form's values (numbers or numeric strings).
        limit (`int`): rows shown.
        caps (`Mapping | None`): the same caps as `config_from_form` (`rows`).

    Raises:
        `ValueError`: (`DataError` for data problems) with the message to show.
    """
    from .data import DataError, load_instruction_rows

    first = _parse_int("start", start)
    count = _parse_int("rows", rows)
    if caps is not None and "rows" in caps and count > caps["rows"]:
        raise ValueError(f"`rows` must be at most {caps['rows']:g} on this Space; got {count}")
    try:
        data = load_instruction_rows(source, start=first, rows=count)
    except DataError as exc:
        raise DataError(_hide_dir(str(exc), source)) from None
    return [
        [str(first + i), *(_clip(row[c]) for c in ("instruction", "input", "output"))]
        for i, row in enumerate(data[:limit])
    ]


def _clip(text: str) -> str:
    return text if len(text) <= PREVIEW_CELL_CHARS else text[: PREVIEW_CELL_CHARS - 1] + "…"


# --------------------------------------------------------------------------------------------------------------------
# Run folders and the stop signal


class StopSignal(threading.Event):
    """The engine's stop event, also set by a flag file: ZeroGPU runs the engine in a forked worker that cannot see
    an event set in the app's process, but both see the file system."""

    def __init__(self, flag_file: str | os.PathLike[str]):
        super().__init__()
        self.flag_file = Path(flag_file)

    def set(self) -> None:
        super().set()
        self.flag_file.parent.mkdir(parents=True, exist_ok=True)
        self.flag_file.touch()

    def is_set(self) -> bool:
        return super().is_set() or self.flag_file.exists()


@dataclass(frozen=True)
class RunSpace:
    """One run's private folder `root/<run_id>/`: results in `out_dir`, the stop flag next to them.

    Args:
        run_id (`str`): 32 hex digits (uuid4); unguessable, so it is also the key to stop or push the run.
        root (`Path`): `runs_root()/<run_id>`.
    """

    run_id: str
    root: Path

    @property
    def out_dir(self) -> Path:
        """Where the engine writes (named so the archive unpacks into a telling folder)."""
        return self.root / f"crma-{self.run_id[:8]}"

    @property
    def stop_file(self) -> Path:
        return self.root / "STOP"

    @property
    def archive(self) -> Path:
        return self.root / f"{self.out_dir.name}.zip"

    def finished(self) -> bool:
        """The engine wrote its summary (the run ended: finished, stopped or failed after steps)."""
        return (self.out_dir / "summary.json").is_file()


def runs_root() -> Path:
    """Parent of every run folder: `$CRMA_RUNS_DIR`, else `<tmp>/crma-lab-runs` (Gradio may serve files from tmp)."""
    return Path(os.environ.get(RUNS_ENV) or Path(tempfile.gettempdir()) / "crma-lab-runs")


def new_run(
    root: str | os.PathLike[str] | None = None, *, max_age_s: float = 6 * 3600, max_runs: int = 40
) -> RunSpace:
    """Create a fresh run folder under `root` (after removing old ones, so disk use stays bounded)."""
    base = Path(root) if root is not None else runs_root()
    base.mkdir(parents=True, exist_ok=True)
    cleanup_runs(base, max_age_s=max_age_s, max_runs=max_runs - 1)
    run_id = uuid.uuid4().hex
    space = RunSpace(run_id, base / run_id)
    space.root.mkdir()
    return space


def get_run(run_id: Any, root: str | os.PathLike[str] | None = None) -> RunSpace | None:
    """The run folder of `run_id`, or None when the id is malformed (never a path) or the folder is gone."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        return None
    space = RunSpace(run_id, (Path(root) if root is not None else runs_root()) / run_id)
    return space if space.root.is_dir() else None


def request_stop(run_id: Any, root: str | os.PathLike[str] | None = None) -> bool:
    """Ask the run to stop at its next step boundary; False when there is no such run or it already ended."""
    space = get_run(run_id, root)
    if space is None or space.finished():
        return False
    StopSignal(space.stop_file).set()
    return True


def cleanup_runs(
    root: str | os.PathLike[str],
    *,
    max_age_s: float = 6 * 3600,
    max_runs: int = 40,
    keep: tuple[str, ...] = (),
    now: float | None = None,
) -> list[str]:
    """Remove run folders older than `max_age_s` (by last change), then the oldest beyond `max_runs`.

    Returns:
        `list[str]`: the removed run ids.
    """
    base = Path(root)
    if not base.is_dir():
        return []
    now = time.time() if now is None else now
    runs = []
    for path in base.iterdir():
        if path.is_dir() and _RUN_ID.match(path.name):
            try:
                runs.append((_last_change(path), path))
            except FileNotFoundError:  # removed meanwhile by another visitor's clean-up
                continue
    runs.sort()
    left, removed = len(runs), []
    for changed, path in runs:
        if path.name in keep:
            continue
        if now - changed > max_age_s or left > max(max_runs, 0):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            left -= 1
    return removed


def _last_change(path: Path) -> float:
    # The newest mtime inside: a long run keeps touching metrics.jsonl, so it never looks old while it trains.
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])


def train_events(cfg: AblationConfig, out_dir: str, stop_file: str) -> Iterator[Phase | StepRecord | RunResult]:
    """The engine's events for one run. Plain, picklable arguments: on ZeroGPU this generator runs in a forked
    worker (the app wraps it in `spaces.GPU`) and its events are pickled back to the app's process."""
    from .engine import run_ablation

    yield from run_ablation(cfg, out_dir=out_dir, stop=StopSignal(stop_file))


def make_archive(out_dir: str | os.PathLike[str]) -> Path:
    """Zip everything in `out_dir` (config, metrics, summaries, report, PNGs, adapters) into `<out_dir>.zip` next to
    it, every entry under the folder's name; written to a temp name first, so a download never sees half a file."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    target = folder.parent / f"{folder.name}.zip"
    partial = target.with_suffix(".zip.part")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    partial.replace(target)
    return target


# --------------------------------------------------------------------------------------------------------------------
# Live view


class LiveView:
    """Turns engine events into what the page shows, and decides when the page should redraw.

    `update(event)` is O(1) per event (counters only); figures are built from the records only when a redraw is due:
    at most one per `min_interval_s` (and never more often than three times the last drawing cost, so drawing cannot
    eat more than a quarter of a fast run's time), always on a `Phase` and on the final `RunResult`.

    Args:
        cfg (`AblationConfig`): the run's config.
        device (`str`): device label for the progress line.
        min_interval_s (`float`): the throttle.
        clock (`Callable[[], float]`): monotonic clock (injected in tests).
        smoothing (`float`): EMA weight for the charts (the raw line stays faint behind).
        log_scale (`bool`): logarithmic grad-norm axis.
    """

    def __init__(
        self,
        cfg: AblationConfig,
        *,
        device: str = "CPU",
        min_interval_s: float = 0.35,
        clock: Callable[[], float] = time.monotonic,
        smoothing: float = 0.6,
        log_scale: bool = False,
    ):
        from .engine import arm_labels

        self.cfg, self.device, self.min_interval_s, self.clock = cfg, device, min_interval_s, clock
        self.smoothing, self.log_scale = smoothing, log_scale
        self.labels = arm_labels(cfg.arms)
        self.baseline = "lora" if "lora" in self.labels else self.labels[0]
        self.seeds = cfg.seed_list
        self.total_steps = cfg.steps * len(self.seeds)
        self.records: list[StepRecord] = []
        self.phase = "waiting for the GPU queue"
        self.result: RunResult | None = None
        self.done = 0  # global step index (seed i, step s -> i * steps + s) of the newest record
        self.seed: int | None = None
        self.memory_mb: float | None = None
        self.tokens = 0  # summed over arms and seeds
        self.compute_s = 0.0  # summed step_time_s: throughput is tokens per second of training compute
        self.diverged: list[str] = []
        self.redraws = 0
        self._arms_seen: set[str] = set()
        self._tokens_at: dict[tuple[str, int], int] = {}
        self._started = clock()
        self._first: tuple[float, int] | None = None  # (time, done) at the first record, for the ETA
        self._last_draw: float | None = None
        self._draw_cost = 0.0

    # -- events ------------------------------------------------------------------------------------------------
    def update(self, event: Phase | StepRecord | RunResult) -> bool:
        """Take one engine event; return True when the page should redraw now."""
        if isinstance(event, RunResult):
            self.result = event
            self.phase = event.status
            return self._mark()
        if isinstance(event, Phase):
            self.phase = event.message
            return self._mark()
        record = event
        self.records.append(record)
        self._arms_seen.add(record.arm)
        self.seed = record.seed
        seed_index = self.seeds.index(record.seed) if record.seed in self.seeds else 0
        self.done = max(self.done, seed_index * self.cfg.steps + record.step)
        key = (record.arm, record.seed)
        self.tokens += record.tokens - self._tokens_at.get(key, 0)
        self._tokens_at[key] = record.tokens
        self.compute_s += record.step_time_s
        self.memory_mb = record.memory_mb
        if record.diverged:
            seed_note = f" (seed {record.seed})" if len(self.seeds) > 1 else ""
            self.diverged.append(f"{record.arm} diverged at step {record.step}{seed_note}")
        now = self.clock()
        if self._first is None:
            self._first = (now, self.done)
        due = now - (self._last_draw or -math.inf) >= max(self.min_interval_s, 3 * self._draw_cost)
        if due or len(self.records) == 1:  # the first point shows at once
            return self._mark()
        return False

    def _mark(self) -> bool:
        self._last_draw = self.clock()
        self.redraws += 1
        return True

    # -- charts ------------------------------------------------------------------------------------------------
    def figures(self, smoothing: float | None = None, log_scale: bool | None = None) -> tuple[Any, Any, Any]:
        """(loss, grad norm, loss delta) Plotly figures of the records so far. While a multi-seed run goes on, the
        charts show the current seed; once it ended, the mean over seeds with a band."""
        from .plots import make_delta_figure, make_grad_norm_figure, make_loss_figure

        if smoothing is not None:
            self.smoothing = smoothing
        if log_scale is not None:
            self.log_scale = log_scale
        started = self.clock()
        records = self.records[:]  # a snapshot: the run may append while a slider redraws from another thread
        seed = self.seed if self.result is None and len(self.seeds) > 1 else None
        loss = make_loss_figure(records, smoothing=self.smoothing, seed=seed)
        grad = make_grad_norm_figure(records, smoothing=self.smoothing, log_scale=self.log_scale, seed=seed)
        # The delta chart needs the baseline's records; before its first step the chart says so.
        delta_records = records if self.baseline in self._arms_seen else []
        delta = make_delta_figure(delta_records, baseline=self.baseline, smoothing=self.smoothing, seed=seed)
        self._draw_cost = self.clock() - started
        return loss, grad, delta

    def mixing_figure(self) -> Any:
        """CRMA mixing diagnostics over steps (all seeds)."""
        from .plots import make_mixing_figure

        return make_mixing_figure(self.records[:])

    # -- progress ----------------------------------------------------------------------------------------------
    def fraction(self) -> float:
        """Share of the run's steps done, in [0, 1]."""
        if self.result is not None and self.result.status == "finished":
            return 1.0
        return min(1.0, self.done / self.total_steps) if self.total_steps else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the pace since the first step, None before two steps."""
        if self._first is None or self.result is not None:
            return None
        t0, d0 = self._first
        if self.done <= d0:
            return None
        return (self.clock() - t0) / (self.done - d0) * (self.total_steps - self.done)

    def progress_text(self) -> str:
        """One line: step k/N, seed, elapsed, ETA, device, memory, tokens/s (and what happened, at the end)."""
        elapsed = self.clock() - self._started
        if self.result is not None:
            r = self.result
            where = f"step {self.done}/{self.total_steps}"
            if r.status == "finished":
                head = f"Finished {self.total_steps} steps x {len(self.labels)} arms in {_clock(r.wall_s or elapsed)}"
            elif r.status == "stopped":
                head = f"Stopped at {where} ({r.error or 'stopped by request'}); partial results kept"
            else:
                head = f"Failed at {where}: {r.error}"
        elif not self.records:
            head = f"{self.phase} ({_clock(elapsed)})"
        else:
            head = f"Step {self.done}/{self.total_steps}"
            if len(self.seeds) > 1 and self.seed is not None:
                head += f" · seed {self.seed} ({self.seeds.index(self.seed) + 1}/{len(self.seeds)})"
            eta = self.eta_s()
            head += f" · elapsed {_clock(elapsed)} · ETA {_clock(eta) if eta is not None else '…'}"
            if not self.phase.startswith(("loading", "reading", "seed", "waiting")):
                head += f" · {self.phase}"
        parts = [head, self.device]
        if self.memory_mb is not None:
            kind = "GPU peak" if self.device.startswith(("GPU", "ZeroGPU")) else "RSS"
            parts.append(f"{kind} {self.memory_mb / 1024:.2f} GiB")
        if self.compute_s > 0:
            parts.append(f"{self.tokens / self.compute_s:,.0f} tokens/s")
        text = " · ".join(parts)
        if self.diverged:
            text += " · ⚠ " + "; ".join(self.diverged) + " (the other arms continue)"
        return text

    def progress_html(self) -> str:
        """A progress bar with `progress_text()` under it (inline styles: no page CSS needed)."""
        pct = 100 * self.fraction()
        failed = self.result is not None and self.result.status == "failed"
        colour = "#d55e00" if failed or self.diverged else "#0072b2"
        return (
            f'<div class="crma-progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{pct:.0f}"><div style="height:10px;border-radius:5px;background:#e5e7eb;overflow:hidden">'
            f'<div style="height:100%;width:{pct:.1f}%;background:{colour};transition:width .3s"></div></div>'
            f'<div style="margin-top:4px;font-size:0.9em">{html.escape(self.progress_text())}</div></div>'
        )


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ViewRegistry:
    """Live views by run id, so a smoothing or log-scale change can redraw a visitor's run (running or ended)
    without re-running it. Bounded: the oldest views are dropped (their records stay in `metrics.jsonl`)."""

    def __init__(self, max_views: int = 16):
        self.max_views = max_views
        self._views: OrderedDict[str, LiveView] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, run_id: str, view: LiveView) -> None:
        with self._lock:
            self._views[run_id] = view
            while len(self._views) > self.max_views:
                self._views.popitem(last=False)

    def get(self, run_id: Any) -> LiveView | None:
        with self._lock:
            return self._views.get(run_id) if isinstance(run_id, str) else None

    def view_for(self, run_id: Any, root: str | os.PathLike[str] | None = None) -> LiveView | None:
        """The live view of `run_id`, else one rebuilt from the run's `config.json` and `metrics.jsonl`."""
        view = self.get(run_id)
        if view is not None:
            return view
        space = get_run(run_id, root)
        if space is None or not (space.out_dir / "metrics.jsonl").is_file():
            return None
        from .report import read_metrics_jsonl

        cfg = AblationConfig.from_json((space.out_dir / "config.json").read_text())
        view = LiveView(cfg)
        for record in read_metrics_jsonl(space.out_dir / "metrics.jsonl"):
            view.update(record)
        view.result = RunResult(status="finished", error=None, config=cfg, records=view.records, summary={})
        return view


# --------------------------------------------------------------------------------------------------------------------
# Results: API events, receipt, snippets


def _plain(value: Any) -> Any:
    # JSON clients get null for NaN/inf (a diverged step is flagged by `diverged`); strict JSON has no NaN.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def event_json(event: Phase | StepRecord | RunResult, *, run_id: str) -> dict[str, Any]:
    """One engine event as the `/ablate` API streams it: `{"type": "phase" | "record" | "result", ...}`."""
    if isinstance(event, StepRecord):
        return _plain({"type": "record", "run_id": run_id, **event.to_dict()})
    if isinstance(event, Phase):
        return {"type": "phase", "run_id": run_id, "message": event.message, "seed": event.seed}
    return _plain(
        {
            "type": "result",
            "run_id": run_id,
            "status": event.status,
            "error": event.error,
            "records": len(event.records),
            "wall_s": event.wall_s,
            "summary": event.summary,
            "files": event.files,
            "notes": event.notes,
        }
    )


def receipt_markdown(summary: Mapping[str, Any]) -> str:
    """The fairness receipt of `summary.json` as Markdown: same LoRA init, same batches, config diff."""
    receipt = summary.get("receipt") or {}
    per_seed = receipt.get("per_seed") or ([receipt] if receipt else [])
    if not per_seed:
        return "No fairness receipt: no seed finished its set-up."
    lines = [
        "| Seed | Same LoRA init | Same batches | Only the adapter differs | Batch order sha256 |",
        "|---|---|---|---|---|",
    ]
    for r in per_seed:
        lines.append(
            f"| {r.get('seed')} | {_tick(r.get('lora_init_equal'))} | {_tick(r.get('batches_seen_equal'))} | "
            f"{_tick(r.get('differs_only_in_adapter'))} | `{str(r.get('batch_order_sha256', ''))[:16]}…` |"
        )
    first = per_seed[0]
    inits = first.get("lora_init_sha256") or {}
    if inits:
        lines += ["", "LoRA init sha256 per arm: " + ", ".join(f"{a} `{h[:12]}…`" for a, h in inits.items())]
    diff = first.get("config_diff") or {}
    if diff:
        arms = list(next(iter(diff.values())))
        lines += [
            "",
            "What differs between the arms (everything else is identical):",
            "",
            "| Setting | " + " | ".join(arms) + " |",
            "|---|" + "---|" * len(arms),
        ]
        for key, values in diff.items():
            lines.append(f"| {key} | " + " | ".join(_cell(values.get(a)) for a in arms) + " |")
    return "\n".join(lines)


def _tick(value: Any) -> str:
    return "✅ yes" if value is True else ("❌ no" if value is False else "–")


def _cell(value: Any) -> str:
    text = "–" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|")


def _space_host(space_id: str) -> str:
    # Spaces are served at <owner>-<name>.hf.space, lower-cased, with '_' and '.' turned into '-'.
    return re.sub(r"[^a-z0-9-]", "-", space_id.lower().replace("/", "-")) + ".hf.space"


def embed_snippet(space_id: str | None) -> str:
    """HTML to embed the Space in a page: an `<iframe>` and the `<gradio-app>` web component.

    Args:
        space_id (`str | None`): `owner/name` (the `SPACE_ID` variable on a Space); None gives a placeholder.
    """
    sid = space_id if space_id and "/" in space_id else "YOUR-NAME/crma-lab"
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
        + ("" if space_id else "<!-- replace YOUR-NAME/crma-lab with the Space id -->\n")
    )


def client_snippet(cfg: AblationConfig, space_id: str | None) -> str:
    """Python that runs `cfg` through the `/ablate` endpoint with gradio_client and streams its events."""
    sid = space_id or "http://127.0.0.1:7860"
    payload = {k: v for k, v in cfg.to_dict().items() if v != getattr(AblationConfig(), k) or k in ("model", "steps")}
    payload.pop("max_wall_s", None)
    return (
        "from gradio_client import Client\n\n"
        f"client = Client({sid!r})\n"
        f'job = client.submit({json.dumps(payload, indent=4)}, None, api_name="/ablate")\n'
        "for event, archive in job:  # one event per step record, then the result\n"
        '    print(event["type"], event.get("arm"), event.get("step"), event.get("loss"))\n'
        'print(event["status"], archive)\n'
    )

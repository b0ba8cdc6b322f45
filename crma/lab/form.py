"""The page's form and API input to a run config: dataset choice, Space caps, names, and the data preview.

Values go through the one config parser (`crma.ablation.spec.schema.parse_config`); this module adds only what a public
Space needs on top: the upload stands in for a file path, caps bound every size, and names can never reach a path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import ConfigError, coerce, config_to_values, field_spec, label, parse_config

DATASET_CHOICES = ("alpaca", "bundled", "upload")
PREVIEW_CELL_CHARS = 300
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


# Caps of a public Space: one visitor's run must not hold the shared GPU (or the disk) for long.
SPACE_CAPS: Mapping[str, int | float] = MappingProxyType(
    {
        "steps": 1000,
        "rows": 5000,
        "seq_len": 2048,
        "batch_size": 32,
        "seeds": 5,  # number of seeds in one run
        "arms": 6,  # number of arms in one run (A/A copies included)
        "arm_labels": 18,  # arms times LR multipliers: the adapters trained side by side
        "eval_rows": 500,
        "val_rows": 500,
        "lora_r": 256,
        "crma.n_streams": 16,
        "crma.rank": 64,
        "crma.sinkhorn_iters": 100,
        "max_wall_s": 1500,  # the longest GPU duration `estimate_gpu_seconds` asks for
        # Rows x tokens of one step, whatever the split: 32 x 2048 of long rows needs ~128 GiB for one CPU step. The
        # memory estimate (`check_memory`) then checks the step against the device before anything loads.
        "tokens_per_step": 16384,
    }
)
# "Tune the LR per arm" on the page: every arm at these multipliers, each chosen on a validation slice of this size.
TUNE_LR_GRID = (0.3, 1.0, 3.0)
TUNE_VAL_ROWS = 32
# What a ZeroGPU lease gives one workload (the Hub's ZeroGPU docs: an H200 slice, 70 GB of VRAM); this process has
# no GPU before the lease, so the estimate is checked against this figure.
ZERO_GPU_MEMORY_BYTES = 70 * 10**9


def resolve_dataset(dataset: Any, upload: str | os.PathLike[str] | None) -> str:
    """The engine's data source for the form's choice: `alpaca`, `bundled`, or the uploaded file's path.

    A visitor never names a server path: `upload` comes from the app's file widget, so arbitrary paths (which the data
    loader would happily read) cannot be reached through the form or the API.
    """
    choice = dataset.strip().lower() if isinstance(dataset, str) else dataset
    if choice in ("alpaca", "bundled"):
        return choice
    if choice in ("upload", None, "") and upload:
        return str(upload)
    if choice == "upload":
        raise ConfigError("dataset", "Data is 'upload' but no file was uploaded: choose a .json, .jsonl or .csv file")
    raise ConfigError(
        "dataset", f"Data must be one of {list(DATASET_CHOICES)} (upload: send the file); got {dataset!r}"
    )


def config_from_form(
    values: Mapping[str, Any],
    *,
    upload: str | os.PathLike[str] | None = None,
    caps: Mapping[str, int | float] | None = SPACE_CAPS,
) -> AblationConfig:
    """Build and validate an `AblationConfig` from the page's form or an `/ablate` JSON object.

    Values are read by the one config parser (`parse_config`: text such as "2e-4" or "1,2,3", or JSON data; nested
    `{"crma": {...}}` or dotted `crma.rank`). On top of it: `dataset` is
    `alpaca`, `bundled` or `upload` (the uploaded file stands in for a path, so no visitor can name one), `spike_at`
    0 means off, `model` must be a preset or a Hub id, and every size is capped.

    Args:
        values (`Mapping[str, Any]`): settings by key; anything left out keeps its default.
        upload (`str | PathLike | None`): path of the uploaded data file (used when `dataset` is `upload`).
        caps (`Mapping | None`): upper bounds (`SPACE_CAPS` by default; None for no caps). `max_wall_s` is also
            filled in from the cap when the values leave it empty.

    Returns:
        `AblationConfig`: a valid config.

    Raises:
        `ConfigError` / `ValueError`: one sentence naming the field by its label on the page.
    """
    if not isinstance(values, Mapping):
        raise ConfigError("", f"the settings must be a JSON object; got {type(values).__name__}")
    data = dict(values)
    if "dataset" in data or upload:
        data["dataset"] = resolve_dataset(data.get("dataset"), upload)
    if data.get("spike_at") in (0, 0.0, "0"):
        data["spike_at"] = None  # 0 in a number box means "off"
    if data.get("eval_dataset") not in (None, "", "alpaca", "bundled"):  # never a server path
        raise ConfigError(
            "eval_dataset", "Held-out data must be 'alpaca' or 'bundled' on this Space, or empty (the training data)"
        )
    if data.pop("tune_lr", False) is True:  # the page's one control for "each arm at its own best LR"
        data.setdefault("lr_grid", list(TUNE_LR_GRID))
        data.setdefault("val_rows", TUNE_VAL_ROWS)
    if caps is not None and "max_wall_s" in caps and data.get("max_wall_s") in (None, ""):
        data["max_wall_s"] = float(caps["max_wall_s"])
    cfg = parse_config(data)
    _check_names(cfg, model_given="model" in data)
    if caps is not None:
        check_caps(cfg, caps)
    return cfg


def _check_names(cfg: AblationConfig, *, model_given: bool) -> None:
    if model_given and (not _HUB_ID.match(cfg.model) or ".." in cfg.model):
        raise ConfigError("model", f"Model must be a preset or a Hub id like 'org/name' (no paths); got {cfg.model!r}")
    for target in cfg.lora_targets:
        if not _MODULE_NAME.match(target):
            raise ConfigError(
                "lora_targets", f"LoRA targets must be module names such as q_proj,v_proj; got {target!r}"
            )


def check_caps(cfg: AblationConfig, caps: Mapping[str, int | float] = SPACE_CAPS) -> None:
    """Raise `ConfigError` naming (by its label) the first field of `cfg` over its cap (`seeds` and `arms` count
    entries)."""
    values = config_to_values(cfg)
    for key, cap in caps.items():
        if key == "tokens_per_step":
            tokens = cfg.batch_size * cfg.seq_len
            if tokens > cap:
                raise ConfigError(
                    "batch_size",
                    f"{label('batch_size')} × {label('seq_len')} must be at most {cap:g} tokens per step on this "
                    f"Space; got {cfg.batch_size} × {cfg.seq_len} = {tokens} (at {label('seq_len')} {cfg.seq_len}, "
                    f"at most {label('batch_size')} {max(int(cap) // cfg.seq_len, 1)})",
                )
            continue
        if key == "seeds":
            value = len(cfg.seed_list)
        elif key == "arms":
            value = len(cfg.arms)
        elif key == "arm_labels":
            value = len(cfg.arm_labels)
        else:
            value = values[key]
        if value is not None and value > cap:
            if key == "arm_labels":
                raise ConfigError(
                    "arms",
                    f"{label('arms')} × {label('lr_grid')} must be at most {cap:g} arms trained side by side on this "
                    f"Space; got {len(cfg.arms)} × {len(cfg.lr_grid)} = {value}",
                )
            shown = f"{value} of them" if key in ("seeds", "arms") else repr(value)
            raise ConfigError(key, f"{label(key)} must be at most {cap:g} on this Space; got {shown}")


def check_model(cfg: AblationConfig, *, device_checks: bool = True) -> Any:
    """Resolve the run's model without loading weights, so an unknown, gated, remote-code or too large model fails
    before a GPU is requested (`ModelLoadError`); `device_checks=False` where the GPU only comes with the lease.

    The lookup follows the app's Hub rule (`runs.VISITOR_HUB`): no token, no local folders. Returns the model's
    `PretrainedConfig` (for `check_memory`).
    """
    from crma.ablation.models import check_model as check

    from .runs import VISITOR_HUB

    return check(cfg.model, device=cfg.device, dtype=cfg.dtype, device_checks=device_checks, **VISITOR_HUB)


def check_memory(cfg: AblationConfig, *, model_config: Any = None, zero_gpu: bool = False) -> None:
    """Estimate the peak memory of one lockstep step of `cfg` before the model loads, and raise `ModelLoadError`
    saying what fits (the largest batch, the longest seq_len) when it exceeds the device's free memory.

    Args:
        cfg (`AblationConfig`): the run.
        model_config (`PretrainedConfig | None`): the model's config from `check_model`; None looks it up.
        zero_gpu (`bool`): a ZeroGPU Space, whose process has no GPU before the lease: the step is checked against a
            lease's memory (`ZERO_GPU_MEMORY_BYTES`, bf16) instead of the device's free memory now.
    """
    import torch

    from crma.ablation.models import PRESETS
    from crma.ablation.spec.arms import parse_arm

    from .memory import check_training_fits, estimate_training_memory
    from .runs import VISITOR_HUB

    device: str | torch.device = cfg.device
    dtype: str | torch.dtype = cfg.dtype
    free_bytes = None
    if zero_gpu and cfg.device != "cpu":
        device, free_bytes = torch.device("cuda"), ZERO_GPU_MEMORY_BYTES
        dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    preset = PRESETS.get(cfg.model)
    estimate = estimate_training_memory(
        cfg.model if model_config is None else model_config,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        n_arms=len(cfg.arm_labels),
        crma_arms=sum(1 for label_ in cfg.arm_labels if parse_arm(label_).spec.crma),
        lora_r=cfg.lora_r,
        lora_targets=cfg.lora_targets,
        lora_dropout=cfg.lora_dropout,
        crma_rank=cfg.crma.rank,
        crma_streams=cfg.crma.n_streams,
        dtype=dtype,
        device=device,
        quantize_4bit=bool(preset and preset.quantize_4bit),
        **VISITOR_HUB,
    )
    check_training_fits(estimate, device, free_bytes=free_bytes)


def check_data(cfg: AblationConfig, data_name: str | None = None) -> None:
    """Read the run's data slice now, so a bad file or slice fails before a GPU is requested (`DataError`).

    `data_name` is what messages call an uploaded file (its own name); a server path is never shown.
    """
    from crma.ablation.data import DataError, load_instruction_rows

    for split, (dataset, start, rows) in cfg.slices().items():
        try:
            name = data_name if dataset == cfg.dataset else None
            load_instruction_rows(dataset, start=start, rows=rows, display_name=name)
        except DataError as exc:
            where = "" if split == "train" else f"the held-out {split} slice (rows {start}–{start + rows - 1}): "
            raise DataError(where + _hide_dir(str(exc), dataset)) from None


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
    from crma.ablation.data import DataError, load_instruction_rows

    first, count = coerce(field_spec("start"), start), coerce(field_spec("rows"), rows)
    if first < 0:
        raise ConfigError("start", f"Start row must be an integer ≥ 0; got {first}")
    if count < 1:
        raise ConfigError("rows", f"Rows must be an integer ≥ 1; got {count}")
    if caps is not None and "rows" in caps and count > caps["rows"]:
        raise ConfigError("rows", f"Rows must be at most {caps['rows']:g} on this Space; got {count}")
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

"""Defaults and estimates of the page: which setting it starts with, how long a run takes, how much GPU time to ask
ZeroGPU for, and which device a run trains on."""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace

from crma.ablation.config import AblationConfig

GPU_SECONDS_RANGE = (60, 1500)
_SIZE_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([bBmM])(?![A-Za-z])")


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
            f"{_minutes(estimate_run_seconds(cfg, gpu=True))} for {len(cfg.arms)} arms."
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


def _model_size(model: str) -> tuple[float, bool]:
    """(parameters, loaded in 4-bit) of a preset, or read from a Hub id such as `Qwen2.5-7B`; 1.5B when unknown."""
    from crma.ablation.models import PRESETS

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
    # Measured on 2 CPU cores: SmolLM2-135M at batch 2 x 64 ~0.85 s, batch 4 x 128 ~3.7 s
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

"""Defaults and estimates of the page: which setting it starts with, how long a run takes, how much GPU time to ask
ZeroGPU for, and which device a run trains on."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import replace

from crma.ablation.spec.config import AblationConfig
from crma.utils import cpu_cores

GPU_SECONDS_RANGE = (60, 1500)
_SIZE_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([bBmM])(?![A-Za-z])")


def default_config(has_gpu: bool, *, cpu_flops: float | None = None) -> tuple[AblationConfig, str]:
    """The page's starting config and a sentence saying which setting it is, why, and how long it should take.

    Args:
        has_gpu (`bool`): a CUDA GPU (or ZeroGPU) is available to the runs.
        cpu_flops (`float | None`): this machine's measured matmul throughput (`measure_cpu_flops()`) for the CPU
            estimate; None measures it now (about 60 ms).

    Returns:
        `(AblationConfig, str)`: on a GPU the author's setting (TinyLlama-1.1B on 200 Alpaca rows, seed 42, 100
        steps, batch 4 x 256 tokens); on CPU a setting that finishes in a few minutes on 2 idle cores (SmolLM2-135M on
        200 bundled rows, seed 42, 30 steps, batch 2 x 128 tokens, 16 held-out rows evaluated at steps 0, 15 and 30).
        Both train the 2x2 grid of arms at the shared LR. The note is `default_note(cfg, ...)`.
    """
    if has_gpu:
        cfg = AblationConfig(
            model="tinyllama-1.1b", dataset="alpaca", rows=200, seed=42, steps=100, batch_size=4, seq_len=256
        )
    else:
        cfg = AblationConfig(
            model="smollm2-135m",
            dataset="bundled",
            rows=200,
            seed=42,
            steps=30,
            batch_size=2,
            seq_len=128,
            eval_rows=16,
            eval_every=15,
        )
    return cfg, default_note(cfg, has_gpu=has_gpu, cpu_flops=cpu_flops)


def default_note(cfg: AblationConfig, *, has_gpu: bool, cpu_flops: float | None = None) -> str:
    """The sentence under the page's title: the default setting of `default_config`, and its run time as an estimate
    (on CPU from this machine's measured speed: `cpu_flops`, measured now when None, and its core count).

    Args:
        cfg (`AblationConfig`): the default config.
        has_gpu (`bool`): the runs train on a GPU.
        cpu_flops (`float | None`): see `default_config`.
    """
    seeds = f"seed {cfg.seed}" if len(cfg.seed_list) == 1 else f"seeds {', '.join(map(str, cfg.seed_list))}"
    setting = f"{seeds}, {cfg.steps} steps, batch {cfg.batch_size} × {cfg.seq_len} tokens, {len(cfg.arms)} arms"
    if cfg.eval_rows:
        setting += f", {cfg.eval_rows} held-out rows"
    warmup = cfg.zclip.warmup_steps
    zclip = ""
    if cfg.steps <= 2 * warmup:
        zclip = (
            f" ZClip clips nothing in its first {warmup} steps (it collects statistics), so here its arms clip "
            f"adaptively in the last {max(0, cfg.steps - warmup)}."
        )
    if has_gpu:
        minutes = _minutes(estimate_run_seconds(cfg, gpu=True))
        return (
            f"GPU found: the defaults reproduce the author's setting (TinyLlama-1.1B, {cfg.rows} Alpaca rows, "
            f"{setting}). **Estimated time: about {minutes}** (from the model's size; not measured here).{zclip}"
        )
    flops = measure_cpu_flops() if cpu_flops is None else cpu_flops
    cores = cpu_cores()
    minutes = _minutes(estimate_run_seconds(cfg, gpu=False, cpu_flops=flops))
    return (
        f"No GPU here, so the defaults are a CPU setting: SmolLM2-135M, {cfg.rows} bundled rows (offline), "
        f"{setting}. **Estimated time: about {minutes}**, from this machine's speed measured just now "
        f"({flops / 1e9:.0f} GFLOP/s on {cores} {'core' if cores == 1 else 'cores'}); other work on these cores can "
        f"make it several times longer. The progress line shows the measured time left once steps run.{zclip} The "
        "author's setting "
        "(TinyLlama-1.1B, 200 Alpaca rows, 100 steps, batch 4 × 256) needs a GPU."
    )


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
    return f"CPU ({cpu_cores()} cores)"


def _model_size(model: str) -> tuple[float, bool]:
    """(parameters, loaded in 4-bit) of a preset, or read from a Hub id such as `Qwen2.5-7B`; 1.5B when unknown."""
    from crma.ablation.models import PRESETS

    preset = PRESETS.get(model)
    if preset is not None:
        return float(preset.approx_params), preset.quantize_4bit
    sizes = [float(n) * (1e9 if unit in "bB" else 1e6) for n, unit in _SIZE_IN_NAME.findall(model.split("/")[-1])]
    return (max(sizes) if sizes else 1.5e9), False


# Share of `measure_cpu_flops()` a LoRA training step reaches on CPU (~4 flops per parameter and token; the LM head and
# the MLPs are larger matmuls than the probe's, attention, norms, the optimizer and Python are extra). Calibrated with
# `python benchmarks/calibrate_cpu_estimate.py` (SmolLM2-135M, batch 2 x 128, LoRA r=8 on q/v) on the 2-core
# development machine: 1.13, 2.1 and 1.35 in rounds where it was idle (0.74-0.83 s per step at 111-160 GFLOP/s),
# 0.07-0.17 while other processes shared the cores (26-29 s per step at 28 GFLOP/s: contention slows the many small
# ops of a step far more than one matmul). So the estimate holds for an idle machine and is a lower bound otherwise;
# the page says so, and its ETA is measured once steps run.
CPU_STEP_EFFICIENCY = 1.0
# What `measure_cpu_flops()` gave on the 2-core development machine when idle; used when nothing was measured.
REFERENCE_CPU_FLOPS = 1.5e11


def measure_cpu_flops(*, repeats: int = 9) -> float:
    """Float32 matmul throughput of this machine right now, in FLOP/s (about 60 ms).

    The product has the shape of a small model's MLP on one batch (256 tokens x 576 -> 1536), so it sees the same
    cores, threads and current load a CPU run will; the fastest of `repeats` timed products after 30 ms of untimed
    ones (as `timeit` advises: a momentary blip, such as a browser drawing the page on the same machine, does not
    count, while load that lasts slows every product).

    Args:
        repeats (`int`): timed products.

    Returns:
        `float`: FLOP/s.
    """
    import torch

    a, b = torch.randn(256, 576), torch.randn(576, 1536)
    warm_until = time.perf_counter() + 0.03
    while time.perf_counter() < warm_until:  # untimed: the thread pool wakes up, the clock speed ramps up
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 256 * 576 * 1536 / max(min(times), 1e-9)


def estimate_step_seconds(cfg: AblationConfig, *, gpu: bool, cpu_flops: float | None = None) -> float:
    """Rough wall time of one optimizer step of one arm (forward, backward, clip, update).

    Args:
        cfg (`AblationConfig`): the run.
        gpu (`bool`): on a GPU (a fixed bf16 throughput) or on this CPU.
        cpu_flops (`float | None`): this machine's matmul throughput (`measure_cpu_flops()`); None uses
            `REFERENCE_CPU_FLOPS`.
    """
    params, four_bit = _model_size(cfg.model)
    tokens = cfg.batch_size * cfg.seq_len
    if gpu:
        # ~4 flops per parameter per token for a LoRA step (no weight grads of the frozen base) at ~50 TFLOP/s
        # sustained in bf16 on a ZeroGPU slice, plus per-layer launch and Python overhead; nf4 dequant ~doubles it.
        seconds = 0.08 + 4 * params * tokens / 5e13
        return seconds * (2.0 if four_bit else 1.0)
    # The same ~4 flops per parameter per token, at the share of the measured matmul throughput a step reaches.
    return 0.02 + 4 * params * tokens / (CPU_STEP_EFFICIENCY * (cpu_flops or REFERENCE_CPU_FLOPS))


def evaluations_per_seed(cfg: AblationConfig) -> int:
    """How often every arm is evaluated on the held-out slices in one seed: at step 0, every `eval_every` steps and
    after the last one (0 without a held-out slice)."""
    if not cfg.eval_rows and not cfg.val_rows:
        return 0
    during = cfg.steps // cfg.eval_every if cfg.eval_every else 0
    return 1 + during + (0 if cfg.eval_every and cfg.steps % cfg.eval_every == 0 else 1)


def estimate_run_seconds(cfg: AblationConfig, *, gpu: bool, cpu_flops: float | None = None) -> float:
    """Rough wall time of a whole run: load, per-seed set-up, the lockstep steps, the held-out evaluations, saving
    and the report (`cpu_flops` as in `estimate_step_seconds`)."""
    params, _ = _model_size(cfg.model)
    arms = len(cfg.arm_labels)
    load = 10 + 20 * params / 1e9  # download + load, ~20 s per billion parameters
    setup = 2 + (3 if gpu else 15) * params / 1e9  # PiSSA's SVD of every target matrix, once per seed
    step = estimate_step_seconds(cfg, gpu=gpu, cpu_flops=cpu_flops)
    steps = cfg.steps * arms * step
    # A forward pass is about a third of a training step (no backward); a held-out row costs a batch row's share.
    evals = evaluations_per_seed(cfg) * arms * (cfg.val_rows + cfg.eval_rows) * step / (3 * cfg.batch_size)
    finish = 15 + 3 * arms  # adapters, report.html and the PNG charts (a headless browser starts)
    return load + len(cfg.seed_list) * (setup + steps + evals) + answer_seconds(cfg, step, gpu=gpu) + finish


def answer_seconds(cfg: AblationConfig, step_s: float, *, gpu: bool) -> float:
    """Time of the end-of-run answers: every arm and the base model, `answer_rows` held-out prompts of
    `answer_tokens` tokens each; a token costs a one-token forward (a third of a step's per-token share), at least
    the per-token overhead of `generate`: 0.05 s on CPU (SmolLM2-135M measured 0.065-0.084 s per token on 2 cores
    shared with a training run; unloaded was not measured), 0.015 s on a GPU (a guess: no GPU was measured)."""
    if not cfg.answer_rows or not (cfg.eval_rows or cfg.val_rows) or not cfg.save_adapters:
        return 0.0
    per_token = max(step_s / (3 * cfg.batch_size * cfg.seq_len), 0.015 if gpu else 0.05)
    return (len(cfg.arm_labels) + 1) * cfg.answer_rows * cfg.answer_tokens * per_token


def estimate_gpu_seconds(cfg: AblationConfig) -> int:
    """GPU seconds to request for `cfg` on ZeroGPU (`@spaces.GPU(duration=...)`): the run estimate with a 25 %
    margin, clamped to `GPU_SECONDS_RANGE` (60 to 1500 s)."""
    low, high = GPU_SECONDS_RANGE
    return int(min(high, max(low, math.ceil(1.25 * estimate_run_seconds(cfg, gpu=True)))))


def fit_wall_cap(cfg: AblationConfig, gpu_seconds: float) -> AblationConfig:
    """`cfg` with `max_wall_s` inside the GPU lease, leaving time to save: ZeroGPU kills a call that overruns, and a
    killed run would lose every file, whereas a capped run stops cleanly with partial results."""
    reserve = 20 + 5 * len(cfg.arm_labels)
    cap = max(30.0, gpu_seconds - reserve)
    return replace(cfg, max_wall_s=min(cfg.max_wall_s or cap, cap))


def _minutes(seconds: float) -> str:
    return f"{max(1, round(seconds / 60))} min"

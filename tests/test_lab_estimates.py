"""`crma.lab.estimates`: the page's starting config, run-time and GPU-time estimates, and the device label."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from crma.ablation.spec.arms import ARM_SPECS, GRID_ARMS
from crma.lab import estimates, form


def _cfg(values, caps=form.SPACE_CAPS):
    return form.config_from_form(values, caps=caps)


def test_default_config_cpu_and_gpu():
    cpu, cpu_note = estimates.default_config(False, cpu_flops=estimates.REFERENCE_CPU_FLOPS)
    gpu, gpu_note = estimates.default_config(True)
    assert (cpu.model, cpu.rows, cpu.seed, cpu.dataset) == ("smollm2-135m", 200, 42, "bundled")
    assert cpu.steps <= 40 and cpu.batch_size == 2 and cpu.seq_len == 128
    assert (gpu.model, gpu.rows, gpu.seed, gpu.steps, gpu.batch_size, gpu.seq_len) == (
        "tinyllama-1.1b",
        200,
        42,
        100,
        4,
        256,
    )
    assert cpu.arms == gpu.arms == list(GRID_ARMS)  # the 2x2 grid is the default arm set
    assert "No GPU" in cpu_note and "CPU" in cpu_note and "author" in cpu_note
    assert "GPU found" in gpu_note and "author" in gpu_note
    assert f"{len(gpu.arms)} arms" in gpu_note and f"{len(cpu.arms)} arms" in cpu_note  # the estimate's arms
    for cfg in (cpu, gpu):
        form.check_caps(cfg)
    # "Finishes in a few minutes" on the idle 2-core machine the CPU default was sized on.
    assert estimates.estimate_run_seconds(cpu, gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS) < 4 * 60


def test_cpu_note_is_an_estimate_from_the_measured_machine():
    cfg, _ = estimates.default_config(False, cpu_flops=1.0)
    fast = estimates.default_note(cfg, has_gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS)
    slow = estimates.default_note(cfg, has_gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS / 4)
    minutes = [int(re.search(r"Estimated time: about (\d+) min", note)[1]) for note in (fast, slow)]
    assert minutes[1] > 2 * minutes[0]  # a machine measured 4x slower gets a longer estimate
    seconds = estimates.estimate_run_seconds(cfg, gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS)
    assert minutes[0] == max(1, round(seconds / 60))
    cores = estimates.cpu_cores()
    assert f"{estimates.REFERENCE_CPU_FLOPS / 1e9:.0f} GFLOP/s on {cores} core" in fast  # what it was measured from
    assert "measured just now" in fast and "can make it several times longer" in fast
    # ZClip's warm-up covers most of a 30-step run: the note says how many steps its arms actually clip.
    assert (
        f"first {cfg.zclip.warmup_steps} steps" in fast and f"in the last {cfg.steps - cfg.zclip.warmup_steps}" in fast
    )
    assert "(from the model's size; not measured here)" in estimates.default_note(cfg, has_gpu=True)


def test_step_estimate_scales_with_the_measured_speed_and_the_tokens():
    cfg = _cfg({"model": "smollm2-135m", "batch_size": 2, "seq_len": 128}, None)
    base = estimates.estimate_step_seconds(cfg, gpu=False, cpu_flops=1e11)
    assert estimates.estimate_step_seconds(cfg, gpu=False) == estimates.estimate_step_seconds(
        cfg, gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS
    )
    half = estimates.estimate_step_seconds(cfg, gpu=False, cpu_flops=2e11)
    assert (half - 0.02) == pytest.approx((base - 0.02) / 2)
    double = estimates.estimate_step_seconds(replace(cfg, batch_size=4), gpu=False, cpu_flops=1e11)
    assert (double - 0.02) == pytest.approx(2 * (base - 0.02))
    # ~4 flops per parameter and token at the calibrated share of the measured throughput.
    expected = 4 * 134_515_008 * 256 / (estimates.CPU_STEP_EFFICIENCY * 1e11)
    assert base - 0.02 == pytest.approx(expected)


def test_measure_cpu_flops_measures_something():
    flops = estimates.measure_cpu_flops(repeats=3)
    assert 1e8 < flops < 1e14  # a plausible float32 matmul rate for any CPU this runs on
    assert estimates.cpu_cores() >= 1


def test_estimate_gpu_seconds_is_monotone_and_clamped():
    low, high = estimates.GPU_SECONDS_RANGE
    base = {"model": "tinyllama-1.1b"}
    by_steps = [estimates.estimate_gpu_seconds(_cfg({**base, "steps": s}, None)) for s in (50, 100, 200, 400)]
    assert by_steps == sorted(by_steps) and by_steps[0] < by_steps[-1]
    two, four = (
        estimates.estimate_gpu_seconds(_cfg({**base, "steps": 200, "arms": a}, None))
        for a in (["lora", "lora+crma"], list(GRID_ARMS))
    )
    assert four > two
    one, three = (
        estimates.estimate_gpu_seconds(_cfg({**base, "steps": 100, "seeds": s}, None)) for s in ("1", "1,2,3")
    )
    assert three > one
    small, large = (
        estimates.estimate_gpu_seconds(_cfg({"model": m, "steps": 300}, None))
        for m in ("smollm2-135m", "org/Some-Model-7B")
    )
    assert large > small
    assert estimates.estimate_gpu_seconds(_cfg({"model": "tiny-random", "steps": 1, "answer_rows": 0})) == low
    biggest = _cfg({"model": "mistral-7b", "steps": 1000, "seeds": "1,2,3,4,5", "arms": list(ARM_SPECS)})
    assert estimates.estimate_gpu_seconds(biggest) == high


def test_fit_wall_cap_leaves_time_to_save():
    biggest = _cfg({"model": "mistral-7b", "steps": 1000, "seeds": "1,2,3,4,5", "arms": list(ARM_SPECS)})
    lease = estimates.estimate_gpu_seconds(biggest)
    capped = estimates.fit_wall_cap(biggest, lease)
    assert capped.max_wall_s < lease  # the run stops (and saves) before ZeroGPU's lease runs out
    assert capped.steps == biggest.steps and capped.arms == biggest.arms  # nothing else changes
    tighter = _cfg({"model": "tiny-random", "max_wall_s": 40})
    assert estimates.fit_wall_cap(tighter, 1500).max_wall_s == 40  # a visitor's tighter cap is kept
    assert estimates.fit_wall_cap(tighter, 10).max_wall_s == 30  # never below 30 s


def test_model_size_from_presets_and_hub_names():
    step = [
        estimates.estimate_step_seconds(_cfg({"model": m}, None), gpu=True)
        for m in ("tiny-random", "Qwen/Qwen2.5-0.5B", "org/model-1.5B", "org/Some-Model-7B")
    ]
    assert step == sorted(step) and len(set(step)) == 4
    # A name without a size counts as 1.5B: the same as an explicit 1.5B.
    assert estimates.estimate_step_seconds(_cfg({"model": "org/mystery"}, None), gpu=True) == step[2]


def test_zero_gpu_and_device_label(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert estimates.on_zero_gpu() is False
    cpu_cfg = _cfg({"device": "cpu"})
    assert estimates.device_label(cpu_cfg).startswith("CPU (")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert estimates.on_zero_gpu() is True and estimates.gpu_available() is True
    assert estimates.device_label(_cfg({})) == "ZeroGPU"
    assert estimates.device_label(cpu_cfg).startswith("CPU (")  # device=cpu trains on the CPU even there


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without a GPU")
def test_gpu_available_is_false_on_a_cpu_machine(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert estimates.gpu_available() is False
    assert estimates.device_label(_cfg({})).startswith("CPU (")


def test_the_estimate_counts_the_end_of_run_answers():
    cfg = _cfg({"model": "smollm2-135m", "arms": "lora,lora+crma", "eval_rows": 8, "answer_rows": 3})
    step = estimates.estimate_step_seconds(cfg, gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS)
    # 3 columns (base + 2 arms) x 3 prompts x 48 tokens, each at least the 0.05 s per-token overhead of generate.
    per_token = max(step / (3 * cfg.batch_size * cfg.seq_len), 0.05)
    assert estimates.answer_seconds(cfg, step, gpu=False) == pytest.approx(3 * 3 * 48 * per_token)
    run = estimates.estimate_run_seconds(cfg, gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS)
    none = estimates.estimate_run_seconds(
        replace(cfg, answer_rows=0), gpu=False, cpu_flops=estimates.REFERENCE_CPU_FLOPS
    )
    assert run - none == pytest.approx(3 * 3 * 48 * per_token)
    # No held-out rows or no saved adapters: nothing answers, nothing to wait for.
    for quiet in (replace(cfg, eval_rows=0, val_rows=0), replace(cfg, save_adapters=False)):
        assert estimates.answer_seconds(quiet, step, gpu=False) == 0.0

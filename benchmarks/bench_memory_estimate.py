"""Calibration of `estimate_training_memory` (printed, not asserted): the estimate against real steps on the CPU.

For each setting a fresh subprocess builds the model, sets up the engine's arms on it (peft LoRA r=8 on q/v per arm,
CRMA on the `lora+crma` arm, AdamW per arm) and takes two lockstep steps per arm on random tokens whose first row is
half padding (so the attention mask is in play, as with real batches). Per setting it prints:

- saved: bytes autograd keeps for backward in arm 0's first step (`saved_tensors_hooks`, parameters excluded),
  against the estimate's activations + fp32 log-softmax. Deterministic.
- peak: the process's peak RSS (`ru_maxrss`) minus its RSS after the imports, against the estimate's total
  (weights, adapters, activations, allocator, loss buffers, runtime margin).

Models: `smollm2-135m` (the real one, from its offline copy), or `random:<vocab>:<layers>`, a random-init Llama of
SmolLM2's width (hidden 576, MLP 1536, 9 heads, 3 kv heads) with that vocabulary and depth.

    python benchmarks/bench_memory_estimate.py                       # SmolLM2, 2 arms, 4 shapes
    python benchmarks/bench_memory_estimate.py --sweep               # random-init models, 1 arm, 11 shapes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
DEFAULT = [("smollm2-135m", 2, shape) for shape in ("2x128", "8x256", "8x512", "4x1024")]
SWEEP = [
    ("random:49152:30", 1, "8x256"),
    ("random:4096:30", 1, "8x256"),
    ("random:49152:4", 1, "8x256"),
    *[("random:4096:4", 1, f"{b}x512") for b in (4, 8, 10, 12, 16, 24, 32, 48)],
]
ARM_NAMES = ["lora", "lora+crma"]


def _config(model: str):
    from transformers import AutoConfig

    _, vocab, layers = model.split(":")
    return AutoConfig.for_model(
        "llama",
        vocab_size=int(vocab),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=int(layers),
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def _model(model_name: str, arms: list[str]):
    """The base model with one LoRA (and CRMA, for a `crma` arm) per arm, its config, and the arms' activation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import crma
    from crma.ablation.models import load_model

    if model_name.startswith("random:"):
        config = _config(model_name)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        base = load_model(model_name, device="cpu", dtype="float32").model
        config = base.config
    lora_cfg = LoraConfig(task_type="CAUSAL_LM", **LORA)
    model = get_peft_model(base, lora_cfg, adapter_name="arm0")
    for i, arm in enumerate(arms):
        if i:
            model.add_adapter(f"arm{i}", lora_cfg)
        if "crma" in arm:
            crma.attach(model, crma.CRMAConfig(n_streams=3, rank=4), adapter_name=f"arm{i}")

    def activate(i: int) -> None:
        model.set_adapter(f"arm{i}")
        if "crma" in arms[i]:
            crma.set_active(model, f"arm{i}")
        elif crma.active_adapter(model) is not None:
            crma.disable(model)

    return model, config, activate


def _train(model, activate, n_arms: int, batch: dict) -> int:
    """Two lockstep steps of every arm on `batch`; the bytes autograd saved in arm 0's first step."""
    import torch

    optimizers = []
    for i in range(n_arms):
        activate(i)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizers.append((params, torch.optim.AdamW(params, lr=1e-4)))
    model.train()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            saved.setdefault((s.data_ptr(), s.nbytes()), s.nbytes())
        return t

    for step in range(2):
        for i, (params, opt) in enumerate(optimizers):
            activate(i)
            if step == 0 and i == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return sum(saved.values())


def worker(model_name: str, n_arms: int, batch_size: int, seq_len: int) -> dict:
    import resource

    import peft  # noqa: F401  (every import before `base_rss`: the peak counts the step, not the imports)
    import psutil
    import torch
    import transformers  # noqa: F401

    import crma.ablation.models  # noqa: F401
    from crma.lab.memory import estimate_training_memory

    arms = ARM_NAMES[:n_arms]
    base_rss = psutil.Process().memory_info().rss
    model, config, activate = _model(model_name, arms)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2 :] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    saved = _train(model, activate, len(arms), batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def estimate(crma_arms: int):
        return estimate_training_memory(
            config,
            batch_size=batch_size,
            seq_len=seq_len,
            n_arms=len(arms),
            crma_arms=crma_arms,
            lora_r=LORA["r"],
            lora_targets=LORA["target_modules"],
            dtype="float32",
            device="cpu",
        )

    est = estimate(sum("crma" in a for a in arms))
    first = estimate(0)  # arm 0, the one whose saved tensors were counted, is plain LoRA
    return {
        "saved": saved,
        "est_saved": first.activation_bytes + first.tokens * 4 * config.vocab_size,
        "peak": peak - base_rss,
        "est_total": est.total_bytes,
        "parts": {
            "weights": est.weights_bytes,
            "adapters": est.adapter_bytes,
            "activations": est.activation_bytes,
            "allocator": est.allocator_bytes,
            "loss": est.loss_bytes,
            "runtime": est.runtime_bytes,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="random-init models over 11 shapes, one arm")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, arms, shape = args.worker
        b, t = (int(x) for x in shape.split("x"))
        print(json.dumps(worker(model, int(arms), b, t)))
        return
    gib = 2**30
    print(f"CPU, float32, LoRA r={LORA['r']} on {LORA['target_modules']}, arms {ARM_NAMES} (first n)")
    print(f"{'model':<16} {'arms':>4} {'shape':>7}  saved GiB meas/est  peak GiB meas/est  peak/est  parts GiB")
    for model, arms, shape in SWEEP if args.sweep else DEFAULT:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", model, str(arms), shape], capture_output=True, text=True
        )
        if out.returncode != 0:
            print(f"{model:<16} {arms:>4} {shape:>7}  failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        parts = " ".join(f"{k} {v / gib:.2f}" for k, v in r["parts"].items())
        print(
            f"{model:<16} {arms:>4} {shape:>7}  {r['saved'] / gib:7.2f} / {r['est_saved'] / gib:5.2f}  "
            f"{r['peak'] / gib:8.2f} / {r['est_total'] / gib:5.2f}  {r['peak'] / r['est_total']:8.2f}  {parts}"
        )


if __name__ == "__main__":
    main()

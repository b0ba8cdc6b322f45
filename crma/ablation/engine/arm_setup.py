"""Building one seed's arms on the shared base model, the parts of `ArmSet.setup`: the checks of the model, the LoRA
config and init, the one shared initialisation copied into every arm (the capacity control's raised rank included),
rank 0's adapters for every process of a data-parallel launch, and each arm's optimizer, schedule, clipper and RNG
start. Also the snapshot that gives the base model its original weights back at tear-down (PiSSA rewrites them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

import crma
from crma import ZClip

from ..spec.config import AblationConfig
from .arm import Arm
from .distributed import DataParallel
from .receipt import tensor_hash

SHARED_INIT = "shared_init"  # the adapter the shared LoRA init is decomposed in, once, before every arm copies it


def snapshot_targets(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the weights LoRA targets: PiSSA rewrites them in place; every seed starts from the originals."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if crma.utils.is_lora_target(name, targets) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


@torch.no_grad()
def restore_targets(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put the weights of `snapshot_targets` back."""
    modules = dict(model.named_modules())
    for name, weight in snapshot.items():
        modules[name].weight.copy_(weight)


def check_model(cfg: AblationConfig, loaded: Any, arms: list[Arm]) -> None:
    """Raise `ValueError` when the base model lacks a LoRA target, or is narrower than the CRMA rank of an arm."""
    base = loaded.model
    names = [n for n, _ in base.named_modules()]
    missing = [t for t in cfg.lora_targets if not any(crma.utils.is_lora_target(n, [t]) for n in names)]
    if missing:
        raise ValueError(f"LoRA target module(s) {missing} do not exist in {loaded.name}")
    width = base.get_input_embeddings().weight.shape[1]
    if any(arm.spec.crma for arm in arms) and cfg.crma.rank > width:
        raise ValueError(f"CRMA rank must be at most the model width ({width}) of {loaded.name}; got {cfg.crma.rank}")


def matched_rank(cfg: AblationConfig, base: torch.nn.Module) -> dict[str, int]:
    """The smallest LoRA rank whose trainable parameters are ≥ those of `lora+crma` (LoRA at `lora_r` + CRMA), with
    the counts behind it."""
    from crma.model import expected_parameter_count

    per_rank = sum(
        module.in_features + module.out_features
        for name, module in base.named_modules()
        if crma.utils.is_lora_target(name, cfg.lora_targets) and hasattr(module, "in_features")
    )
    layers, width = len(crma.utils.find_decoder_layers(base)), base.get_input_embeddings().weight.shape[1]
    target = per_rank * cfg.lora_r + expected_parameter_count(layers, width, cfg.crma)
    rank = math.ceil(target / per_rank)
    return {"rank": rank, "params": per_rank * rank, "lora_crma_params": target}


def matched_note(cfg: AblationConfig, matched: dict[str, int]) -> str:
    """The run's note on the capacity control's rank."""
    return (
        f"lora-matched: LoRA rank {cfg.lora_r} raised to {matched['rank']} so its {matched['params']:,} trainable "
        f"parameters are at least lora+crma's {matched['lora_crma_params']:,}; its first {cfg.lora_r} components "
        "start from the shared init, the others from peft's default (zero B), so the model is unchanged at step 0."
    )


def peft_init(cfg: AblationConfig, loaded: Any, notes: list[str]) -> Any:
    """peft's `init_lora_weights` for `cfg.lora_init` on this model (a 4-bit one falls back from PiSSA, noted)."""
    init = cfg.lora_init
    if init.startswith("pissa") and loaded.is_4bit:
        notes.append(
            "PiSSA needs full-precision weights (peft refuses 4-bit ones): on this 4-bit model every arm's LoRA "
            "starts from peft's Gaussian init (A ~ N(0, 1/r), B = 0) instead."
        )
        return "gaussian"
    return True if init == "default" else init


def is_pissa(init: Any) -> bool:
    """Whether peft's `init_lora_weights` is a PiSSA one (it rewrites the targeted base weights)."""
    return isinstance(init, str) and init.startswith("pissa")


def lora_config(cfg: AblationConfig, init: Any, *, rank: int | None = None) -> Any:
    """peft's `LoraConfig` of the run at `rank` (default `lora_r`)."""
    from peft import LoraConfig

    r = rank or cfg.lora_r
    # A raised rank keeps the shared components' scale alpha / r: alpha grows with the rank.
    alpha = cfg.lora_alpha * r / cfg.lora_r
    return LoraConfig(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def _save_init(model: Any, folder: Path, adapter: str, name: str, init: Any) -> Path:
    # The initial PiSSA adapter: saving converts a trained one into a plain LoRA for the original base.
    model.peft_config[adapter].init_lora_weights = True
    model.save_pretrained(str(folder), selected_adapters=[adapter])
    model.peft_config[adapter].init_lora_weights = init
    target = folder / name
    (folder / adapter).rename(target)
    return target


def _add_matched(model: Any, cfg: AblationConfig, seed: int, arm: Arm, initial: dict[str, torch.Tensor], rank: int):
    """A rank-`rank` LoRA whose first `lora_r` components are the shared init and whose extra ones start from
    peft's default (Kaiming-uniform A, zero B): the model is unchanged at step 0 and the base stays shared."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    r = cfg.lora_r
    torch.manual_seed(seed + 1)  # the extra components are a function of the seed too
    model.add_adapter(arm.adapter, lora_config(cfg, True, rank=rank))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=arm.adapter).items()}
    for key, value in initial.items():
        if "lora_A" in key:
            state[key][:r] = value
        elif "lora_B" in key:
            state[key][:, :r] = value
    set_peft_model_state_dict(model, state, adapter_name=arm.adapter)


def add_arm_adapters(
    model: Any, arms: list[Arm], cfg: AblationConfig, seed: int, init: Any, folder: Path, matched: dict[str, int]
) -> None:
    """Copy the `SHARED_INIT` adapter of `model` into every arm's adapter, then delete it. With PiSSA the initial
    adapters are saved to `folder` (each arm's `init_dir`: a trained one is converted against it when saved)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    pissa = is_pissa(init)
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=SHARED_INIT).items()}
    shared_dir = _save_init(model, folder, SHARED_INIT, "pissa_init", init) if pissa else None
    for arm in arms:
        # Every arm starts from the *same* LoRA weights on the *same* (once-mutated) base.
        if arm.spec.matched:
            _add_matched(model, cfg, seed, arm, initial, matched["rank"])
            arm.init_dir = _save_init(model, folder, arm.adapter, f"init_{arm.adapter}", False) if pissa else None
        else:
            model.add_adapter(arm.adapter, lora_config(cfg, False))
            set_peft_model_state_dict(model, initial, adapter_name=arm.adapter)
            arm.init_dir = shared_dir
    model.set_adapter(arms[0].adapter)
    model.delete_adapter(SHARED_INIT)


def replicate(model: Any, parallel: DataParallel, seed: int, *, pissa: bool) -> None:
    """Give every process rank 0's adapters (and PiSSA's rewritten base weights), as DDP does at construction, and a
    dropout stream of its own."""
    tensors = [
        p
        for n, p in model.named_parameters()
        if "lora_" in n or n.rsplit(".", 1)[-1].startswith("crma_") or (pissa and n.endswith("base_layer.weight"))
    ]
    parallel.broadcast_([t for t in tensors if t.is_floating_point()])
    if parallel.rank > 0:
        # The arms of one process share an RNG start (same dropout masks: fair); the processes must not, or row 0 of
        # every shard would get the same mask. Rank 0 keeps the one-process stream.
        torch.manual_seed(seed * 65_537 + parallel.rank)


def equip(arm: Arm, model: Any, cfg: AblationConfig, names: dict[int, str], rng: torch.Tensor, cuda_rng: Any) -> None:
    """Give the active `arm` its initial-LoRA hash, trainable parameters, AdamW over CRMA's groups at its LR
    multiplier, schedule, clipper and RNG start (`names`: parameter id -> name in `model`)."""
    from peft import get_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    arm.init_hash = tensor_hash(get_peft_model_state_dict(model, adapter_name=arm.adapter))
    scale = arm.lr_scale
    groups = crma.param_groups(model, cfg.lr * scale, cfg.structural_lr * scale, cfg.gate_lr * scale, cfg.weight_decay)
    arm.params = [p for g in groups for p in g["params"]]
    arm.lora_params = [p for p in arm.params if "lora_" in names[id(p)]]
    arm.trainable = sum(p.numel() for p in arm.params)
    arm.optimizer = torch.optim.AdamW(groups, lr=cfg.lr * scale)
    arm.scheduler = get_linear_schedule_with_warmup(arm.optimizer, cfg.warmup_steps, cfg.steps)
    arm.clipper = ZClip(cfg.zclip) if arm.spec.zclip else None
    arm.rng, arm.cuda_rng = rng.clone(), cuda_rng

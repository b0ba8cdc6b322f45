"""`ArmSet`: one seed's arms on the shared base model — set-up, one lockstep training step per arm, adapters, receipt,
tear-down.

Fair by construction, and checked from live state: one seed, one LoRA initialisation (PiSSA decomposed once) copied
into every arm, the same batch handed to every arm, one RNG stream per arm started from the same state. What an arm
adds (CRMA, ZClip) is set up from its `ArmSpec` (see `arm_setup`); nothing in `train_step` asks which arm it is.

In a data-parallel launch (`distributed.DataParallel`) every process holds every arm (rank 0's initial weights are
broadcast, as DDP does), trains each on its rows of the batch, and sums the arm's gradients over the processes before
clipping (see `distributed`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import crma

from ..spec.arms import parse_arm
from ..spec.config import AblationConfig
from .arm import Arm, Batch
from .arm_setup import (
    SHARED_INIT,
    add_arm_adapters,
    check_model,
    equip,
    is_pissa,
    lora_config,
    matched_note,
    matched_rank,
    peft_init,
    replicate,
    restore_targets,
    snapshot_targets,
)
from .distributed import DataParallel, Shard
from .evaluation import EvalSet, heldout_loss
from .receipt import (
    batch_digest,
    build_receipt,
    group_hyperparameters,
    hyperparameter_digest,
    lora_facts,
    optimizer_facts,
    tensor_hash,
    trainable_facts,
)
from .records import EvalRecord, StepRecord

__all__ = ["Arm", "ArmSet", "Batch", "memory_mb"]


def memory_mb(device: torch.device) -> float:
    """Peak device memory (GPU) or the process's resident memory (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class ArmSet:
    """The arms of one seed on the shared model. Use as a context manager: set-up on entry, tear-down on exit (the
    base model is given back with its original weights, also after an error).

    Args:
        cfg (`AblationConfig`): the run's config.
        loaded (`LoadedModel`): the shared base model and tokenizer.
        seed (`int`): this seed.
        notes (`list[str]`): the run's notes; set-up appends fallbacks it takes.
        parallel (`DataParallel | None`): this process's place in a data-parallel launch; None in one process.
    """

    def __init__(
        self, cfg: AblationConfig, loaded: Any, seed: int, *, notes: list[str], parallel: DataParallel | None = None
    ):
        self.cfg, self.loaded, self.seed, self.notes = cfg, loaded, seed, notes
        self.parallel = parallel
        self.device = loaded.device
        self.arms = []
        for i, label in enumerate(cfg.arm_labels):
            parsed = parse_arm(label)
            self.arms.append(Arm(label, parsed.spec, f"arm{i}", lr_scale=parsed.lr_scale))
        self.model: Any = None
        self.matched: dict[str, int] = {}
        self.setup_facts: dict[str, dict[str, Any]] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._snapshot: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ArmSet:
        self._snapshot = snapshot_targets(self.loaded.model, list(self.cfg.lora_targets))
        self._tmp = tempfile.TemporaryDirectory(prefix="crma-init-")
        try:
            self.setup()
            self.setup_facts = self.facts()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teardown()

    def __iter__(self) -> Iterator[Arm]:
        """The arms still training (a diverged arm stops; the others go on)."""
        return (arm for arm in self.arms if not arm.diverged)

    @property
    def all_diverged(self) -> bool:
        """Every arm has diverged."""
        return all(arm.diverged for arm in self.arms)

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Wrap the base in peft, give every arm the same initial LoRA, attach CRMA where the arm has it, and build
        each arm's optimizer, schedule, clipper and RNG state."""
        from peft import get_peft_model

        cfg, base = self.cfg, self.loaded.model
        check_model(cfg, self.loaded, self.arms)
        if any(arm.spec.matched for arm in self.arms):
            self.matched = matched_rank(cfg, base)
            note = matched_note(cfg, self.matched)
            if note not in self.notes:
                self.notes.append(note)
        init = peft_init(cfg, self.loaded, self.notes)
        # Seed *before* get_peft_model: the LoRA init must be a function of the seed (LlamaFactory #5446). The shared
        # init lives in its own adapter, decomposed once; every arm copies it, then it is deleted.
        torch.manual_seed(self.seed)
        self.model = get_peft_model(base, lora_config(cfg, init), adapter_name=SHARED_INIT)
        add_arm_adapters(self.model, self.arms, cfg, self.seed, init, Path(self._tmp.name), self.matched)
        for arm in self.arms:
            if arm.spec.crma:  # the arm decides the mixing: the Sinkhorn one, or the identity of the control
                crma.attach(self.model, replace(cfg.crma, mixing=arm.spec.mixing), adapter_name=arm.adapter)
        if self.parallel is not None:
            replicate(self.model, self.parallel, self.seed, pissa=is_pissa(init))
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        names = {id(p): n for n, p in self.model.named_parameters()}
        for arm in self.arms:
            self.activate(arm)
            equip(arm, self.model, cfg, names, rng, cuda_rng)
        self.model.train()

    def activate(self, arm: Arm) -> None:
        """Make `arm`'s LoRA (and CRMA, or none) the active adapter."""
        self.model.set_adapter(arm.adapter)
        if arm.spec.crma:
            crma.set_active(self.model, arm.adapter)
        elif crma.active_adapter(self.model) is not None:
            crma.disable(self.model)

    # -- one step of one arm ------------------------------------------------------------------------------------
    def train_step(self, arm: Arm, batch: Batch) -> StepRecord:
        """Forward, backward, clip, optimizer and schedule step of one arm on `batch`; the record of that step."""
        cfg = self.cfg
        self.activate(arm)
        torch.set_rng_state(arm.rng)
        if arm.cuda_rng is not None:
            torch.cuda.set_rng_state_all(arm.cuda_rng)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # What this arm really trains with at this step, for the receipt.
        arm.batch_digests.append(batch_digest(batch.tensors, batch.loss_scale))
        groups = group_hyperparameters(arm.optimizer)
        arm.hyperparameter_digests.append(hyperparameter_digest(groups, crma_groups=False))
        arm.crma_hyperparameter_digests.append(hyperparameter_digest(groups, crma_groups=True))
        lr = arm.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        inputs = batch.inputs
        out = self.model(**inputs)
        loss = out.loss
        if batch.shard is not None:
            loss = self._shard_loss(out, batch.shard)
        (loss * batch.loss_scale if batch.loss_scale != 1.0 else loss).backward()
        if self.parallel is not None:
            self.parallel.sum_gradients(arm.params)  # now every process holds the whole batch's gradient
        lora_grads = [p.grad for p in arm.lora_params if p.grad is not None]
        lora_norm = torch.nn.utils.get_total_norm(lora_grads, 2.0).item() if lora_grads else None
        clip = arm.clip(cfg.max_grad_norm)
        # A host sync; the figure is logged anyway. Data parallel: the shards' weighted losses sum to the batch's.
        loss_value = self.parallel.sum(loss) if self.parallel is not None else loss.item()
        finite = math.isfinite(loss_value) and math.isfinite(clip.pre_norm)
        if finite:
            arm.optimizer.step()
            arm.scheduler.step()
        arm.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        arm.wall_s += elapsed
        arm.rng = torch.get_rng_state()
        arm.cuda_rng = torch.cuda.get_rng_state_all() if arm.cuda_rng is not None else None
        arm.tokens += batch.tokens
        arm.rows += int(inputs["input_ids"].shape[0])
        arm.diverged = not finite
        diag = None
        if arm.spec.crma and (batch.step % cfg.diag_every == 0 or batch.step in (1, cfg.steps)):
            diag = crma.mixing_report(self.model, arm.adapter).summary()
        return StepRecord(
            arm=arm.label,
            seed=self.seed,
            step=batch.step,
            loss=loss_value,
            grad_norm_pre=clip.pre_norm,
            grad_norm_post=clip.post_norm,
            clipped=clip.clipped,
            lr=lr,
            tokens=arm.tokens,
            step_time_s=elapsed,
            memory_mb=memory_mb(self.device),
            diverged=not finite,
            crma=diag,
            grad_norm_lora=lora_norm,
        )

    def evaluate(self, arm: Arm, eval_set: EvalSet, step: int) -> EvalRecord:
        """`arm`'s held-out loss on `eval_set` now, in eval mode under `no_grad`; training state and RNG untouched."""
        self.activate(arm)
        arm.eval_digests.append(f"{eval_set.split}:{eval_set.sha256[:16]}@{step}")
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        start = time.perf_counter()
        self.model.eval()
        try:
            loss = heldout_loss(self.model, eval_set)
        finally:
            self.model.train()
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        return EvalRecord(
            arm=arm.label,
            seed=self.seed,
            step=step,
            split=eval_set.split,
            loss=loss,
            tokens=eval_set.tokens,
            eval_s=time.perf_counter() - start,
        )

    @staticmethod
    def _shard_loss(out: Any, shard: Shard) -> torch.Tensor:
        """This shard's part of the batch's mean token loss: its own mean times its share of the loss tokens."""
        if shard.loss_tokens == 0 and shard.batch_loss_tokens > 0:
            # No loss token in these rows (the model's mean is NaN): add nothing, but keep the graph, so this process
            # has the same gradients to sum (zeros) as the others.
            return out.logits.sum() * 0.0
        return out.loss * shard.loss_share

    # -- what the arms really are ---------------------------------------------------------------------------------
    def facts(self) -> dict[str, dict[str, Any]]:
        """Each arm's live training facts (see `receipt`), read with the arm active."""
        out = {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for arm in self.arms:
            self.activate(arm)
            crma_cfg = None
            if crma.active_adapter(self.model) == arm.adapter:
                crma_cfg = crma.model.adapter_config(self.model, arm.adapter).to_dict()
            out[arm.label] = {
                "optimizer": optimizer_facts(arm.optimizer, names, arm.adapter),
                "lora": lora_facts(self.model.peft_config[arm.adapter]),
                "lora_init_sha256": arm.init_hash,
                "crma": crma_cfg,
                "clipper": arm.clipper_facts(self.cfg.max_grad_norm),
                "trainable": trainable_facts(self.model, arm.adapter),
                "batch_digests": list(arm.batch_digests),
                "hyperparameter_digests": list(arm.hyperparameter_digests),
                "crma_hyperparameter_digests": list(arm.crma_hyperparameter_digests),
                "eval_digests": list(arm.eval_digests),
                "steps": len(arm.batch_digests),
            }
        return out

    def setup_receipt(self, order_sha256: str) -> dict[str, Any]:
        """The receipt as it stands right after set-up (before any step): what each arm starts from and trains with."""
        return build_receipt(self.seed, self.setup_facts, self.setup_facts, order_sha256, base_lrs=self.base_lrs)

    @property
    def base_lrs(self) -> dict[str, float]:
        """The run's LR of each optimizer group; an arm's groups train at these times its multiplier."""
        return {"proj": self.cfg.lr, "structural": self.cfg.structural_lr, "gate": self.cfg.gate_lr}

    def state_hashes(self) -> dict[str, str]:
        """sha256 of each arm's trainable tensors now (equal on every process while the replicas are in sync)."""
        return {arm.label: tensor_hash({str(i): p.reshape(-1) for i, p in enumerate(arm.params)}) for arm in self.arms}

    def receipt(self, order_sha256: str) -> dict[str, Any]:
        """The fairness receipt of this seed: facts after set-up and now, and the verdict on both."""
        receipt = build_receipt(self.seed, self.setup_facts, self.facts(), order_sha256, base_lrs=self.base_lrs)
        if self.matched:
            receipt["matched_rank"] = dict(self.matched, lora_r=self.cfg.lora_r)
        return receipt

    # -- results ------------------------------------------------------------------------------------------------
    def save_adapters(self, root: Path) -> list[Path]:
        """Write every arm's adapter to `root/<arm>/`: a plain LoRA for the original base (PiSSA converted) and the
        CRMA files beside it."""
        written = []
        hub_id = getattr(self.loaded, "hub_id", None)
        for arm in self.arms:
            target = root / arm.label
            staging = Path(tempfile.mkdtemp(prefix="crma-save-"))
            try:
                self.model.peft_config[arm.adapter].base_model_name_or_path = hub_id
                kwargs = {}
                if arm.init_dir is not None:
                    kwargs["path_initial_model_for_weight_conversion"] = str(arm.init_dir)
                # save_embedding_layers=False: peft would otherwise look the base config up on the Hub to decide.
                self.model.save_pretrained(
                    staging, selected_adapters=[arm.adapter], save_embedding_layers=False, **kwargs
                )
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staging / arm.adapter), target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if arm.spec.crma:
                crma.save(self.model, target, adapter_name=arm.adapter)
            written.append(target)
        self.activate(self.arms[0])
        return written

    def teardown(self) -> None:
        """Remove every adapter, give the base model back with its original weights, drop the temp folder."""
        if self.model is not None:
            for arm in self.arms:
                if arm.spec.crma:
                    try:
                        crma.detach(self.model, arm.adapter)
                    except ValueError:  # set-up failed before this arm's CRMA was attached
                        pass
            self.loaded.model = self.model.unload()
            self.model = None
        restore_targets(self.loaded.model, self._snapshot)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

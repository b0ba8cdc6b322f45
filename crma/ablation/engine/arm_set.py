"""`ArmSet`: one seed's arms on the shared base model — set-up, one lockstep training step per arm, adapters, receipt,
tear-down.

Fair by construction, and checked from live state: one seed, one LoRA initialisation (PiSSA decomposed once) copied
into every arm, the same batch handed to every arm, one RNG stream per arm started from the same state. What an arm
adds (CRMA, ZClip) is set up from its `ArmSpec`; nothing in `train_step` asks which arm it is.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import crma
from crma import ZClip, clip_by_norm

from ..spec.arms import ArmSpec, parse_arm
from ..spec.config import AblationConfig
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

_SHARED_INIT = "shared_init"


@dataclass
class Batch:
    """What every arm trains on at one step.

    Args:
        step (`int`): 1-based step.
        tensors (`dict[str, Tensor]`): `input_ids`, `attention_mask`, `labels` on the model's device.
        indices (`list[int]`): the examples it holds.
        loss_scale (`float`): multiplier of the loss for backward (the spike stress step; 1 otherwise).
        shard (`Shard | None`): this process's rows in a data-parallel run (None: it trains on the whole batch).
    """

    step: int
    tensors: dict[str, torch.Tensor]
    indices: list[int]
    loss_scale: float = 1.0
    shard: Shard | None = None

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens of the whole batch, prompt and response."""
        return int(self.tensors["attention_mask"].sum())

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """What this process feeds the model: its shard's rows, or the whole batch."""
        return self.shard.tensors if self.shard is not None else self.tensors


@dataclass
class Arm:
    """One arm's live training state."""

    label: str
    spec: ArmSpec
    adapter: str  # internal peft / CRMA adapter name ("arm0", ...): module keys cannot hold '+' safely
    lr_scale: float = 1.0  # multiplies every optimizer group's LR (the label's `@x` part)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lora_params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    clipper: ZClip | None = None
    rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None
    tokens: int = 0
    rows: int = 0  # batch rows this process fed this arm (a data-parallel process: its shards only)
    diverged: bool = False
    init_hash: str = ""
    trainable: int = 0
    wall_s: float = 0.0
    init_dir: Path | None = None  # the initial adapter a trained PiSSA one is converted against when saved
    batch_digests: list[str] = field(default_factory=list)
    hyperparameter_digests: list[str] = field(default_factory=list)
    crma_hyperparameter_digests: list[str] = field(default_factory=list)
    eval_digests: list[str] = field(default_factory=list)  # which held-out slice it was evaluated on, and when

    def clip(self, max_grad_norm: float) -> crma.ClipResult:
        """Clip this arm's gradients with its clipper: ZClip, or the fixed norm clip."""
        if self.clipper is not None:
            return self.clipper.step(self.params)
        return clip_by_norm(self.params, max_grad_norm)

    def clipper_facts(self, max_grad_norm: float) -> dict[str, Any]:
        """The clipper this arm really uses, as the receipt records it."""
        if self.clipper is not None:
            return {"kind": "zclip", **self.clipper.config.to_dict()}
        return {"kind": "clip_grad_norm", "max_norm": max_grad_norm}


def memory_mb(device: torch.device) -> float:
    """Peak device memory (GPU) or the process's resident memory (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def snapshot_targets(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the weights LoRA targets: PiSSA rewrites them in place; every seed starts from the originals."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if any(name.endswith(t) for t in targets) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


@torch.no_grad()
def restore_targets(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put the weights of `snapshot_targets` back."""
    modules = dict(model.named_modules())
    for name, weight in snapshot.items():
        modules[name].weight.copy_(weight)


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
    def _lora_config(self, init: Any, *, rank: int | None = None) -> Any:
        from peft import LoraConfig

        cfg = self.cfg
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

    def _peft_init(self) -> Any:
        init = self.cfg.lora_init
        if init.startswith("pissa") and self.loaded.is_4bit:
            self.notes.append(
                "PiSSA needs full-precision weights (peft refuses 4-bit ones): on this 4-bit model every arm's LoRA "
                "starts from peft's Gaussian init (A ~ N(0, 1/r), B = 0) instead."
            )
            return "gaussian"
        return True if init == "default" else init

    def matched_rank(self, base: torch.nn.Module) -> dict[str, int]:
        """The smallest LoRA rank whose trainable parameters are ≥ those of `lora+crma` (LoRA at `lora_r` + CRMA),
        with the counts behind it."""
        from crma.model import expected_parameter_count

        cfg = self.cfg
        per_rank = sum(
            module.in_features + module.out_features
            for name, module in base.named_modules()
            if any(name.endswith(t) for t in cfg.lora_targets) and hasattr(module, "in_features")
        )
        layers, width = len(crma.utils.find_decoder_layers(base)), base.get_input_embeddings().weight.shape[1]
        target = per_rank * cfg.lora_r + expected_parameter_count(layers, width, cfg.crma)
        rank = math.ceil(target / per_rank)
        return {"rank": rank, "params": per_rank * rank, "lora_crma_params": target}

    def _save_init(self, adapter: str, name: str, init: Any) -> Path:
        # The initial PiSSA adapter: saving converts a trained one into a plain LoRA for the original base.
        self.model.peft_config[adapter].init_lora_weights = True
        self.model.save_pretrained(self._tmp.name, selected_adapters=[adapter])
        self.model.peft_config[adapter].init_lora_weights = init
        target = Path(self._tmp.name) / name
        (Path(self._tmp.name) / adapter).rename(target)
        return target

    def _add_matched(self, arm: Arm, initial: dict[str, torch.Tensor], rank: int) -> None:
        """A rank-`rank` LoRA whose first `lora_r` components are the shared init and whose extra ones start from
        peft's default (Kaiming-uniform A, zero B): the model is unchanged at step 0 and the base stays shared."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        r = self.cfg.lora_r
        torch.manual_seed(self.seed + 1)  # the extra components are a function of the seed too
        self.model.add_adapter(arm.adapter, self._lora_config(True, rank=rank))
        state = {
            k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=arm.adapter).items()
        }
        for key, value in initial.items():
            if "lora_A" in key:
                state[key][:r] = value
            elif "lora_B" in key:
                state[key][:, :r] = value
        set_peft_model_state_dict(self.model, state, adapter_name=arm.adapter)

    def setup(self) -> None:
        """Wrap the base in peft, give every arm the same initial LoRA, attach CRMA where the arm has it, and build
        each arm's optimizer, schedule, clipper and RNG state."""
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import get_linear_schedule_with_warmup

        cfg, base = self.cfg, self.loaded.model
        missing = [t for t in cfg.lora_targets if not any(n.endswith(t) for n, _ in base.named_modules())]
        if missing:
            raise ValueError(f"LoRA target module(s) {missing} do not exist in {self.loaded.name}")
        width = base.get_input_embeddings().weight.shape[1]
        if any(arm.spec.crma for arm in self.arms) and cfg.crma.rank > width:
            raise ValueError(
                f"CRMA rank must be at most the model width ({width}) of {self.loaded.name}; got {cfg.crma.rank}"
            )
        if any(arm.spec.matched for arm in self.arms):
            self.matched = m = self.matched_rank(base)
            note = (
                f"lora-matched: LoRA rank {cfg.lora_r} raised to {m['rank']} so its {m['params']:,} trainable "
                f"parameters are at least lora+crma's {m['lora_crma_params']:,}; its first {cfg.lora_r} components "
                "start from the shared init, the others from peft's default (zero B), so the model is unchanged at "
                "step 0."
            )
            if note not in self.notes:
                self.notes.append(note)
        peft_init = self._peft_init()
        pissa = isinstance(peft_init, str) and peft_init.startswith("pissa")
        # Seed *before* get_peft_model: the LoRA init must be a function of the seed (LlamaFactory #5446). The shared
        # init lives in its own adapter, decomposed once; every arm copies it, then it is deleted.
        torch.manual_seed(self.seed)
        self.model = get_peft_model(base, self._lora_config(peft_init), adapter_name=_SHARED_INIT)
        initial = {
            k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=_SHARED_INIT).items()
        }
        shared_dir = self._save_init(_SHARED_INIT, "pissa_init", peft_init) if pissa else None
        for arm in self.arms:
            # Every arm starts from the *same* LoRA weights on the *same* (once-mutated) base.
            if arm.spec.matched:
                self._add_matched(arm, initial, self.matched["rank"])
                arm.init_dir = self._save_init(arm.adapter, f"init_{arm.adapter}", False) if pissa else None
            else:
                self.model.add_adapter(arm.adapter, self._lora_config(False))
                set_peft_model_state_dict(self.model, initial, adapter_name=arm.adapter)
                arm.init_dir = shared_dir
        self.model.set_adapter(self.arms[0].adapter)
        self.model.delete_adapter(_SHARED_INIT)
        for arm in self.arms:
            if arm.spec.crma:  # the arm decides the mixing: the Sinkhorn one, or the identity of the control
                crma.attach(self.model, replace(cfg.crma, mixing=arm.spec.mixing), adapter_name=arm.adapter)
        if self.parallel is not None:
            self._replicate(pissa)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        names = {id(p): n for n, p in self.model.named_parameters()}
        for arm in self.arms:
            self.activate(arm)
            arm.init_hash = tensor_hash(get_peft_model_state_dict(self.model, adapter_name=arm.adapter))
            scale = arm.lr_scale
            groups = crma.param_groups(
                self.model, cfg.lr * scale, cfg.structural_lr * scale, cfg.gate_lr * scale, cfg.weight_decay
            )
            arm.params = [p for g in groups for p in g["params"]]
            arm.lora_params = [p for p in arm.params if "lora_" in names[id(p)]]
            arm.trainable = sum(p.numel() for p in arm.params)
            arm.optimizer = torch.optim.AdamW(groups, lr=cfg.lr * scale)
            arm.scheduler = get_linear_schedule_with_warmup(arm.optimizer, cfg.warmup_steps, cfg.steps)
            arm.clipper = ZClip(cfg.zclip) if arm.spec.zclip else None
            arm.rng, arm.cuda_rng = rng.clone(), cuda_rng
        self.model.train()

    def _replicate(self, pissa: bool) -> None:
        """Give every process rank 0's adapters (and PiSSA's rewritten base weights), as DDP does at construction,
        and a dropout stream of its own."""
        parallel = self.parallel
        tensors = [
            p
            for n, p in self.model.named_parameters()
            if "lora_" in n or n.rsplit(".", 1)[-1].startswith("crma_") or (pissa and n.endswith("base_layer.weight"))
        ]
        parallel.broadcast_([t for t in tensors if t.is_floating_point()])
        if parallel.rank > 0:
            # The arms of one process share an RNG start (same dropout masks: fair); the processes must not, or
            # row 0 of every shard would get the same mask. Rank 0 keeps the one-process stream.
            torch.manual_seed(self.seed * 65_537 + parallel.rank)

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

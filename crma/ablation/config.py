"""Configuration and record types of the paired ablation engine (no torch math here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from crma.config import JSONConfig

ARM_NAMES = ("lora", "lora+crma", "lora+zclip", "lora+mix")


@dataclass(frozen=True)
class ArmSpec:
    """What one arm adds to the shared LoRA: the CRMA mixing and/or ZClip (else a fixed norm clip).

    Args:
        name (`str`): one of `ARM_NAMES`.
        crma (`bool`): CRMA side channel attached and active for this arm.
        zclip (`bool`): ZClip adaptive clipping; otherwise `clip_grad_norm_(max_grad_norm)` as HF Trainer does.
    """

    name: str
    crma: bool
    zclip: bool


ARM_SPECS: dict[str, ArmSpec] = {
    "lora": ArmSpec("lora", crma=False, zclip=False),
    "lora+crma": ArmSpec("lora+crma", crma=True, zclip=True),
    "lora+zclip": ArmSpec("lora+zclip", crma=False, zclip=True),
    "lora+mix": ArmSpec("lora+mix", crma=True, zclip=False),
}


@dataclass
class AblationConfig(JSONConfig):
    """Everything that defines one paired ablation run; serialises to JSON and is stored with the results.

    Args:
        model (`str`): preset name (`tiny-random`, `smollm2-135m`, `tinyllama-1.1b`, `qwen2.5-0.5b`, `mistral-7b`)
            or a Hub model id (loaded without remote code).
        dataset (`str`): `bundled`, `alpaca`, or a path to a local JSON / JSONL / CSV file.
        start (`int`): first row of the slice.
        rows (`int`): number of rows in the slice.
        steps (`int`): optimizer steps per arm.
        seed (`int`): seed of the run (LoRA init, batch order, dropout); `seeds` overrides it with several.
        seeds (`list[int] | None`): run the whole ablation once per seed.
        arms (`list[str]`): arm names from `ARM_NAMES`; a name listed twice is an A/A control.
        lr (`float`): learning rate of LoRA and the CRMA projections.
        structural_lr (`float`): learning rate of CRMA's `log_mix`, read and write logits.
        gate_lr (`float`): learning rate of CRMA's gate `log_alpha`.
        weight_decay (`float`): decay of the projection group only.
        batch_size (`int`): rows per step.
        seq_len (`int`): tokens per row after truncation.
        lora_r, lora_alpha (`int`): LoRA rank and alpha.
        lora_targets (`list[str]`): module names LoRA adapts.
        lora_dropout (`float`): LoRA dropout (0 in the CRMA recipe).
        lora_init (`str`): peft `init_lora_weights` (`pissa_niter_4` as the author describes, or `gaussian`/`default`).
        max_grad_norm (`float`): fixed clip of the non-ZClip arms (HF Trainer's default 1.0).
        crma_streams, crma_rank (`int`): CRMA side channel size.
        zclip_alpha, zclip_z_thresh (`float`), zclip_warmup (`int`): ZClip settings (published defaults).
        warmup_steps (`int`): linear LR warm-up steps, then linear decay to 0 (HF Trainer's default schedule).
        spike_at (`int | None`): stress test: at this step every arm gets the same corrupted batch (random tokens)
            and its loss is multiplied by `spike_scale` for the backward pass, so a gradient spike happens even on a
            model whose loss on random tokens is not unusual (a random-init one); the logged loss is the unscaled one.
        spike_scale (`float`): gradient multiplier of the spike step.
        diag_every (`int`): steps between CRMA mixing diagnostics.
        device (`str`): `auto`, `cpu` or `cuda`.
        dtype (`str`): `auto` (bf16 on GPU, fp32 on CPU), `float32` or `bfloat16`.
        max_wall_s (`float | None`): stop all arms once this much wall time has passed.
        save_adapters (`bool`): write each arm's PEFT + CRMA files to `adapters/<arm>/`.
    """

    model: str = "smollm2-135m"
    dataset: str = "bundled"
    start: int = 0
    rows: int = 200
    steps: int = 40
    seed: int = 42
    seeds: list[int] | None = None
    arms: list[str] = field(default_factory=lambda: ["lora", "lora+crma"])
    lr: float = 2e-4
    structural_lr: float = 5e-3
    gate_lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2
    seq_len: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    lora_init: str = "pissa_niter_4"
    max_grad_norm: float = 1.0
    crma_streams: int = 3
    crma_rank: int = 4
    zclip_alpha: float = 0.97
    zclip_z_thresh: float = 2.5
    zclip_warmup: int = 25
    warmup_steps: int = 0
    spike_at: int | None = None
    spike_scale: float = 20.0
    diag_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_wall_s: float | None = None
    save_adapters: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, rule: str) -> None:
            if not cond:
                raise ValueError(f"`{name}` must be {rule}; got {getattr(self, name)!r}")

        for name in (
            "rows",
            "steps",
            "batch_size",
            "seq_len",
            "lora_r",
            "lora_alpha",
            "crma_streams",
            "crma_rank",
            "diag_every",
        ):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        need(isinstance(self.start, int) and self.start >= 0, "start", "an integer >= 0")
        need(isinstance(self.seed, int), "seed", "an integer")
        for name in ("lr", "structural_lr", "gate_lr", "max_grad_norm"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and 0 < value < 10, name, "a number in (0, 10)")
        need(0 <= self.weight_decay < 1, "weight_decay", "in [0, 1)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        need(0 < self.zclip_alpha < 1, "zclip_alpha", "in (0, 1)")
        need(self.zclip_z_thresh > 0, "zclip_z_thresh", "> 0")
        need(isinstance(self.zclip_warmup, int) and self.zclip_warmup >= 2, "zclip_warmup", "an integer >= 2")
        need(
            isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps,
            "warmup_steps",
            "an integer in [0, steps)",
        )
        need(
            self.spike_at is None or (isinstance(self.spike_at, int) and 1 <= self.spike_at <= self.steps),
            "spike_at",
            "None or a step in [1, steps]",
        )
        need(
            isinstance(self.spike_scale, (int, float)) and 1 <= self.spike_scale <= 1e4,
            "spike_scale",
            "a number in [1, 10000]",
        )
        need(
            self.seeds is None or (len(self.seeds) > 0 and all(isinstance(s, int) for s in self.seeds)),
            "seeds",
            "None or a non-empty list of integers",
        )
        need(
            len(self.arms) > 0 and all(a in ARM_SPECS for a in self.arms),
            "arms",
            f"a non-empty list drawn from {list(ARM_SPECS)}",
        )
        need(len(self.lora_targets) > 0, "lora_targets", "a non-empty list of module names")
        need(self.max_wall_s is None or self.max_wall_s > 0, "max_wall_s", "None or > 0")
        need(self.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", "'auto', 'float32' or 'bfloat16'")

    @property
    def seed_list(self) -> list[int]:
        """The seeds this run covers."""
        return list(self.seeds) if self.seeds else [self.seed]


@dataclass
class StepRecord:
    """One arm's optimizer step: the unit the engine yields, `metrics.jsonl` stores and the charts plot.

    Args:
        arm (`str`): arm label (`lora`, `lora+crma`, ...; A/A copies get `#2` suffixes).
        seed (`int`): the run's seed.
        step (`int`): 1-based optimizer step.
        loss (`float`): mean token loss of the batch (NaN/inf when the arm diverged).
        grad_norm_pre (`float`): global L2 norm of the arm's trainable gradients before clipping.
        grad_norm_post (`float`): the same after clipping.
        clipped (`bool`): whether the clipper scaled the gradients.
        lr (`float`): base learning rate used for this step.
        tokens (`int`): tokens (prompt and response, padding excluded) this arm has trained on so far.
        step_time_s (`float`): wall time of this arm's forward + backward + step.
        memory_mb (`float`): peak device memory (GPU) or process RSS (CPU) in MiB.
        diverged (`bool`): the loss or gradient was not finite; the arm stops after this record.
        crma (`dict | None`): mixing diagnostics summary every `diag_every` steps for CRMA arms.
        grad_norm_lora (`float | None`): pre-clip L2 norm of the LoRA parameters' gradients alone. `grad_norm_pre`
            covers every trainable parameter of the arm, CRMA's included, so it is not the same quantity across
            arms; this one is.
    """

    arm: str
    seed: int
    step: int
    loss: float
    grad_norm_pre: float
    grad_norm_post: float
    clipped: bool
    lr: float
    tokens: int
    step_time_s: float
    memory_mb: float
    diverged: bool = False
    crma: dict[str, Any] | None = None
    grad_norm_lora: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (one `metrics.jsonl` line)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        """Inverse of `to_dict()`."""
        return cls(**data)


@dataclass
class Phase:
    """A progress message between steps (loading the model, setting up a seed, writing files)."""

    message: str
    seed: int | None = None


@dataclass
class RunResult:
    """The end of a run: always yielded last, also when the run stopped or failed (partial records kept).

    Args:
        status (`"finished" | "stopped" | "failed"`): how the run ended.
        error (`str | None`): one-line reason when failed or stopped early for a cap.
        config (`AblationConfig`): the run's config.
        records (`list[StepRecord]`): every step record of every arm and seed.
        summary (`dict`): `summary.json` content (per-arm figures, deltas, seeds, fairness receipt).
        out_dir (`str | None`): folder holding the files, when one was given.
        files (`list[str]`): files written, relative to `out_dir`.
        notes (`list[str]`): honest remarks about the run (fallbacks taken, figures not available).
        wall_s (`float`): wall time of the whole run.
    """

    status: Literal["finished", "stopped", "failed"]
    error: str | None
    config: AblationConfig
    records: list[StepRecord]
    summary: dict[str, Any]
    out_dir: str | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

"""`AblationConfig`: everything that defines one paired ablation run. It nests the core's `CRMAConfig` and
`ZClipConfig`, so every CRMA and ZClip setting is ablatable, and it round-trips through JSON (`config.json`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from crma.config import CRMAConfig, JSONConfig, ZClipConfig, is_int, is_number, require

from .arms import ARM_SPECS, GRID_ARMS, arm_labels, parse_arm

MIN_SEQ_LEN = 2

# What `config.json` records about the launch beside the fields: read back, not a setting anyone chooses.
LAUNCH_KEYS = ("world_size",)
SEED_RANGE = (0, 2**32)  # torch.manual_seed and numpy both take this range
# PiSSA's randomized SVD runs niter power iterations over every target matrix: bounded, so no value can stall set-up.
LORA_INIT = re.compile(r"^(default|gaussian|pissa|pissa_niter_([1-9]|[12][0-9]|3[0-2]))$")


def _from_mapping(cls: type, value: Any) -> Any:
    # Nested configs arrive as dicts from JSON; they are built (and validated) by their own class.
    return cls.from_dict(value) if isinstance(value, dict) else value


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
        seeds (`list[int] | None`): run the whole ablation once per seed; a one-element list just sets `seed`.
        arms (`list[str]`): arm names; the default is the 2x2 grid `lora`, `lora+zclip`, `lora+mix`, `lora+crma`
            (`lora` vs `lora+crma` alone is the author's recipe: two changes at once); `lora-matched` is the capacity
            control, `lora+crma-nomix` the identity-mixing control; a name listed twice is an A/A control. A name may
            carry its own LR multiplier, `lora+crma@x0.3` (not together with `lr_grid`).
        lr_grid (`list[float]`): LR multipliers every arm trains at, in lockstep on the same batches (each multiplies
            all of the arm's LRs, so the ratios between its groups stay); with several, each arm's best one is chosen
            on the validation slice (`val_rows`) and the test slice reports it.
        eval_rows (`int`): rows of the held-out test slice, evaluated at step 0, every `eval_every` steps and at the
            end; 0 turns held-out evaluation off.
        val_rows (`int`): rows of the validation slice that chooses each arm's LR (needed when `lr_grid` has several
            multipliers; 0: none).
        eval_start (`int | None`): first row of the held-out slices (validation, then test); None: right after the
            training slice.
        eval_dataset (`str | None`): where the held-out slices come from (as `dataset`); None: the training data.
        eval_every (`int`): steps between held-out evaluations (0: only at step 0 and at the end).
        answer_rows (`int`): at the end, every arm and the base model answer this many held-out rows (the first of
            the test slice, greedy), for `summary.json`, the reports and the model card; 0: none.
        answer_tokens (`int`): new tokens each of those answers may have.
        lr (`float`): learning rate of LoRA and the CRMA projections.
        structural_lr (`float`): learning rate of CRMA's `log_mix`, read and write logits.
        gate_lr (`float`): learning rate of CRMA's gate `log_alpha`.
        weight_decay (`float`): decay of the projection group only.
        batch_size (`int`): rows per step.
        seq_len (`int`): tokens per row after truncation.
        lora_r (`int`): LoRA rank.
        lora_alpha (`int`): LoRA alpha (the update is scaled by alpha / r).
        lora_targets (`list[str]`): module names LoRA adapts.
        lora_dropout (`float`): LoRA dropout (0 in the CRMA recipe).
        lora_init (`str`): peft `init_lora_weights`: `pissa_niter_N` (N in 1..32) or `pissa` (as the author
            describes), `gaussian`, or `default` (peft's Kaiming-uniform A, zero B).
        max_grad_norm (`float`): fixed clip of the arms without ZClip (HF Trainer's default 1.0).
        crma (`CRMAConfig`): the CRMA side channel of the arms that have it (streams, rank, Sinkhorn, init).
        zclip (`ZClipConfig`): ZClip of the arms that have it (published defaults).
        warmup_steps (`int`): linear LR warm-up steps, then linear decay to 0 at the last step.
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
    arms: list[str] = field(default_factory=lambda: list(GRID_ARMS))
    lr_grid: list[float] = field(default_factory=lambda: [1.0])
    eval_rows: int = 32
    val_rows: int = 0
    eval_start: int | None = None
    eval_dataset: str | None = None
    eval_every: int = 20
    answer_rows: int = 3
    answer_tokens: int = 48
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
    crma: CRMAConfig = field(default_factory=CRMAConfig)
    zclip: ZClipConfig = field(default_factory=ZClipConfig)
    warmup_steps: int = 0
    spike_at: int | None = None
    spike_scale: float = 20.0
    diag_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_wall_s: float | None = None
    save_adapters: bool = True

    def __post_init__(self) -> None:
        self._check_parts()
        self._check_slice_and_seeds()
        self._check_arms()
        self._check_lr_grid()
        self._check_eval()
        self._check_training()
        self._check_runtime()

    def _each(self, test: Callable[[Any], bool], rule: str, *names: str) -> None:
        """`require(test(value), name, rule, value)` for each field in `names`."""
        for name in names:
            value = getattr(self, name)
            require(test(value), name, rule, value)

    def _check_parts(self) -> None:
        """The nested configs, the model, the data and the LoRA init."""
        self.crma = _from_mapping(CRMAConfig, self.crma)
        self.zclip = _from_mapping(ZClipConfig, self.zclip)
        require(isinstance(self.crma, CRMAConfig), "crma", "a CRMAConfig", self.crma)
        require(isinstance(self.zclip, ZClipConfig), "zclip", "a ZClipConfig", self.zclip)
        require(
            self.crma.mixing == "sinkhorn",
            "crma.mixing",
            "'sinkhorn' (each arm sets its own mixing: add the arm lora+crma-nomix for the identity)",
            self.crma.mixing,
        )
        self._each(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", "model", "dataset")
        require(
            isinstance(self.lora_init, str) and LORA_INIT.match(self.lora_init) is not None,
            "lora_init",
            "'default', 'gaussian', 'pissa' or 'pissa_niter_N' with N in 1..32",
            self.lora_init,
        )

    def _check_slice_and_seeds(self) -> None:
        """The sizes (slice, steps, batch, LoRA), the slice's start and the seeds."""
        sizes = ("rows", "steps", "batch_size", "lora_r", "lora_alpha", "diag_every")
        self._each(lambda v: is_int(v) and v > 0, "an integer ≥ 1", *sizes)
        # A row needs one prompt token and one response token to have a loss: the data layer checks the same rule.
        rule = f"an integer ≥ {MIN_SEQ_LEN} (a prompt token and a response token)"
        require(is_int(self.seq_len) and self.seq_len >= MIN_SEQ_LEN, "seq_len", rule, self.seq_len)
        require(is_int(self.start) and self.start >= 0, "start", "an integer ≥ 0", self.start)
        if isinstance(self.seeds, list) and len(self.seeds) == 1:
            self.seed, self.seeds = self.seeds[0], None  # one seed is just `seed`
        low, high = SEED_RANGE
        seed_ok = lambda s: is_int(s) and low <= s < high  # noqa: E731
        require(seed_ok(self.seed), "seed", "an integer in [0, 2^32)", self.seed)
        seeds = self.seeds
        require(
            seeds is None
            or (
                isinstance(seeds, list)
                and len(seeds) > 0
                and all(map(seed_ok, seeds))
                and len(set(seeds)) == len(seeds)
            ),
            "seeds",
            "None or a list of distinct integers in [0, 2^32)",
            seeds,
        )

    def _check_arms(self) -> None:
        require(isinstance(self.arms, list) and len(self.arms) > 0, "arms", "a non-empty list of arm names", self.arms)
        for entry in self.arms:
            try:
                parsed = parse_arm(entry)
            except ValueError:
                parsed = None
            require(
                parsed is not None and parsed.copy == 1,
                "arms",
                f"names from {list(ARM_SPECS)} (each may carry an LR multiplier, e.g. 'lora+crma@x3')",
                entry,
            )

    def _check_lr_grid(self) -> None:
        grid = self.lr_grid
        require(
            isinstance(grid, list)
            and 1 <= len(grid) <= 8
            and all(is_number(m) and 0 < m <= 100 for m in grid)
            and len(set(grid)) == len(grid),
            "lr_grid",
            "a list of 1 to 8 distinct multipliers in (0, 100]",
            grid,
        )
        self.lr_grid = [float(m) for m in grid]
        require(
            self.lr_grid == [1.0] or all("@x" not in arm for arm in self.arms),
            "arms",
            "plain arm names when lr_grid sets the multipliers (drop the '@x' suffixes, or lr_grid)",
            self.arms,
        )

    def _check_eval(self) -> None:
        """The held-out slices (sizes, start, data; clear of the training rows), their schedule and the answers."""
        counts = ("eval_rows", "val_rows", "eval_every", "answer_rows")
        self._each(lambda v: is_int(v) and v >= 0, "an integer ≥ 0", *counts)
        self._each(lambda v: is_int(v) and 1 <= v <= 1024, "an integer in [1, 1024]", "answer_tokens")
        self._each(lambda v: v is None or (is_int(v) and v >= 0), "None or an integer ≥ 0", "eval_start")
        named = lambda v: isinstance(v, str) and v.strip() != ""  # noqa: E731
        self._each(lambda v: v is None or named(v), "None or a non-empty string", "eval_dataset")
        require(
            len(self.lr_grid) == 1 or (self.val_rows > 0 and self.eval_rows > 0),
            "val_rows",
            "≥ 1, with eval_rows ≥ 1, when lr_grid has several multipliers (each arm's LR is chosen on the validation "
            "slice and reported on the test slice)",
            self.val_rows,
        )
        if self.eval_start is None and self.eval_dataset is None:
            return
        same_data = self.eval_dataset is None or self.eval_dataset == self.dataset
        first = self.eval_start if self.eval_start is not None else 0
        last = first + self.val_rows + self.eval_rows
        require(
            not same_data or last <= self.start or first >= self.start + self.rows,
            "eval_start",
            f"outside the training rows {self.start}–{self.start + self.rows - 1} (the held-out rows "
            f"{first}–{last - 1} would overlap them)",
            self.eval_start,
        )

    def _check_training(self) -> None:
        """The optimizer, LoRA's targets and dropout, the warm-up and the spike stress step."""
        rates = ("lr", "structural_lr", "gate_lr", "max_grad_norm")
        self._each(lambda v: is_number(v) and 0 < v < 10, "a number in (0, 10)", *rates)
        self._each(lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)", "weight_decay", "lora_dropout")
        require(
            isinstance(self.lora_targets, list)
            and len(self.lora_targets) > 0
            and all(isinstance(t, str) and t.strip() for t in self.lora_targets),
            "lora_targets",
            "a non-empty list of module names",
            self.lora_targets,
        )
        steps = self.steps
        self._each(lambda v: is_int(v) and 0 <= v < steps, "an integer in [0, steps)", "warmup_steps")
        self._each(lambda v: v is None or (is_int(v) and 1 <= v <= steps), "None or a step in [1, steps]", "spike_at")
        self._each(lambda v: is_number(v) and 1 <= v <= 1e4, "a number in [1, 10000]", "spike_scale")

    def _check_runtime(self) -> None:
        self._each(lambda v: v is None or (is_number(v) and v > 0), "None or a number > 0", "max_wall_s")
        self._each(lambda v: v in ("auto", "cpu", "cuda"), "'auto', 'cpu' or 'cuda'", "device")
        self._each(lambda v: v in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'", "dtype")
        self._each(lambda v: isinstance(v, bool), "true or false", "save_adapters")

    def slices(self) -> dict[str, tuple[str, int, int]]:
        """`{split: (dataset, start, rows)}` of the training slice and the held-out ones (`val`, `test`) in use."""
        out = {"train": (self.dataset, self.start, self.rows)}
        data = self.eval_dataset or self.dataset
        first = (
            self.eval_start if self.eval_start is not None else (self.start + self.rows if data == self.dataset else 0)
        )
        if self.val_rows:
            out["val"] = (data, first, self.val_rows)
        if self.eval_rows:
            out["test"] = (data, first + self.val_rows, self.eval_rows)
        return out

    @property
    def arm_labels(self) -> list[str]:
        """The run's arm labels: every arm at every multiplier of `lr_grid`, A/A copies numbered."""
        return arm_labels(self.arms, self.lr_grid)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationConfig:
        """Build from a dict (a run's `config.json` included); unknown keys are an error naming them, except the
        launch facts `config.json` records beside the fields (`LAUNCH_KEYS`), which are skipped."""
        return super().from_dict({k: v for k, v in data.items() if k not in LAUNCH_KEYS})

    @property
    def seed_list(self) -> list[int]:
        """The seeds this run covers."""
        return list(self.seeds) if self.seeds else [self.seed]

"""The paired ablation loop: every arm trains on one shared base model, step by step, in lockstep.

Fair by construction: one seed, one PiSSA decomposition copied into every arm's LoRA, one batch object per step
handed to every arm, one RNG stream per arm started from the same state. The adapter (CRMA on/off, ZClip or a
fixed norm clip) is the only difference, and the fairness receipt records the evidence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import crma
from crma import CRMAConfig, ZClip, ZClipConfig, clip_by_norm

from .config import ARM_SPECS, AblationConfig, ArmSpec, Phase, RunResult, StepRecord

Event = StepRecord | Phase | RunResult
logger = logging.getLogger(__name__)


def arm_labels(arms: list[str]) -> list[str]:
    """Unique labels for the requested arms: a repeated arm becomes an A/A copy `name#2`, `name#3`, ..."""
    seen: dict[str, int] = {}
    labels = []
    for arm in arms:
        seen[arm] = seen.get(arm, 0) + 1
        labels.append(arm if seen[arm] == 1 else f"{arm}#{seen[arm]}")
    return labels


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes of a dict of tensors (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


@dataclass
class _Arm:
    label: str
    spec: ArmSpec
    adapter: str  # internal peft / CRMA adapter name ("arm0", ...): module keys cannot hold '+' safely
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lora_params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    clipper: ZClip | None = None
    rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None
    tokens: int = 0
    diverged: bool = False
    order_digest: Any = field(default_factory=hashlib.sha256)
    init_hash: str = ""
    trainable: int = 0
    wall_s: float = 0.0

    def effective_config(self, cfg: AblationConfig) -> dict[str, Any]:
        """Every setting this arm trains with; arms may differ only in the adapter keys."""
        shared = {k: v for k, v in cfg.to_dict().items() if k not in ("arms", "seeds", "out")}
        adapter = {
            "crma": self.spec.crma,
            "crma_streams": cfg.crma_streams if self.spec.crma else None,
            "crma_rank": cfg.crma_rank if self.spec.crma else None,
            "structural_lr": cfg.structural_lr if self.spec.crma else None,
            "gate_lr": cfg.gate_lr if self.spec.crma else None,
            "clipper": "zclip" if self.spec.zclip else f"clip_grad_norm({cfg.max_grad_norm})",
            "zclip": {"alpha": cfg.zclip_alpha, "z_thresh": cfg.zclip_z_thresh, "warmup": cfg.zclip_warmup}
            if self.spec.zclip
            else None,
        }
        for key in (
            "crma_streams",
            "crma_rank",
            "structural_lr",
            "gate_lr",
            "max_grad_norm",
            "zclip_alpha",
            "zclip_z_thresh",
            "zclip_warmup",
        ):
            shared.pop(key, None)
        return {**shared, **adapter}


def config_diff(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keys whose values differ between arms, with each arm's value: {key: {arm: value}}."""
    keys = sorted({k for c in configs.values() for k in c})
    diff = {}
    for key in keys:
        values = {arm: c.get(key) for arm, c in configs.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            diff[key] = values
    return diff


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _lr_lambda(cfg: AblationConfig):
    # HF Trainer's default: linear warm-up, then linear decay to 0 at the last step.
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    return factor


class _Session:
    """One seed's worth of arms on the shared model: set-up, the lockstep steps, saving, tear-down."""

    def __init__(self, cfg: AblationConfig, loaded: Any, examples: list[Any], seed: int, notes: list[str]):
        self.cfg, self.loaded, self.examples, self.seed, self.notes = cfg, loaded, examples, seed, notes
        self.device = loaded.device
        self.labels = arm_labels(cfg.arms)
        self.arms = [
            _Arm(label, ARM_SPECS[arm], f"arm{i}")
            for i, (label, arm) in enumerate(zip(self.labels, cfg.arms, strict=True))
        ]
        self.model: Any = None
        self.init_dir: Path | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="crma-init-")

    # -- set-up -----------------------------------------------------------------------------------------------
    def lora_config(self, init: Any):
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.lora_r,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=list(self.cfg.lora_targets),
            init_lora_weights=init,
            task_type="CAUSAL_LM",
        )

    def setup(self) -> None:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        cfg, base = self.cfg, self.loaded.model
        init = cfg.lora_init
        if init.startswith("pissa") and self.loaded.is_4bit:
            init = "gaussian"
            self.notes.append(
                "PiSSA needs full-precision weights (peft refuses 4-bit ones): on this 4-bit model every arm's LoRA "
                "starts from peft's default init instead."
            )
        peft_init: Any = True if init == "default" else init
        first = self.arms[0]
        # Seed *before* get_peft_model: the LoRA init must be a function of the seed (LlamaFactory #5446).
        torch.manual_seed(self.seed)
        missing = [t for t in cfg.lora_targets if not any(n.endswith(t) for n, _ in base.named_modules())]
        if missing:
            raise ValueError(f"LoRA target module(s) {missing} do not exist in {self.loaded.name}")
        self.model = get_peft_model(base, self.lora_config(peft_init), adapter_name=first.adapter)
        initial = get_peft_model_state_dict(self.model, adapter_name=first.adapter)
        initial = {k: v.detach().clone() for k, v in initial.items()}
        if isinstance(peft_init, str) and peft_init.startswith("pissa"):
            # Keep the initial PiSSA adapter: saving converts the trained one into a plain LoRA for the original base.
            self.model.peft_config[first.adapter].init_lora_weights = True
            self.model.save_pretrained(self._tmp.name, selected_adapters=[first.adapter])
            self.model.peft_config[first.adapter].init_lora_weights = peft_init
            self.init_dir = Path(self._tmp.name) / "pissa_init"
            (Path(self._tmp.name) / first.adapter).rename(self.init_dir)
        for arm in self.arms[1:]:
            # Every arm starts from the *same* LoRA weights on the *same* (once-mutated) base.
            self.model.add_adapter(arm.adapter, self.lora_config(False))
            set_peft_model_state_dict(self.model, initial, adapter_name=arm.adapter)
        crma_cfg = CRMAConfig(n_streams=cfg.crma_streams, rank=cfg.crma_rank)
        for arm in self.arms:
            if arm.spec.crma:
                crma.attach(self.model, crma_cfg, adapter_name=arm.adapter)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        names = {id(p): n for n, p in self.model.named_parameters()}
        for arm in self.arms:
            self.activate(arm)
            arm.init_hash = tensor_hash(get_peft_model_state_dict(self.model, adapter_name=arm.adapter))
            groups = crma.param_groups(self.model, cfg.lr, cfg.structural_lr, cfg.gate_lr, cfg.weight_decay)
            arm.params = [p for g in groups for p in g["params"]]
            arm.lora_params = [p for p in arm.params if "lora_" in names[id(p)]]
            arm.trainable = sum(p.numel() for p in arm.params)
            arm.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
            arm.scheduler = torch.optim.lr_scheduler.LambdaLR(arm.optimizer, _lr_lambda(cfg))
            if arm.spec.zclip:
                arm.clipper = ZClip(
                    ZClipConfig(alpha=cfg.zclip_alpha, z_thresh=cfg.zclip_z_thresh, warmup_steps=cfg.zclip_warmup)
                )
            arm.rng, arm.cuda_rng = rng.clone(), cuda_rng
        self.model.train()

    def activate(self, arm: _Arm) -> None:
        self.model.set_adapter(arm.adapter)
        if arm.spec.crma:
            crma.set_active(self.model, arm.adapter)
        elif crma.active_adapter(self.model) is not None:
            crma.disable(self.model)

    # -- one lockstep step ------------------------------------------------------------------------------------
    def step(
        self, step: int, batch: dict[str, torch.Tensor], indices: list[int], *, loss_scale: float = 1.0
    ) -> Iterator[StepRecord]:
        cfg = self.cfg
        seen_tokens = int(batch["attention_mask"].sum())  # prompt and response, padding excluded
        for arm in self.arms:
            if arm.diverged:
                continue
            self.activate(arm)
            torch.set_rng_state(arm.rng)
            if arm.cuda_rng is not None:
                torch.cuda.set_rng_state_all(arm.cuda_rng)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            lr = arm.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            loss = self.model(**batch).loss
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            lora_grads = [p.grad for p in arm.lora_params if p.grad is not None]
            lora_norm = torch.nn.utils.get_total_norm(lora_grads, 2.0).item() if lora_grads else None
            clip = arm.clipper.step(arm.params) if arm.clipper else clip_by_norm(arm.params, cfg.max_grad_norm)
            loss_value = loss.item()
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
            arm.tokens += seen_tokens
            arm.order_digest.update(json.dumps([step, indices]).encode())
            diag = None
            if arm.spec.crma and (step % cfg.diag_every == 0 or step == 1 or step == cfg.steps):
                diag = crma.mixing_report(self.model, arm.adapter).summary()
            arm.diverged = not finite
            yield StepRecord(
                arm=arm.label,
                seed=self.seed,
                step=step,
                loss=loss_value,
                grad_norm_pre=clip.pre_norm,
                grad_norm_post=clip.post_norm,
                clipped=clip.clipped,
                lr=lr,
                tokens=arm.tokens,
                step_time_s=elapsed,
                memory_mb=_memory_mb(self.device),
                diverged=not finite,
                crma=diag,
                grad_norm_lora=lora_norm,
            )

    # -- results ------------------------------------------------------------------------------------------------
    def receipt(self, order_hash: str) -> dict[str, Any]:
        configs = {arm.label: arm.effective_config(self.cfg) for arm in self.arms}
        inits = {arm.label: arm.init_hash for arm in self.arms}
        orders = {arm.label: arm.order_digest.hexdigest() for arm in self.arms}
        return {
            "seed": self.seed,
            "lora_init_sha256": inits,
            "lora_init_equal": len(set(inits.values())) == 1,
            "batch_order_sha256": order_hash,
            "batches_seen_sha256": orders,
            "batches_seen_equal": len(set(orders.values())) == 1
            or any(arm.diverged for arm in self.arms),  # a diverged arm stops early and sees fewer batches
            "config_diff": config_diff(configs),
            "differs_only_in_adapter": set(config_diff(configs))
            <= {"crma", "crma_streams", "crma_rank", "structural_lr", "gate_lr", "clipper", "zclip"},
        }

    def save_adapters(self, root: Path) -> list[Path]:
        written = []
        hub_id = getattr(self.loaded, "hub_id", None)
        for arm in self.arms:
            target = root / arm.label
            staging = Path(tempfile.mkdtemp(prefix="crma-save-"))
            try:
                self.model.peft_config[arm.adapter].base_model_name_or_path = hub_id
                kwargs = {}
                if self.init_dir is not None:
                    kwargs["path_initial_model_for_weight_conversion"] = str(self.init_dir)
                # save_embedding_layers=False: peft would otherwise look the base config up on the Hub to decide.
                self.model.save_pretrained(
                    staging, selected_adapters=[arm.adapter], save_embedding_layers=False, **kwargs
                )
                if target.exists():
                    shutil.rmtree(target)
                shutil.move(str(staging / arm.adapter), target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if arm.spec.crma:
                crma.save(self.model, target, adapter_name=arm.adapter)
            written.append(target)
        self.activate(self.arms[0])
        return written

    def teardown(self) -> Any:
        """Remove every adapter and give back the base model (PiSSA's mutated weights restored by the caller)."""
        for arm in self.arms:
            if arm.spec.crma:
                crma.detach(self.model, arm.adapter)
        base = self.model.unload()
        self._tmp.cleanup()
        return base


def _snapshot_targets(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    # PiSSA rewrites the targeted base weights in place; keep the originals to restore between seeds and runs.
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if any(name.endswith(t) for t in targets) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


@torch.no_grad()
def _restore_targets(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, weight in snapshot.items():
        modules[name].weight.copy_(weight)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_ablation(
    cfg: AblationConfig,
    *,
    out_dir: str | Path | None = None,
    stop: threading.Event | None = None,
    loaded: Any = None,
) -> Iterator[Event]:
    """Run the paired ablation and yield `Phase` messages, one `StepRecord` per arm per step, then a `RunResult`.

    Args:
        cfg (`AblationConfig`): what to run.
        out_dir (`str | Path | None`): where `config.json`, `metrics.jsonl`, `summary.json`, `summary.md`,
            `report.html`, the PNG charts and `adapters/<arm>/` go (nothing is written when None).
        stop (`threading.Event | None`): when set, every arm stops at the next step boundary; results so far are kept.
        loaded (`LoadedModel | None`): an already loaded model to reuse (its weights are restored afterwards).

    Returns:
        An iterator of events; the last one is always a `RunResult` (status finished / stopped / failed). Errors
        in the config, the model or the data end the run as `failed` with a one-line message; they are not raised.
    """
    from .data import batch_order, build_examples, collate, corrupt_batch, load_instruction_rows, order_hash
    from .models import load_model
    from .report import write_metrics_jsonl

    stop = stop or threading.Event()
    started = time.perf_counter()
    records: list[StepRecord] = []
    notes: list[str] = []
    status, error = "finished", None
    out = Path(out_dir) if out_dir is not None else None
    metrics_path: Path | None = None
    receipts: list[dict[str, Any]] = []
    arm_info: dict[str, dict[str, Any]] = {}
    sessions_saved: list[str] = []
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(cfg.to_json())
            metrics_path = out / "metrics.jsonl"
            metrics_path.write_text("")  # appended to step by step, so a crash still leaves every finished step
        if loaded is None:
            yield Phase(f"loading model {cfg.model}")
            loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        yield Phase(f"reading {cfg.rows} rows of {cfg.dataset} from row {cfg.start}")
        rows = load_instruction_rows(cfg.dataset, start=cfg.start, rows=cfg.rows)
        examples = build_examples(rows, loaded.tokenizer, seq_len=cfg.seq_len, row_offset=cfg.start)
        pad_id = loaded.tokenizer.pad_token_id
        vocab = loaded.model.get_input_embeddings().weight.shape[0]
        snapshot = _snapshot_targets(loaded.model, list(cfg.lora_targets))
        for seed in cfg.seed_list:
            if stop.is_set():
                break
            yield Phase(f"seed {seed}: setting up {len(cfg.arms)} arms", seed=seed)
            session = _Session(cfg, loaded, examples, seed, notes)
            try:
                session.setup()
                order = batch_order(len(examples), batch_size=cfg.batch_size, steps=cfg.steps, seed=seed)
                for step in range(1, cfg.steps + 1):
                    if stop.is_set():
                        status, error = "stopped", "stopped by request"
                        break
                    if cfg.max_wall_s is not None and time.perf_counter() - started > cfg.max_wall_s:
                        status, error = "stopped", f"time cap of {cfg.max_wall_s:.0f} s reached"
                        break
                    indices = order[step - 1]
                    batch = collate(examples, indices, pad_id=pad_id)
                    spike = cfg.spike_at == step
                    if spike:
                        batch = corrupt_batch(batch, vocab_size=vocab, seed=seed)
                    batch = {k: v.to(loaded.device) for k, v in batch.items()}
                    for record in session.step(step, batch, indices, loss_scale=cfg.spike_scale if spike else 1.0):
                        records.append(record)
                        if metrics_path is not None:
                            write_metrics_jsonl([record], metrics_path, append=True)
                        yield record
                    if all(arm.diverged for arm in session.arms):
                        notes.append(f"seed {seed}: every arm diverged by step {step}")
                        break
                receipts.append(session.receipt(order_hash(order)))
                for arm in session.arms:
                    info = arm_info.setdefault(arm.label, {"trainable_params": arm.trainable, "wall_s": 0.0})
                    info["wall_s"] += arm.wall_s
                if out is not None and cfg.save_adapters:
                    yield Phase(f"seed {seed}: saving adapters", seed=seed)
                    root = out / "adapters" if len(cfg.seed_list) == 1 else out / "adapters" / f"seed-{seed}"
                    session.save_adapters(root)
                    sessions_saved.append(str(root.relative_to(out)))
            finally:
                if session.model is not None:
                    loaded.model = session.teardown()
                _restore_targets(loaded.model, snapshot)
            if status != "finished":
                break
    except (ValueError, FileNotFoundError, OSError) as exc:  # config, model, data: the message says what is wrong
        status, error = "failed", str(exc)
    except Exception as exc:  # anything else still ends as a failed run whose finished steps are written out
        status = "failed"
        if _is_oom(exc):
            error = (
                "out of memory: lower batch_size or seq_len, use fewer arms, or pick a smaller model "
                f"({str(exc).splitlines()[0][:160]})"
            )
        else:
            logger.exception("ablation run failed")
            error = f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = _summarize(records, cfg, receipts, arm_info, notes)
    result = RunResult(
        status=status,
        error=error,
        config=cfg,
        records=records,
        summary=summary,
        out_dir=str(out) if out is not None else None,
        notes=notes,
        wall_s=time.perf_counter() - started,
    )
    if out is not None:
        yield Phase("writing the report")
        result.files = write_outputs(result, out)
    yield result


def _summarize(
    records: list[StepRecord],
    cfg: AblationConfig,
    receipts: list[dict[str, Any]],
    arm_info: dict[str, dict[str, Any]],
    notes: list[str],
) -> dict[str, Any]:
    from .report import summarize_run

    labels = arm_labels(cfg.arms)
    baseline = "lora" if "lora" in labels else labels[0]
    summary = summarize_run(records, baseline=baseline, arm_info=arm_info) if records else {"arms": {}}
    summary["baseline"] = baseline
    summary["receipt"] = receipts[0] if len(receipts) == 1 else {"per_seed": receipts}
    summary["notes"] = list(notes)
    return summary


def write_outputs(result: RunResult, out: Path) -> list[str]:
    """Write summary.json, summary.md, report.html and the PNG charts; return every file in `out`, relative."""
    from .report import summary_markdown, write_metrics_csv, write_png_charts, write_report_html

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(result.config.to_json())
    summary = dict(result.summary)
    summary.update(status=result.status, error=result.error, wall_s=result.wall_s)
    title = f"{' vs '.join(arm_labels(result.config.arms))} on {result.config.model}"
    (out / "summary.md").write_text(
        summary_markdown(summary, title=title)
        if result.records
        else f"# {title}\n\nNo step finished: {result.error}\n"
    )
    if result.records:
        write_metrics_csv(result.records, out / "metrics.csv")
        write_report_html(result.records, summary, out / "report.html", title=title, config=result.config.to_dict())
        try:
            write_png_charts(result.records, out)
        except RuntimeError as exc:  # no Chrome for static export: the HTML report still has every chart
            result.notes.append(f"PNG charts not written: {exc}")
    summary["notes"] = list(result.notes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    result.summary = summary
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

"""`python -m crma ablate ...`: the headless entry point of the paired ablation."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import AblationConfig, Phase, RunResult, StepRecord

_LIST_FIELDS = {"arms", "lora_targets"}


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: one flag per `AblationConfig` field, plus --config and --out."""
    parser = argparse.ArgumentParser(prog="python -m crma", description="CRMA Lab: paired LoRA vs LoRA+CRMA ablations")
    sub = parser.add_subparsers(dest="command", required=True)
    ablate = sub.add_parser("ablate", help="run arms side by side on the same seed, data and hyperparameters")
    ablate.add_argument("--config", type=Path, help="JSON file with AblationConfig fields (flags override it)")
    ablate.add_argument("--out", type=Path, default=Path("runs/latest"), help="output folder (default runs/latest)")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(AblationConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "seeds":
            ablate.add_argument(flag, type=_int_list, default=None, help="comma-separated seeds, e.g. 1,2,3")
        elif f.name in _LIST_FIELDS:
            ablate.add_argument(flag, default=None, help="comma-separated list")
        elif f.name == "save_adapters":
            ablate.add_argument(
                "--no-save-adapters",
                dest="save_adapters",
                action="store_const",
                const=False,
                default=None,
                help="do not write adapters/<arm>/",
            )
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0].split("|")[0].strip(), str)
            ablate.add_argument(flag, type=kind, default=None)
    return parser


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    """Merge --config FILE with the flags given on the command line (flags win)."""
    data: dict[str, Any] = {}
    if args.config is not None:
        try:
            data = json.loads(args.config.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {args.config} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {args.config} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {args.config} must hold a JSON object of AblationConfig fields")
    for f in fields(AblationConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in _LIST_FIELDS:
            value = [x.strip() for x in value.split(",") if x.strip()]
        data[f.name] = value
    return AblationConfig.from_dict(data)


def run_cli(argv: list[str] | None = None) -> int:
    """Parse, run, print the summary table; return the process exit code (0 ok, 1 stopped/failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from .engine import arm_labels, run_ablation

    total = cfg.steps * len(cfg.arms) * len(cfg.seed_list)
    bar = tqdm(total=total, unit="step", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    result: RunResult | None = None
    try:
        for event in run_ablation(cfg, out_dir=args.out):
            if isinstance(event, Phase):
                bar.set_description(event.message[:40])
            elif isinstance(event, StepRecord):
                bar.update(1)
                bar.set_postfix_str(f"{event.arm} loss {event.loss:.3f} |g| {event.grad_norm_pre:.2f}")
            elif isinstance(event, RunResult):
                result = event
    except KeyboardInterrupt:
        bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if result is None:  # pragma: no cover - run_ablation always ends with a RunResult
        return 1
    if result.status == "failed":
        print(f"error: {result.error}", file=sys.stderr)
        return 1 if result.records else 2
    summary_md = args.out / "summary.md"
    if summary_md.exists():
        print(summary_md.read_text())
    for note in result.notes:
        print(f"note: {note}")
    print(f"{result.status}: {len(result.records)} records of {', '.join(arm_labels(cfg.arms))} in {args.out}/")
    return 0 if result.status == "finished" else 1

"""`python -m crma ablate ...`: the headless entry point of the paired ablation. Every flag comes from the config
schema (`schema.py`), so the CLI, `--config` files, the app's form and the `/ablate` API read values the same way.

`accelerate launch -m crma ablate ...` (or `torchrun -m crma ablate ...`) with several processes runs the same
ablation data-parallel (see `distributed`): one set of files, written by the main process, which alone shows
progress. `--report-to` hands the step metrics to trackio / W&B / TensorBoard (see `trackers`); like `--out`, it is a
flag of this command, not a config field."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .engine.records import Phase, RunResult, StepRecord
from .output.trackers import REPORT_TO, TrackerConfig, require_tracker
from .spec.config import LAUNCH_KEYS, AblationConfig
from .spec.schema import ConfigError, field_spec, parse_config, schema

EXIT_OK, EXIT_STOPPED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: one flag per config field (nested CRMA / ZClip fields included), plus --config,
    --out, --overwrite and --no-progress."""
    parser = argparse.ArgumentParser(prog="python -m crma", description="CRMA Lab: paired LoRA vs LoRA+CRMA ablations")
    sub = parser.add_subparsers(dest="command", required=True)
    ablate = sub.add_parser("ablate", help="run arms side by side on the same seed, data and hyperparameters")
    ablate.add_argument("--config", type=Path, help="JSON file of settings (flags given as well override it)")
    ablate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: a new runs/<time>-<model>, linked as runs/latest)",
    )
    ablate.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bar")
    ablate.add_argument("--no-charts", action="store_true", help="no PNG charts (report.html still has every chart)")
    ablate.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default="none",
        help="also log every arm's step metrics to this tracker, one run per arm and seed (default: none)",
    )
    ablate.add_argument(
        "--report-project",
        default="crma-ablation",
        metavar="NAME",
        help="trackio / W&B project of --report-to (default: crma-ablation); the runs are grouped by --out's name",
    )
    study = sub.add_parser(
        "study",
        help="the published study: the controls at each arm's best LR, held-out loss, 5 seeds, plain and spike",
    )
    study.add_argument("--out", type=Path, default=Path("assets/study"), help="published study (default assets/study)")
    study.add_argument("--work", type=Path, default=Path("runs/study"), help="every run's files (default runs/study)")
    study.add_argument("--toy", action="store_true", help="the same protocol at toy size (tiny model, 2 seeds)")
    study.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2,3,4,5)")
    study.add_argument("--steps", type=int, default=None, help="steps per arm (default 80)")
    study.add_argument("--spike-at", type=int, default=None, help="the stress condition's spike step (default 50)")
    study.add_argument(
        "--overwrite", action="store_true", help="run every cell afresh (by default finished cells are kept)"
    )
    study.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate = sub.add_parser(
        "generate", help="every arm of a finished run folder (and the base model) answers a prompt, side by side"
    )
    generate.add_argument("run", type=Path, help="a finished run folder (from `ablate`, the Space, or the Hub)")
    generate.add_argument("--prompt", required=True, help="the instruction, as a row of the data set would hold it")
    generate.add_argument("--input", default="", help="the row's input, if the instruction needs one")
    generate.add_argument("--arms", default=None, help="comma-separated arm labels (default: every arm)")
    generate.add_argument("--no-base", action="store_true", help="leave out the base model's answer")
    for field_, kind, help_ in (
        ("max_new_tokens", int, "new tokens per answer (default 64)"),
        ("temperature", float, "0 is greedy (the default); above 0 samples"),
        ("top_p", float, "nucleus sampling's mass, with --temperature (default 1)"),
        ("seed", int, "sampling seed, the same for every arm (default 0)"),
    ):
        generate.add_argument("--" + field_.replace("_", "-"), dest=field_, type=kind, default=None, help=help_)
    for spec in schema():
        text = f"{spec.label}: {spec.help} (default: {spec.default})".replace("%", "%%")
        if spec.hint is bool:
            ablate.add_argument(
                spec.flag, dest=spec.key, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            ablate.add_argument(spec.flag, dest=spec.key, default=None, metavar="VALUE", help=text)
    return parser


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder: give a .json file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"config file {path} is not valid JSON: nested too deeply") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object of settings")
    # A run's config.json can be given back as --config: what it records about the launch is not a setting.
    return {k: v for k, v in data.items() if k not in LAUNCH_KEYS}


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    """Merge --config FILE with the flags given on the command line (flags win); `ValueError` names the source."""
    base = None
    if args.config is not None:
        try:
            base = parse_config(_read_config_file(args.config))
        except ConfigError as exc:
            raise ValueError(f"config file {args.config}: {exc}") from None
    flags = {spec.key: getattr(args, spec.key) for spec in schema() if getattr(args, spec.key, None) is not None}
    try:
        return parse_config(flags, base=base)
    except ConfigError as exc:
        raise ValueError(f"{field_spec(exc.key).flag}: {exc}" if exc.key in flags else str(exc)) from None


def default_out_dir(cfg: AblationConfig, root: Path = Path("runs")) -> Path:
    """A fresh folder per run: `runs/<YYYYmmdd-HHMMSS>-<model>` (the model's last path part)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.model.rstrip("/").rsplit("/", 1)[-1]
    return root / f"{stamp}-{name}"


def _link_latest(out: Path) -> None:
    latest = out.parent / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(out.name, target_is_directory=True)
    except OSError:  # a file system without symlinks: the run's own folder is what counts
        pass


@contextmanager
def _graceful_stop(stop: threading.Event) -> Iterator[list[str]]:
    """Ctrl-C or SIGTERM: stop every arm after the current step and write every file; a second one aborts."""
    caught: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        caught.append(signal.Signals(signum).name)
        stop.set()
        print("\nstopping after the current step (again to abort)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield caught
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _ProgressBar:
    """The CLI's observer of a run: a tqdm bar over every arm's steps."""

    def __init__(self, total: int, *, disable: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", disable=disable, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event: Any) -> None:
        if isinstance(event, Phase):
            self.bar.set_description(event.message[:40])
        elif isinstance(event, StepRecord):
            self.bar.update(1)
            self.bar.set_postfix_str(f"{event.arm} loss {event.loss:.3f} |g| {event.grad_norm_pre:.2f}")

    def close(self) -> None:
        self.bar.close()


def _ablate(args: argparse.Namespace) -> int:
    from .engine.distributed import data_parallel
    from .output.run_folder import RunFolderError, run_to_folder

    try:
        cfg = config_from_args(args)
        require_tracker(args.report_to)
        parallel = data_parallel(cfg.device)  # joins the launch's process group; None in one process
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    main = parallel is None or parallel.is_main
    out = args.out if args.out is not None else default_out_dir(cfg)
    bar = _ProgressBar(cfg.steps * len(cfg.arm_labels) * len(cfg.seed_list), disable=args.no_progress or not main)
    tracker = TrackerConfig(args.report_to, args.report_project, group=out.name or None)
    stop = threading.Event()
    try:
        with _graceful_stop(stop) as caught:
            result = run_to_folder(
                cfg,
                out,
                overwrite=args.overwrite,
                charts=not args.no_charts,
                observers=(bar,),
                tracker=tracker,
                stop=stop,
            )
    except RunFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"aborted; the steps so far are in the staging folder beside {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
        if parallel is not None:
            parallel.close()
    if not main:  # a failure here must end the launch (non-zero exit): the main process would otherwise wait
        if result.status == "failed":
            print(f"error (process {parallel.rank}): {result.error}", file=sys.stderr)
        return EXIT_OK if result.status != "failed" else EXIT_STOPPED
    return _report(args, result, caught)


def _report(args: argparse.Namespace, result: RunResult, caught: list[str]) -> int:
    """Print what the run left (its summary.md, notes, where) and the exit code of how it ended."""
    if args.out is None and result.out_dir is not None:
        _link_latest(Path(result.out_dir))
    if result.status == "failed" and not result.records:
        print(f"error: {result.error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    where = Path(result.out_dir) if result.out_dir else None
    if where is not None and (where / "summary.md").exists():
        print((where / "summary.md").read_text())
    for note in result.notes:
        print(f"note: {note}")
    print(f"{result.status}: {len(result.records)} records of {', '.join(result.config.arm_labels)} in {where}/")
    if result.status == "failed":
        print(f"error: {result.error}", file=sys.stderr)
    if caught:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.status == "finished" else EXIT_STOPPED


def _study(args: argparse.Namespace) -> int:
    from .output.study import CONDITIONS, StudyProtocol, run_study

    try:
        protocol = StudyProtocol.toy() if args.toy else StudyProtocol()
        if args.seeds is not None:
            protocol.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.steps is not None:
            protocol.steps = args.steps
        if args.spike_at is not None:
            protocol.spike_at = args.spike_at
        for name in CONDITIONS:  # every cell's config is valid before anything runs
            protocol.config(name, protocol.seeds[0], [f"{a}@x{s:g}" for a in protocol.arms for s in protocol.lr_grid])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    total = protocol.steps * len(protocol.arms) * len(protocol.seeds) * (len(protocol.lr_grid) + 1)
    bar = _ProgressBar(total, disable=args.no_progress)
    try:
        study = run_study(protocol, args.out, work_dir=args.work, overwrite=args.overwrite, observers=(bar,))
    finally:
        bar.close()
    print((args.out / "study.md").read_text() if (args.out / "study.md").exists() else "no study written")
    return EXIT_OK if study["status"] and all(s == "finished" for s in study["status"].values()) else EXIT_STOPPED


def _generate(args: argparse.Namespace) -> int:
    from .engine.generation import GenerationConfig
    from .output.adapters import BASE, AdapterBank

    try:
        options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")}
        decoding = GenerationConfig(**{k: v for k, v in options.items() if v is not None})
        bank = AdapterBank.from_run(args.run)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with bank:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else bank.labels
        unknown = [a for a in arms if a not in bank.labels]
        if unknown:
            print(f"error: no arm {unknown} in this run; it has {bank.labels}", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            ids = bank.prompt_ids({"instruction": args.prompt, "input": args.input})
            for arm in ([] if args.no_base else [BASE]) + arms:
                answer = bank.answer(arm, ids, decoding)
                print(f"== {arm} ({answer.tokens} tokens, {answer.seconds:.1f} s, ended: {answer.ended})")
                print(answer.text.strip() or "(nothing)")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return EXIT_OK


def run_cli(argv: list[str] | None = None) -> int:
    """Parse, run, print the summary table; return the process exit code (0 ok, 1 stopped/failed, 2 bad input,
    130 interrupted — after writing every file of the steps done)."""
    args = build_parser().parse_args(argv)
    if args.command == "ablate":
        return _ablate(args)
    if args.command == "study":
        return _study(args)
    if args.command == "generate":
        return _generate(args)
    return EXIT_BAD_INPUT  # pragma: no cover - argparse requires a known command

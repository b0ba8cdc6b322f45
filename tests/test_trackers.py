"""`--report-to`: the engine's hand-off to trackio / W&B / TensorBoard.

trackio runs for real in tests/test_engine_distributed.py (a 2-process launch reporting to a local TRACKIO_DIR, read
back from its SQLite). W&B is not installed here: its hand-off is checked against a stand-in module that records the
documented calls (`wandb.init(..., reinit="create_new")`, `run.log(metrics, step=)`, `run.summary`, `run.finish()`),
and the missing-package error for real. TensorBoard runs for real when the `tensorboard` package is installed.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types

import pytest

from crma.ablation.cli import run_cli
from crma.ablation.engine.records import StepRecord
from crma.ablation.output.trackers import (
    TrackerConfig,
    TrackerUnavailableError,
    open_reporter,
    require_tracker,
    step_metrics,
)

FAST = {"model": "tiny-random", "rows": 8, "steps": 3, "batch_size": 2, "seq_len": 160, "save_adapters": False}
ARMS = ["lora", "lora+crma"]


def _engine_run(tracker: TrackerConfig) -> list[StepRecord]:
    from crma.ablation.engine.loop import train
    from crma.ablation.output.trackers import open_reporter
    from crma.ablation.spec.schema import parse_config

    cfg = parse_config({**FAST, "arms": ARMS, "zclip": {"warmup_steps": 2}, "diag_every": 1, "eval_rows": 2})
    result = train(cfg, observers=(open_reporter(tracker, cfg),))  # the tracker is one observer of the loop
    assert result.status == "finished", result.error
    return result.records


def test_step_metrics_are_the_records_numbers_flat() -> None:
    record = StepRecord(
        arm="lora+crma",
        seed=1,
        step=3,
        loss=2.5,
        grad_norm_pre=math.inf,
        grad_norm_post=math.nan,
        clipped=True,
        lr=1e-4,
        tokens=96,
        step_time_s=0.1,
        memory_mb=12.0,
        diverged=True,
        crma={"sigma2_mean": 0.9, "alpha_mean": 1.0},
        grad_norm_lora=None,
    )
    assert step_metrics(record) == {
        "loss": 2.5,
        "clipped": 1,
        "lr": 1e-4,
        "tokens": 96,
        "step_time_s": 0.1,
        "memory_mb": 12.0,
        "diverged": 1,
        "crma/sigma2_mean": 0.9,
        "crma/alpha_mean": 1.0,
    }  # non-finite and missing values left out (metrics.jsonl writes them as null); arm, seed, step are the run


@pytest.mark.parametrize(
    ("report_to", "module", "package"),
    [
        ("wandb", "wandb", "wandb"),
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
        ("trackio", "trackio", "trackio"),
    ],
)
def test_a_missing_tracker_is_one_clear_error(report_to: str, module: str, package: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like to `import`
    with pytest.raises(TrackerUnavailableError, match=f"needs the {package} package.*pip install {package}"):
        require_tracker(report_to)


def test_the_cli_refuses_a_missing_tracker_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    assert run_cli(["ablate", "--model", "tiny-random", "--report-to", "wandb", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --report-to wandb needs the wandb package") and "\n" not in err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"report_to": "mlflow"}, "`report_to` must be one of"),
        ({"report_to": "trackio", "project": " "}, "`project` must be a non-empty name"),
        ({"report_to": "tensorboard"}, "`log_dir` is required"),
    ],
)
def test_tracker_config_is_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrackerConfig(**kwargs)


def test_none_opens_no_reporter() -> None:
    from crma.ablation.spec.config import AblationConfig

    assert open_reporter(TrackerConfig("none"), AblationConfig()) is None
    assert open_reporter(None, AblationConfig()) is None


class _FakeWandbRun:
    def __init__(self, kwargs: dict):
        self.init, self.logged, self.summary, self.finished = kwargs, [], {}, False

    def log(self, metrics: dict, step: int) -> None:
        assert not self.finished
        self.logged.append((step, dict(metrics)))

    def finish(self) -> None:
        self.finished = True


def test_wandb_gets_one_live_run_per_arm_with_config_metrics_and_receipt(monkeypatch) -> None:
    runs: list[_FakeWandbRun] = []

    def init(**kwargs):
        runs.append(_FakeWandbRun(kwargs))
        return runs[-1]

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # other libraries probe it with find_spec
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = _engine_run(TrackerConfig("wandb", project="p", group="g"))
    assert [r.init["name"] for r in runs] == ["g-lora-seed42", "g-lora+crma-seed42"]
    for run, arm in zip(runs, ARMS, strict=True):
        assert (run.init["project"], run.init["group"], run.init["reinit"]) == ("p", "g", "create_new")
        config = run.init["config"]
        assert (config["arm"], config["seed"], config["world_size"], config["ablation"]["arms"]) == (arm, 42, 1, ARMS)
        assert config["receipt"]["fair"] is True and config["receipt"]["setup"]["lora"]["r"] == 8
        mine = [r for r in records if r.arm == arm]
        steps = [(step, m) for step, m in run.logged if "loss" in m]
        heldout = [(step, m) for step, m in run.logged if "eval/test_loss" in m]
        assert [step for step, _ in steps] == [1, 2, 3] and [step for step, _ in heldout] == [0, 3]
        assert [m["loss"] for _, m in steps] == [r.loss for r in mine]
        assert [m["grad_norm_pre"] for _, m in steps] == [r.grad_norm_pre for r in mine]
        assert run.finished and run.summary["receipt"]["end"]["steps"] == 3
    first_step = [next(m for _, m in run.logged if "loss" in m) for run in runs]
    assert "crma/sigma2_mean" in first_step[1] and "crma/sigma2_mean" not in first_step[0]


def test_tensorboard_writes_one_run_per_arm(tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _engine_run(TrackerConfig("tensorboard", group="g", log_dir=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g-lora+crma-seed42", "g-lora-seed42"]
    for arm in ARMS:
        events = EventAccumulator(str(tmp_path / f"g-{arm}-seed42"), size_guidance={"tensors": 0})
        events.Reload()
        losses = [(e.step, e.value) for e in events.Scalars("loss")]
        assert losses == [(r.step, pytest.approx(r.loss, rel=1e-6)) for r in records if r.arm == arm]
        texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in ("config/text_summary",)}
        assert json.loads(texts["config/text_summary"].strip("`\n"))["arm"] == arm

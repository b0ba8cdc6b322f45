"""`python -m crma ablate`: the files it writes, the adapters it saves, and its errors."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

import crma
from crma.ablation.cli import run_cli
from crma.ablation.engine.arm_set import ArmSet

TINY = [
    "--model",
    "tiny-random",
    "--dataset",
    "bundled",
    "--rows",
    "12",
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--seq-len",
    "160",
    "--no-progress",
]
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run of lora vs lora+crma that also records each trained arm's logits on a probe batch."""
    out = tmp_path_factory.mktemp("run")
    trained: dict[str, torch.Tensor] = {}
    original = ArmSet.save_adapters

    def recording(self, root):
        self.model.eval()
        with torch.no_grad():
            for arm in self.arms:
                self.activate(arm)
                trained[arm.label] = self.model(PROBE).logits.clone()
        return original(self, root)

    ArmSet.save_adapters = recording
    try:
        code = run_cli(["ablate", *TINY, "--arms", "lora,lora+crma", "--out", str(out)])
    finally:
        ArmSet.save_adapters = original
    return code, out, trained


def test_cli_writes_every_file(cli_run) -> None:
    code, out, _ = cli_run
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        for name in ("loss.png", "grad_norm.png", "loss_delta.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    every = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in every if x.get("kind") != "eval"]
    heldout = [x for x in every if x.get("kind") == "eval"]
    with (out / "metrics.csv").open() as fh:
        rows = [row for row in csv.DictReader(fh) if row["kind"] == "train"]
    assert len(rows) == 6 and rows[0]["arm"] == "lora" and float(rows[0]["loss"]) == lines[0]["loss"]
    assert "crma_composite_gain" in rows[0]
    assert len(lines) == 6 and {x["arm"] for x in lines} == {"lora", "lora+crma"}
    # The held-out slice (32 rows after the training rows, by default) at step 0 and at the end, for both arms.
    assert [(x["arm"], x["step"], x["split"]) for x in heldout] == [
        ("lora", 0, "test"), ("lora+crma", 0, "test"), ("lora", 3, "test"), ("lora+crma", 3, "test"),
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"lora", "lora+crma"} and summary["status"] == "finished"
    assert summary["receipt"]["lora_init_equal"] is True
    assert json.loads((out / "config.json").read_text())["arms"] == ["lora", "lora+crma"]
    assert "| Held-out loss (final) |" in (out / "summary.md").read_text()
    assert {p.name for p in (out / "adapters" / "lora+crma").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "crma_config.json",
        "crma.safetensors",
    }
    assert not (out / "adapters" / "lora" / "crma.safetensors").exists()


def test_saved_adapters_load_back_on_the_original_base(cli_run) -> None:
    from peft import PeftModel

    from crma.ablation.models import load_model

    _, out, trained = cli_run
    for arm in ("lora", "lora+crma"):
        config = json.loads((out / "adapters" / arm / "adapter_config.json").read_text())
        assert config["r"] == 2 * 8  # PiSSA converted to a plain LoRA (rank 2r) for the unmutated base
        base = load_model("tiny-random").model
        model = PeftModel.from_pretrained(base, out / "adapters" / arm)
        if arm == "lora+crma":
            crma.load(model, out / "adapters" / arm)
        with torch.no_grad():
            logits = model(PROBE).logits
        assert torch.allclose(logits, trained[arm], atol=1e-4), (arm, (logits - trained[arm]).abs().max())
    assert not torch.allclose(trained["lora"], trained["lora+crma"], atol=1e-6)


def test_a_matched_rank_adapter_loads_back_too(tmp_path) -> None:
    from peft import PeftModel

    from crma.ablation.models import load_model

    trained: dict[str, torch.Tensor] = {}
    original = ArmSet.save_adapters

    def recording(self, root):
        self.model.eval()
        with torch.no_grad():
            self.activate(self.arms[0])
            trained["logits"] = self.model(PROBE).logits.clone()
        return original(self, root)

    ArmSet.save_adapters = recording
    try:
        assert run_cli(["ablate", *TINY, "--arms", "lora-matched", "--steps", "2", "--out", str(tmp_path / "r")]) == 0
    finally:
        ArmSet.save_adapters = original
    folder = tmp_path / "r" / "adapters" / "lora-matched"
    rank = json.loads((tmp_path / "r" / "summary.json").read_text())["receipt"]["matched_rank"]["rank"]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * rank
    model = PeftModel.from_pretrained(load_model("tiny-random").model, folder)
    with torch.no_grad():
        assert torch.allclose(model(PROBE).logits, trained["logits"], atol=1e-4)


def test_config_file_and_flags_merge(tmp_path) -> None:
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {"model": "tiny-random", "rows": 8, "steps": 2, "seq_len": 160, "arms": ["lora"], "save_adapters": False}
        )
    )
    out = tmp_path / "out"
    assert run_cli(["ablate", "--config", str(config), "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 1 and saved["rows"] == 8 and saved["arms"] == ["lora"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rows", "0"], "--rows: Rows must be an integer ≥ 1; got 0"),
        (["--start", "100000"], "past the end"),
        (["--arms", "lora,dora"], "--arms: Arms must be names from"),
        (["--model", "nobody/nothing"], "nobody/nothing"),
        (["--dataset", "missing.jsonl"], "missing.jsonl"),
        (["--lr", "-1"], "--lr: LR must be a number in (0, 10); got -1"),
        (["--crma-n-streams", "1"], "--crma-n-streams: CRMA streams must be an integer ≥ 2; got 1"),
        (["--lr-grid", "1,3"], "Validation rows must be ≥ 1"),
        (["--crma-rank", "100000"], "CRMA rank must be at most the model width (64) of tiny-random; got 100000"),
        (["--steps", "three"], "--steps: Steps must be a whole number; got 'three'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(flags, message, tmp_path, capsys) -> None:
    args = ["ablate", *TINY, *flags, "--out", str(tmp_path / "o")]
    assert run_cli(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_module_entry_point_reports_a_bad_file(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "rows.csv"
    bad.write_text("question,answer\nhi,there\n")
    argv = ["crma", "ablate", *TINY, "--dataset", str(bad), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("crma", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "instruction" in last and "Traceback" not in err


def test_nested_flags_set_their_fields(tmp_path) -> None:
    from crma.ablation.cli import build_parser, config_from_args

    parser = build_parser()
    nested = config_from_args(parser.parse_args(["ablate", "--crma-n-streams", "4", "--zclip-warmup-steps", "7"]))
    assert nested.crma.n_streams == 4 and nested.zclip.warmup_steps == 7
    tuned = config_from_args(parser.parse_args(["ablate", "--lr-grid", "0.3,1,3", "--val-rows", "16"]))
    assert tuned.lr_grid == [0.3, 1.0, 3.0] and tuned.val_rows == 16 and len(tuned.arm_labels) == 12
    every = config_from_args(
        parser.parse_args(["ablate", "--crma-sinkhorn-iters", "9", "--zclip-clip-option", "mean"])
    )
    assert every.crma.sinkhorn_iters == 9 and every.zclip.clip_option == "mean"
    assert config_from_args(parser.parse_args(["ablate", "--no-save-adapters"])).save_adapters is False


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file"),
        ("below-file", "lies below a file"),
        ("empty", "the output folder is empty"),
        ("taken", "already holds files: pass --overwrite"),
    ],
)
def test_unusable_out_folders_are_refused_before_any_work(where, message, tmp_path, capsys) -> None:
    target = {"file": tmp_path / "f", "below-file": tmp_path / "f" / "run", "empty": Path(""), "taken": tmp_path / "t"}
    (tmp_path / "f").write_text("not a folder")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "old.txt").write_text("an earlier run")
    assert run_cli(["ablate", *TINY, "--out", str(target[where])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert (tmp_path / "t" / "old.txt").read_text() == "an earlier run"  # nothing was touched


def test_overwrite_replaces_a_run_only_once_the_new_one_is_complete(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("an earlier run")
    args = ["ablate", *TINY, "--arms", "lora", "--steps", "1", "--no-save-adapters", "--out", str(out)]
    assert run_cli([*args, "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or old folder left behind


def test_config_file_errors_name_the_file(tmp_path, capsys) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    nested = tmp_path / "deep.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({"steps": True}))
    for config, message in ((folder, "is a folder"), (nested, "nested too deeply"), (loose, "Steps must be a number")):
        assert run_cli(["ablate", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: config file {config}") and message in err[-1], err


def test_default_out_is_a_fresh_folder_linked_as_latest(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["ablate", *TINY, "--arms", "lora", "--steps", "1", "--no-save-adapters"]
    assert run_cli(args) == 0
    first = (tmp_path / "runs" / "latest").resolve()
    assert first.name.endswith("-tiny-random") and (first / "summary.json").is_file()


def test_ctrl_c_finishes_the_step_and_writes_every_file(tmp_path, monkeypatch) -> None:
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN under nohup / a background job
    original = ArmSet.train_step

    def interrupted(self, arm, batch):
        if batch.step == 2 and arm.label == "lora":
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C would, mid-run
        return original(self, arm, batch)

    monkeypatch.setattr(ArmSet, "train_step", interrupted)
    out = tmp_path / "run"
    assert run_cli(["ablate", *TINY, "--arms", "lora,lora+crma", "--steps", "6", "--out", str(out)]) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["error"] == "stopped by request"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("kind") != "eval"] == [1, 1, 2, 2]
    assert (out / "report.html").is_file() and (out / "adapters" / "lora+crma" / "crma.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back


def test_sigterm_stops_cleanly_and_leaves_no_temp_folder(tmp_path, monkeypatch) -> None:
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the run's temp folders go
    original = ArmSet.train_step

    def terminated(self, arm, batch):
        if batch.step == 2 and arm.label == "lora":
            signal.raise_signal(signal.SIGTERM)  # as `kill <pid>` or a container stop would
        return original(self, arm, batch)

    monkeypatch.setattr(ArmSet, "train_step", terminated)
    out = tmp_path / "run"
    assert run_cli(["ablate", *TINY, "--arms", "lora,lora+crma", "--steps", "6", "--out", str(out)]) == 130
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    leftovers = [p.name for p in scratch.iterdir() if p.name.startswith("crma-")]
    assert leftovers == []  # PiSSA's init folder and the adapter staging folders are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]


def test_a_read_only_out_folder_is_refused(tmp_path, capsys, monkeypatch) -> None:
    import os

    from crma.ablation.output import run_folder as writer

    locked = tmp_path / "locked"
    locked.mkdir()
    # Root ignores permission bits, so the check's answer is what a read-only mount gives an ordinary user.
    monkeypatch.setattr(writer.os, "access", lambda path, mode: os.path.realpath(path) != str(locked))
    assert run_cli(["ablate", *TINY, "--out", str(locked / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write into {locked}: it is read-only; choose another --out"]

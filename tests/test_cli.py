"""`python -m crma ablate`: the files it writes, the adapters it saves, and its errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crma
from crma.ablation.cli import run_cli
from crma.ablation.engine import _Session

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
    original = _Session.save_adapters

    def recording(self, root):
        self.model.eval()
        with torch.no_grad():
            for arm in self.arms:
                self.activate(arm)
                trained[arm.label] = self.model(PROBE).logits.clone()
        return original(self, root)

    _Session.save_adapters = recording
    try:
        code = run_cli(["ablate", *TINY, "--arms", "lora,lora+crma", "--out", str(out)])
    finally:
        _Session.save_adapters = original
    return code, out, trained


def test_cli_writes_every_file(cli_run) -> None:
    code, out, _ = cli_run
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        for name in ("loss.png", "grad_norm.png", "loss_delta.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["arm"] == "lora" and float(rows[0]["loss"]) == lines[0]["loss"]
    assert "crma_composite_gain" in rows[0]
    assert len(lines) == 6 and {x["arm"] for x in lines} == {"lora", "lora+crma"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"lora", "lora+crma"} and summary["status"] == "finished"
    assert summary["receipt"]["lora_init_equal"] is True
    assert json.loads((out / "config.json").read_text())["arms"] == ["lora", "lora+crma"]
    assert "| Final loss |" in (out / "summary.md").read_text()
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
        (["--rows", "0"], "`rows` must be a positive integer"),
        (["--start", "100000"], "past the end"),
        (["--arms", "lora,dora"], "`arms` must be"),
        (["--model", "nobody/nothing"], "nobody/nothing"),
        (["--dataset", "missing.jsonl"], "missing.jsonl"),
        (["--lr", "-1"], "`lr` must be"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(flags, message, tmp_path, capsys) -> None:
    args = ["ablate", *TINY, *flags, "--out", str(tmp_path / "o")]
    assert run_cli(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_module_entry_point_reports_a_bad_file(tmp_path) -> None:
    bad = tmp_path / "rows.csv"
    bad.write_text("question,answer\nhi,there\n")
    proc = subprocess.run(
        [sys.executable, "-m", "crma", "ablate", *TINY, "--dataset", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "instruction" in last and "Traceback" not in proc.stderr

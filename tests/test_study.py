"""`python -m crma study` at toy size: the protocol CI can afford, with every published file."""

from __future__ import annotations

import json
import os

from crma.ablation.cli import run_cli
from crma.ablation.output.study import StudyProtocol
from crma.ablation.spec.arms import STUDY_ARMS


def test_the_protocol_is_the_grid_plus_capacity_control_over_five_seeds() -> None:
    protocol = StudyProtocol()
    assert protocol.model == "smollm2-135m" and len(protocol.seeds) >= 5
    assert protocol.arms == list(STUDY_ARMS) and "lora-matched" in protocol.arms
    plain, spike = protocol.condition("plain"), protocol.condition("spike")
    assert plain.spike_at is None and spike.spike_at == protocol.spike_at > plain.zclip.warmup_steps
    assert plain.dataset == spike.dataset == "bundled" and plain.seeds == spike.seeds


def test_toy_study_writes_the_published_files(tmp_path) -> None:
    out, work = tmp_path / "study", tmp_path / "runs"
    assert run_cli(["study", "--toy", "--out", str(out), "--work", str(work), "--no-progress"]) == 0
    study = json.loads((out / "summary.json").read_text())
    assert set(study["conditions"]) == {"plain", "spike"} and study["status"] == {
        "plain": "finished",
        "spike": "finished",
    }
    for condition in study["conditions"].values():
        assert condition["attribution"]["available"] and condition["attribution"]["n_seeds"] == 2
        assert set(condition["arms"]) == set(STUDY_ARMS)
    text = (out / "study.md").read_text()
    assert "## Plain" in text and "## Spike stress at step 3" in text and "95 % CI" in text
    assert (work / "plain" / "metrics.jsonl").is_file() and (work / "spike" / "summary.json").is_file()
    if os.path.exists("/usr/bin/chromium"):
        assert (out / "spike_grad_norm.png").read_bytes()[:4] == b"\x89PNG"
    # A second study into the same folders is refused at once, before any training.
    assert run_cli(["study", "--toy", "--out", str(out), "--work", str(work)]) == 2

"""`python -m crma study` at toy size: the protocol CI can afford, its cells, its resumability and every published
file."""

from __future__ import annotations

import json
import os
import shutil

from crma.ablation.cli import run_cli
from crma.ablation.engine.records import Phase
from crma.ablation.output.study import LADDER, StudyProtocol, run_study
from crma.ablation.spec.arms import STUDY_ARMS


def test_the_protocol_tunes_every_control_on_validation_and_reports_on_test() -> None:
    protocol = StudyProtocol()
    assert protocol.model == "smollm2-135m" and len(protocol.seeds) >= 5 and protocol.steps == 80
    assert protocol.arms == list(STUDY_ARMS)
    assert {"lora+zclip", "lora-matched", "lora+crma-nomix", "lora+crma"} <= set(protocol.arms)
    assert max(protocol.lr_grid) / min(protocol.lr_grid) >= 10 and set(protocol.lr_grid) <= set(LADDER)
    plain = protocol.config("plain", 1, ["lora+crma@x3"])
    spike = protocol.config("spike", 1, ["lora+crma@x3"])
    assert plain.spike_at is None and spike.spike_at == protocol.spike_at > plain.zclip.warmup_steps
    slices = plain.slices()  # disjoint: training rows, then validation, then test
    assert slices["train"] == ("bundled", 0, protocol.rows)
    assert slices["val"] == ("bundled", protocol.rows, protocol.val_rows)
    assert slices["test"] == ("bundled", protocol.rows + protocol.val_rows, protocol.test_rows)


def _cells_run(protocol: StudyProtocol, out, work) -> tuple[list[str], dict]:
    ran: list[str] = []

    def note(event) -> None:
        if isinstance(event, Phase) and event.message.startswith("study cell "):
            ran.append(event.message.removeprefix("study cell "))

    study = run_study(protocol, out, work_dir=work, charts=False, observers=(note,))
    return ran, study


def test_toy_study_publishes_its_files_and_resumes_where_it_stopped(tmp_path) -> None:
    out, work = tmp_path / "study", tmp_path / "runs"
    assert run_cli(["study", "--toy", "--out", str(out), "--work", str(work), "--no-progress"]) == 0
    study = json.loads((out / "summary.json").read_text())
    assert study["status"] == {"plain": "finished", "spike": "finished"}
    plain, spike = study["conditions"]["plain"], study["conditions"]["spike"]
    selection = plain["lr_selection"]
    assert selection["tuned"] and selection["split"] == "val" and set(selection["arms"]) == set(STUDY_ARMS)
    chosen = {arm: info["chosen"] for arm, info in selection["arms"].items()}
    # The spike condition trains each arm at the multiplier the plain condition chose on validation.
    assert set(spike["arms"]) == {f"{arm}@x{m:g}" for arm, m in chosen.items()}
    assert plain["receipt"]["lr_choice"]["fair"] and plain["cells_consistent"]["consistent"]
    assert list(plain["attribution"]["sets"]) == ["best_lr", "shared_lr"]
    assert plain["attribution"]["primary"] == "final_test_loss"
    assert all("arms" not in r for r in plain["receipt"]["per_seed"])  # the cells' folders keep the facts
    assert study["wall_s"] > 0 and study["cell_commits"]
    text = (out / "study.md").read_text()
    assert "## Plain" in text and "## Spike stress at step 3" in text and "Each arm's learning rate" in text
    # The author's claims, each from its contrast in the published summary (the same table the page shows).
    from crma.ablation.report.claims import verdict_cell

    claimed = plain["attribution"]["sets"]["best_lr"]["contrasts"]["crma_with_zclip"]["metrics"]["final_test_loss"]
    assert "## The author's claims, against this study" in text and verdict_cell(claimed) in text
    if os.path.exists("/usr/bin/chromium"):
        assert (out / "plain_lr_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "spike_grad_norm.png").read_bytes()[:4] == b"\x89PNG"

    # Resumable: a second run trains nothing; a cell that did not finish is trained again, and only that one.
    protocol = StudyProtocol.toy()
    ran, again = _cells_run(protocol, out, work)
    assert ran == [] and again["status"] == study["status"]
    unfinished = work / "plain" / "seed2" / "x1"
    shutil.rmtree(unfinished)
    ran, _ = _cells_run(protocol, out, work)
    assert ran == ["plain/seed2/x1"]

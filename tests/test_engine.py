"""The paired ablation engine on the tiny-random model and the bundled data (a few steps each)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import crma
from crma.ablation.engine.arm_set import ArmSet
from crma.ablation.engine.loop import train
from crma.ablation.engine.records import EvalRecord, Phase, RunResult, SeedEnd, SeedStart, StepRecord
from crma.ablation.output.run_folder import run_to_folder
from crma.ablation.spec.arms import arm_labels
from crma.ablation.spec.schema import parse_config

FAST = dict(
    model="tiny-random",
    dataset="bundled",
    rows=16,
    steps=4,
    batch_size=2,
    seq_len=160,
    diag_every=2,
    zclip={"warmup_steps": 2},
    eval_rows=0,
)


def run(tmp_path=None, stop=None, **overrides) -> tuple[list[StepRecord], RunResult]:
    cfg = parse_config({**FAST, "save_adapters": False, **overrides})
    events: list = []
    if tmp_path is None:
        result = train(cfg, stop=stop, observers=(events.append,))
    else:
        result = run_to_folder(cfg, tmp_path, stop=stop, charts=False, observers=(events.append,))
    assert isinstance(result, RunResult) and events[-1] is result  # the observers hear the end too
    assert all(isinstance(e, (Phase, SeedStart, StepRecord, EvalRecord, SeedEnd)) for e in events[:-1])
    assert result.records == [e for e in events if isinstance(e, StepRecord)]
    return result.records, result


def by_arm(records: list[StepRecord], arm: str) -> list[StepRecord]:
    return [r for r in records if r.arm == arm]


def metrics(record: StepRecord) -> tuple:
    return (record.loss, record.grad_norm_pre, record.grad_norm_post, record.clipped, record.lr, record.tokens)


def test_arm_labels_number_repeats() -> None:
    assert arm_labels(["lora", "lora+crma", "lora", "lora"]) == ["lora", "lora+crma", "lora#2", "lora#3"]


@pytest.mark.parametrize("arm", ["lora", "lora+crma"])
def test_aa_control_is_bit_identical(arm: str) -> None:
    records, result = run(arms=[arm, arm])
    assert result.status == "finished", result.error
    a, b = by_arm(records, arm), by_arm(records, f"{arm}#2")
    assert len(a) == len(b) == 4
    assert [metrics(r) for r in a] == [metrics(r) for r in b]
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in a)


def test_lockstep_records_and_fairness_receipt() -> None:
    records, result = run(arms=["lora", "lora+crma", "lora+zclip", "lora+mix"])
    assert result.status == "finished", result.error
    first_step = [(r.step, r.arm) for r in records[:4]]
    assert first_step == [(1, "lora"), (1, "lora+crma"), (1, "lora+zclip"), (1, "lora+mix")]
    receipt = result.summary["receipt"]
    assert receipt["fair"] and receipt["problems"] == []
    assert receipt["lora_init_equal"] and len(set(receipt["lora_init_sha256"].values())) == 1
    assert receipt["batches_seen_equal"] and len(set(receipt["batches_seen_sha256"].values())) == 1
    # What differs between the arms is what their names declare, read from live state.
    crma_facets = {"crma", "crma.mixing", "optimizer.crma_groups", "optimizer.crma_groups.lr"}
    crma_facets |= {"optimizer.crma_groups.steps", "trainable.count"}
    assert set(receipt["config_diff"]) == {"clipper", *crma_facets}
    assert {arm: v is not None for arm, v in receipt["config_diff"]["crma"].items()} == {
        "lora": False,
        "lora+crma": True,
        "lora+zclip": False,
        "lora+mix": True,
    }
    kinds = {arm: v["kind"] for arm, v in receipt["config_diff"]["clipper"].items()}
    assert kinds == {
        "lora": "clip_grad_norm",
        "lora+crma": "zclip",
        "lora+zclip": "zclip",
        "lora+mix": "clip_grad_norm",
    }
    # step 1: identical LoRA init, identical batch, CRMA exact identity at init -> identical loss in every arm
    assert len({r.loss for r in records[:4]}) == 1
    crma_diag = [r.crma for r in by_arm(records, "lora+crma") if r.crma]
    assert crma_diag and crma_diag[0]["composite_gain"] == pytest.approx(1.0, abs=1e-6)
    assert all(r.crma is None for r in by_arm(records, "lora"))
    summary = result.summary["arms"]
    assert summary["lora+crma"]["trainable_params"] > summary["lora"]["trainable_params"]


def test_arms_differ_only_through_the_adapter_after_training() -> None:
    records, _ = run(arms=["lora", "lora+crma"], steps=6)
    lora, crma_arm = by_arm(records, "lora"), by_arm(records, "lora+crma")
    assert lora[0].loss == crma_arm[0].loss
    assert any(a.loss != b.loss for a, b in zip(lora[2:], crma_arm[2:], strict=True))


def test_diverging_arm_stops_alone(monkeypatch) -> None:
    original = ArmSet.setup

    def poisoned(self):
        original(self)
        arm = next(a for a in self.arms if a.label == "lora+crma")
        with torch.no_grad():
            block = crma.get_adapter(self.model, arm.adapter)
            block.crma_B.fill_(float("nan"))

    monkeypatch.setattr(ArmSet, "setup", poisoned)
    records, result = run(arms=["lora", "lora+crma"])
    assert result.status == "finished"
    bad = by_arm(records, "lora+crma")
    assert len(bad) == 1 and bad[0].diverged
    assert len(by_arm(records, "lora")) == 4 and not any(r.diverged for r in by_arm(records, "lora"))
    assert result.summary["arms"]["lora+crma"]["diverged"] is True


def test_stop_keeps_partial_results(tmp_path) -> None:
    stop = threading.Event()
    cfg = parse_config({**FAST, "steps": 20, "save_adapters": True, "arms": ["lora", "lora+crma"]})
    seen = []

    def stop_after_six(event) -> None:
        if isinstance(event, StepRecord):
            seen.append(event)
            if len(seen) == 6:
                stop.set()

    result = run_to_folder(cfg, tmp_path, stop=stop, charts=False, observers=(stop_after_six,))
    assert result.status == "stopped" and len(result.records) == 6
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 1, 2, 2, 3, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "stopped"
    assert (tmp_path / "adapters" / "lora" / "adapter_model.safetensors").exists()


def test_spike_stress_hits_every_arm_at_the_chosen_step() -> None:
    records, _ = run(arms=["lora", "lora+crma"], steps=5, spike_at=4)
    for arm in ("lora", "lora+crma"):
        norms = [r.grad_norm_pre for r in by_arm(records, arm)]
        assert norms[3] > 3 * max(norms[1:3]), norms


def test_several_seeds_restore_the_base_between_seeds() -> None:
    records, result = run(arms=["lora", "lora+crma"], seeds=[1, 2], steps=3)
    alone, _ = run(arms=["lora", "lora+crma"], seed=2, steps=3)
    assert [metrics(r) for r in records if r.seed == 2] == [metrics(r) for r in alone]
    assert {r.seed for r in records} == {1, 2}
    assert "across_seeds" in result.summary


def test_bad_inputs_fail_with_a_clear_message() -> None:
    _, result = run(start=100_000)
    assert result.status == "failed" and "past the end" in result.error
    _, result = run(model="no-such-org/no-such-model")
    assert result.status == "failed" and "no-such-org/no-such-model" in result.error
    _, result = run(lora_targets=["nonexistent_proj"])
    assert result.status == "failed" and "nonexistent_proj" in result.error


def test_out_of_memory_and_unexpected_errors_end_as_failed_runs_with_files(monkeypatch, tmp_path) -> None:
    original = ArmSet.train_step

    def failing(self, arm, batch):
        if batch.step == 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, arm, batch)

    monkeypatch.setattr(ArmSet, "train_step", failing)
    records, result = run(tmp_path / "oom", arms=["lora", "lora+crma"])
    assert result.status == "failed" and result.error.startswith("out of memory: lower batch_size")
    assert len(records) == 4 and (tmp_path / "oom" / "summary.json").exists()

    def broken(self, arm, batch):
        raise KeyError("boom")

    monkeypatch.setattr(ArmSet, "train_step", broken)
    _, result = run(tmp_path / "bug")
    assert result.status == "failed" and "internal error (KeyError" in result.error


def test_lora_only_grad_norm_is_reported_for_every_arm() -> None:
    records, result = run(arms=["lora", "lora+crma"], steps=3)
    for r in records:
        assert r.grad_norm_lora is not None and 0 < r.grad_norm_lora <= r.grad_norm_pre + 1e-6
    lora = by_arm(records, "lora")
    # the lora arm has no other trainable parameters: both norms agree (up to float summation order)
    assert all(abs(r.grad_norm_lora - r.grad_norm_pre) <= 1e-5 * r.grad_norm_pre for r in lora)
    assert by_arm(records, "lora+crma")[0].grad_norm_lora == pytest.approx(lora[0].grad_norm_lora, rel=1e-6)
    assert result.summary["arms"]["lora+crma"]["grad_norm_lora_peak"] is not None


def test_lora_matched_controls_capacity_and_is_unchanged_at_step_0(tmp_path) -> None:
    from peft import PeftModel

    import crma
    from crma.ablation.models import load_model

    arms = ["lora", "lora+crma", "lora-matched"]
    records, result = run(tmp_path / "run", arms=arms, steps=3, save_adapters=True)
    assert result.status == "finished", result.error
    info = result.summary["arms"]
    assert info["lora-matched"]["trainable_params"] >= info["lora+crma"]["trainable_params"]
    matched = result.summary["receipt"]["matched_rank"]
    assert info["lora-matched"]["trainable_params"] == matched["params"] and matched["rank"] > 8
    # the smallest such rank: one less would not reach lora+crma's count
    assert matched["params"] * (matched["rank"] - 1) // matched["rank"] < matched["lora_crma_params"]
    receipt = result.summary["receipt"]
    assert receipt["fair"], receipt["problems"]
    assert receipt["arms"]["lora-matched"]["end"]["lora"]["r"] == matched["rank"]
    assert len({r.loss for r in records if r.step == 1}) == 1  # same output at step 0 in all three arms
    adapter = tmp_path / "run" / "adapters" / "lora-matched"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2 * matched["rank"]
    model = PeftModel.from_pretrained(load_model("tiny-random").model, adapter)  # loads on the original base
    assert isinstance(model, PeftModel) and not (adapter / crma.serialization.WEIGHTS_NAME).exists()


def _training_figures(records: list[StepRecord]) -> list[tuple]:
    return [(r.arm, r.step, *metrics(r), r.grad_norm_lora, json.dumps(r.crma, sort_keys=True)) for r in records]


def test_evaluation_leaves_training_bit_identical() -> None:
    arms = ["lora", "lora+crma", "lora+crma-nomix"]
    off, _ = run(arms=arms, steps=5, lora_dropout=0.1)  # dropout: evaluation must not touch the RNG either
    on, result = run(arms=arms, steps=5, lora_dropout=0.1, eval_rows=4, val_rows=3, eval_every=2)
    assert _training_figures(on) == _training_figures(off)
    # Every arm on both slices at steps 0, 2, 4 and at the end (5), in lockstep.
    steps = {(e.arm, e.split): [] for e in result.evals}
    for e in result.evals:
        steps[(e.arm, e.split)].append(e.step)
    assert steps == {(arm, split): [0, 2, 4, 5] for arm in arms for split in ("val", "test")}
    # At step 0 every arm is exactly the base model: the same held-out loss.
    assert len({e.loss for e in result.evals if e.step == 0 and e.split == "test"}) == 1
    figures = result.summary["arms"]["lora+crma"]
    assert figures["final_test_step"] == 5 and figures["best_test_loss"] <= figures["final_test_loss"]
    heldout = result.summary["data"]["heldout"]
    assert heldout["val"]["rows"] == [16, 18] and heldout["test"]["rows"] == [19, 22]
    assert heldout["test"]["overlap_with_train"] == 0 and heldout["val_test_overlap"] == 0
    assert result.summary["attribution"]["primary"] == "final_test_loss"


def test_the_identity_mixing_control_has_m_exactly_i_and_trains_everything_else(monkeypatch) -> None:
    seen = {}
    original = ArmSet.train_step

    def watch(self, arm, batch):
        record = original(self, arm, batch)
        if arm.label == "lora+crma-nomix" and batch.step == 2:
            adapter = crma.get_adapter(self.model, arm.adapter)
            seen["names"] = {name for name, _ in adapter.named_parameters()}
            seen["mix"] = adapter.mixing()[0].detach().clone()
            seen["moved"] = {name: bool(p.detach().abs().sum() > 0) for name, p in adapter.named_parameters()}
        return record

    monkeypatch.setattr(ArmSet, "train_step", watch)
    records, result = run(arms=["lora+crma", "lora+crma-nomix"], steps=3)
    assert result.status == "finished" and result.summary["receipt"]["fair"], result.summary["receipt"]["problems"]
    assert "crma_log_mix" not in seen["names"]  # not a parameter at all: nothing to train, nothing to save
    n = seen["mix"].shape[-1]
    assert torch.equal(seen["mix"], torch.eye(n).expand_as(seen["mix"]))
    assert seen["moved"]["crma_B"]  # B left zero after two steps: the side channel trains
    first = [r for r in records if r.step == 1]
    assert len({r.loss for r in first}) == 1  # exact identity at step 0 for the control too
    diag = [r.crma for r in records if r.arm == "lora+crma-nomix" and r.crma][-1]
    assert diag["sigma2_mean"] == pytest.approx(1.0) and diag["dist_from_identity_mean"] == 0.0
    assert (
        result.summary["arms"]["lora+crma-nomix"]["trainable_params"]
        < (result.summary["arms"]["lora+crma"]["trainable_params"])
    )
    declared = result.summary["receipt"]["declared"]
    assert declared["lora+crma-nomix"]["mixing"] == "identity" and declared["lora+crma"]["mixing"] == "sinkhorn"
    assert set(result.summary["receipt"]["config_diff"]) == {"crma.mixing", "trainable.count"}


def test_every_arm_trains_at_every_multiplier_of_the_lr_grid() -> None:
    records, result = run(arms=["lora", "lora+crma"], lr_grid=[0.5, 2.0], val_rows=3, eval_rows=3, steps=2)
    assert result.status == "finished", result.error
    labels = list(dict.fromkeys(r.arm for r in records))
    assert labels == ["lora@x0.5", "lora@x2", "lora+crma@x0.5", "lora+crma@x2"]
    groups = {label: arm["end"]["optimizer"]["groups"] for label, arm in result.summary["receipt"]["arms"].items()}
    assert groups["lora@x2"]["proj"]["initial_lr"] == pytest.approx(4 * groups["lora@x0.5"]["proj"]["initial_lr"])
    assert groups["lora+crma@x2"]["structural"]["initial_lr"] == pytest.approx(2 * 5e-3)
    assert groups["lora+crma@x2"]["gate"]["initial_lr"] == pytest.approx(2 * 1e-3)  # the ratios between groups stay
    assert len({r.loss for r in records if r.step == 1}) == 1  # same start, same batch
    assert result.summary["receipt"]["fair"], result.summary["receipt"]["problems"]
    selection = result.summary["lr_selection"]
    assert selection["tuned"] and set(selection["arms"]) == {"lora", "lora+crma"}
    assert result.summary["receipt"]["lr_choice"]["fair"]

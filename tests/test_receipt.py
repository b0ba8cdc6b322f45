"""The fairness receipt reads live state and can fail: a fair run passes, and each kind of sabotage is flagged."""

from __future__ import annotations

import torch

import crma
from crma.ablation.engine.arm_set import ArmSet
from crma.ablation.engine.loop import run_ablation
from crma.ablation.report.render import receipt_markdown
from crma.ablation.spec.schema import parse_config

GRID = ["lora", "lora+zclip", "lora+mix", "lora+crma"]
FAST = dict(
    model="tiny-random",
    rows=12,
    steps=3,
    batch_size=2,
    seq_len=160,
    save_adapters=False,
    zclip={"warmup_steps": 2},
)


def receipt_of(**overrides) -> dict:
    cfg = parse_config({**FAST, "arms": GRID, **overrides})
    *_, result = run_ablation(cfg)
    assert result.status == "finished", result.error
    return result.summary["receipt"]


def sabotage_setup(monkeypatch, act) -> None:
    """Run `act(arm_set)` right after the honest set-up (before the receipt's set-up facts are read)."""
    original = ArmSet.setup

    def setup(self):
        original(self)
        act(self)

    monkeypatch.setattr(ArmSet, "setup", setup)


def arm(arm_set: ArmSet, label: str):
    return next(a for a in arm_set.arms if a.label == label)


def test_a_fair_run_passes() -> None:
    receipt = receipt_of()
    assert receipt["fair"] is True and receipt["problems"] == []
    assert receipt["differs_only_in_adapter"] is True
    assert set(receipt["arms"]) == set(GRID)
    end = receipt["arms"]["lora+crma"]["end"]
    structural = end["optimizer"]["groups"]["structural"]  # read from the optimizer itself
    assert structural["initial_lr"] == 5e-3 and structural["lr"] == 0.0  # linear decay to 0 at the last step
    assert end["steps"] == 3 and end["clipper"]["kind"] == "zclip"
    assert receipt["declared"]["lora+zclip"] == ["clipper"]


def test_ten_times_the_learning_rate_in_one_arm_is_flagged(monkeypatch) -> None:
    def act(arm_set):
        for group in arm(arm_set, "lora+zclip").optimizer.param_groups:
            group["lr"] *= 10  # the schedule resets it from initial_lr after step 1; step 1 still ran at 10x

    sabotage_setup(monkeypatch, act)
    receipt = receipt_of()
    assert receipt["fair"] is False
    assert any("lora+zclip" in p and "optimizer.steps differs (first at step 1)" in p for p in receipt["problems"])
    assert "❌" in receipt_markdown({"receipt": receipt})


def test_other_betas_in_one_arm_are_flagged(monkeypatch) -> None:
    def act(arm_set):
        arm(arm_set, "lora+mix").optimizer.param_groups[0]["betas"] = (0.8, 0.99)

    sabotage_setup(monkeypatch, act)
    receipt = receipt_of()
    assert receipt["fair"] is False
    problems = " ".join(receipt["problems"])
    assert "lora+mix" in problems and "optimizer differs (proj.betas: [0.8, 0.99] vs [0.9, 0.999])" in problems


def test_a_different_batch_for_one_arm_is_flagged(monkeypatch) -> None:
    original = ArmSet.train_step

    def train_step(self, arm_, batch):
        if arm_.label == "lora+crma" and batch.step == 2:
            tensors = dict(batch.tensors, input_ids=batch.tensors["input_ids"].roll(1, dims=1))
            batch = type(batch)(batch.step, tensors, batch.indices, batch.loss_scale)
        return original(self, arm_, batch)

    monkeypatch.setattr(ArmSet, "train_step", train_step)
    receipt = receipt_of()
    assert receipt["fair"] is False and receipt["batches_seen_equal"] is False
    assert any("batches differs" in p and "lora+crma" in p for p in receipt["problems"])
    assert len(set(receipt["batches_seen_sha256"].values())) == 2


def test_an_extra_trainable_tensor_is_flagged(monkeypatch) -> None:
    def act(arm_set):
        norm = arm_set.model.base_model.model.model.norm.weight
        norm.requires_grad_(True)
        target = arm(arm_set, "lora+zclip")
        target.optimizer.param_groups[0]["params"].append(norm)  # trained with the LoRA group, unnoticed
        target.params.append(norm)

    sabotage_setup(monkeypatch, act)
    receipt = receipt_of()
    assert receipt["fair"] is False
    problems = " ".join(receipt["problems"])
    assert "neither LoRA nor CRMA" in problems and "model.norm.weight" in problems


def test_an_arm_that_does_not_do_what_its_name_says_is_flagged(monkeypatch) -> None:
    def act(arm_set):
        arm(arm_set, "lora+zclip").clipper = None  # silently back to the fixed clip

    sabotage_setup(monkeypatch, act)
    receipt = receipt_of()
    assert receipt["fair"] is False
    assert any(p.startswith("lora+zclip: the clipper is clip_grad_norm") for p in receipt["problems"])


def test_a_diverged_arm_is_compared_on_the_steps_it_took(monkeypatch) -> None:
    original = ArmSet.setup

    def poisoned(self):
        original(self)
        with torch.no_grad():
            block = crma.get_adapter(self.model, arm(self, "lora+crma").adapter)
            block.crma_B.fill_(float("nan"))

    monkeypatch.setattr(ArmSet, "setup", poisoned)
    receipt = receipt_of()
    assert receipt["arms"]["lora+crma"]["end"]["steps"] == 1
    assert receipt["fair"] is True and receipt["batches_seen_equal"] is True

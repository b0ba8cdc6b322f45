"""The fairness receipt reads live state and can fail: a fair run and a tuned-LR run pass, and each kind of sabotage
is flagged — for every pair the attribution compares, a difference the pair's names do not declare fails it."""

from __future__ import annotations

import pytest
import torch

import crma
from crma.ablation.engine.arm_set import ArmSet
from crma.ablation.engine.loop import train
from crma.ablation.engine.receipt import check_selection
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
    eval_rows=0,
)
CONTROLS = ["lora+zclip", "lora-matched", "lora+crma-nomix", "lora+crma"]


def receipt_of(**overrides) -> dict:
    cfg = parse_config({**FAST, "arms": GRID, **overrides})
    result = train(cfg)
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
    assert receipt["declared"]["lora+zclip"] == {
        "clipper": "zclip",
        "crma": False,
        "mixing": None,
        "capacity": "shared",
        "lr_scale": 1.0,
    }


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


def _sabotage_group(monkeypatch, label: str, group: str, factor: float) -> None:
    def act(arm_set):
        for param_group in arm(arm_set, label).optimizer.param_groups:
            if param_group.get("name") == group:
                param_group["lr"] *= factor
                param_group["initial_lr"] *= factor

    sabotage_setup(monkeypatch, act)


@pytest.mark.parametrize(
    ("arms", "target", "other"),
    [
        (GRID, "lora+crma", "lora+mix"),  # the pair of the ZClip effect: may differ in the clipper only
        (CONTROLS, "lora+crma", "lora+crma-nomix"),  # the pair of the Sinkhorn effect: in the mixing only
    ],
)
def test_ten_times_the_structural_lr_in_one_crma_arm_only_is_flagged(monkeypatch, arms, target, other) -> None:
    _sabotage_group(monkeypatch, target, "structural", 10.0)
    receipt = receipt_of(arms=arms)
    assert receipt["fair"] is False
    problems = " ".join(receipt["problems"])
    assert f"{target} vs {other}: optimizer.crma_groups.lr differs" in problems or (
        f"{other} vs {target}: optimizer.crma_groups.lr differs" in problems
    )
    assert f"{target}: the structural group trains at LR 0.05, not 0.005 × 1" in problems


def test_z_thresh_in_one_zclip_arm_only_is_flagged(monkeypatch) -> None:
    def act(arm_set):
        arm(arm_set, "lora+crma").clipper.config.z_thresh = 100.0  # the pair with lora+zclip differs in CRMA only

    sabotage_setup(monkeypatch, act)
    receipt = receipt_of()
    assert receipt["fair"] is False
    assert any(
        "clipper differs (z_thresh: 100.0 vs 2.5)" in p or "z_thresh: 2.5 vs 100.0" in p for p in receipt["problems"]
    )


def test_the_crma_rank_in_one_arm_only_is_flagged(monkeypatch) -> None:
    from dataclasses import replace

    real_attach = crma.attach

    def attach(model, config, *, adapter_name, **kwargs):
        if adapter_name == f"arm{GRID.index('lora+mix')}":  # lora+mix gets rank 2, lora+crma keeps 4
            config = replace(config, rank=2)
        return real_attach(model, config, adapter_name=adapter_name, **kwargs)

    monkeypatch.setattr(crma, "attach", attach)
    receipt = receipt_of()
    assert receipt["fair"] is False
    problems = " ".join(receipt["problems"])
    assert "crma differs (rank: 4 vs 2)" in problems or "crma differs (rank: 2 vs 4)" in problems


def test_a_tuned_lr_run_passes_and_states_how_each_lr_was_chosen() -> None:
    cfg = parse_config({**FAST, "arms": ["lora+zclip", "lora+crma"], "lr_grid": [0.5, 2.0], "val_rows": 3,
                        "eval_rows": 3})  # fmt: skip
    result = train(cfg)
    receipt = result.summary["receipt"]
    assert receipt["fair"] is True, receipt["problems"]
    choice = receipt["lr_choice"]
    assert choice["fair"] is True and "lowest mean final validation loss" in choice["how"]
    assert choice["chosen"] == {a: i["chosen"] for a, i in result.summary["lr_selection"]["arms"].items()}
    assert "How each arm's LR was chosen" in receipt_markdown(result.summary)


def test_an_lr_chosen_on_the_test_slice_fails_the_receipt(monkeypatch) -> None:
    """The summary's choice is checked against the raw evaluations; a choice made on the test slice (where it picks
    another multiplier than validation does) is caught."""
    cfg = parse_config({**FAST, "arms": ["lora+zclip"], "lr_grid": [0.5, 2.0], "val_rows": 3, "eval_rows": 3})
    result = train(cfg)
    summary, evals = result.summary, result.evals
    last = {(e.arm, e.split): e for e in evals}  # one seed: the last evaluation of each arm and split
    by_val = min((0.5, 2.0), key=lambda m: last[(f"lora+zclip@x{m:g}", "val")].loss)
    honest = summary["lr_selection"]["arms"]["lora+zclip"]
    assert honest["chosen"] == by_val and check_selection(summary, evals, summary["data"]["heldout"])["fair"]
    # Make the test slice prefer the other multiplier, then pick by it, as a dishonest selection would.
    other = 2.0 if by_val == 0.5 else 0.5
    for e in evals:
        if e.split == "test":
            e.loss = 0.0 if e.arm == f"lora+zclip@x{other:g}" else 10.0
    dishonest = {**honest, "chosen": other, "label": f"lora+zclip@x{other:g}"}
    summary["lr_selection"] = {**summary["lr_selection"], "arms": {"lora+zclip": dishonest}}
    verdict = check_selection(summary, evals, summary["data"]["heldout"])
    assert verdict["fair"] is False
    assert (
        f"lora+zclip: LR multiplier {other} was reported as chosen, but the validation losses pick {by_val}"
        in (verdict["problems"])
    )
    summary["lr_selection"]["split"] = "test"
    assert any("chosen on the 'test' slice" in p for p in check_selection(summary, evals, {})["problems"])

"""crma.integrations: Trainer and TRL's SFTTrainer train with CRMA + ZClip; logs, files, resume; 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_dist_script import IndexedTokens, RecordingCollator

import crma

ROOT = Path(__file__).resolve().parents[1]
ZCLIP_KEYS = ("grad_norm_pre", "grad_norm_post", "zclip_clipped")
MIXING_KEYS = ("crma_sigma2", "crma_dist_from_identity", "crma_composite_gain", "crma_alpha")
CRMA_FILES = ("crma_config.json", "crma.safetensors", "zclip_state.json")


def _peft_model(lora_seed: int = 0):
    from conftest import make_tiny_llama
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama().train()
    torch.manual_seed(lora_seed)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _trainer(out: Path, model=None, callbacks=None, optimizers=(None, None), **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=2,
        seed=0,
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return Trainer(
        model=_peft_model() if model is None else model,
        args=TrainingArguments(**settings),
        train_dataset=IndexedTokens(),
        data_collator=RecordingCollator(),
        callbacks=callbacks,
        optimizers=optimizers,
    )


def _train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _crma_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".crma." in n}


def test_prepare_trainer_builds_crma_param_groups_and_replaces_the_fixed_clip(tmp_path) -> None:
    from transformers import Trainer

    from crma.integrations import prepare_trainer

    trainer = prepare_trainer(_trainer(tmp_path), structural_lr=3e-3, gate_lr=7e-4)
    assert type(trainer).__name__ == "CRMATrainer" and isinstance(trainer, Trainer)
    assert trainer.args.max_grad_norm == 0.0  # ZClip clips; the Trainer only measures its grad_norm
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)  # the trainer's `optim` (adamw_torch) is kept
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"proj", "structural", "gate"}
    assert (groups["proj"]["lr"], groups["proj"]["weight_decay"]) == (1e-2, 0.01)
    assert (groups["structural"]["lr"], groups["structural"]["weight_decay"]) == (3e-3, 0.0)
    assert (groups["gate"]["lr"], groups["gate"]["weight_decay"]) == (7e-4, 0.0)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in trainer.model.named_parameters()}
    assert {names[id(p)] for p in groups["structural"]["params"]} == {
        "crma_log_mix",
        "crma_read_logits",
        "crma_write_logits",
    }
    assert {names[id(p)] for p in groups["gate"]["params"]} == {"crma_log_alpha"}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    full_names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert any(names[i] == "crma_B" for i in trainable) and any("lora_A" in full_names[i] for i in trainable)


def test_full_fine_tuning_keeps_the_trainers_no_decay_rule_for_norm_weights(tmp_path) -> None:
    from conftest import make_tiny_llama

    from crma.integrations import prepare_trainer

    trainer = prepare_trainer(_trainer(tmp_path, model=make_tiny_llama().train()))
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["proj_no_decay"]["params"]}
    assert groups["proj_no_decay"]["weight_decay"] == 0.0 and groups["proj"]["weight_decay"] == 0.01
    assert no_decay and all("norm" in n for n in no_decay)
    assert all("norm" not in names[id(p)] for p in groups["proj"]["params"])


def test_prepare_trainer_refuses_what_it_cannot_honour(tmp_path) -> None:
    from transformers import TrainingArguments

    from crma.integrations import CRMATrainerConfig, prepare_trainer

    with pytest.raises(TypeError, match="transformers.Trainer"):
        prepare_trainer(TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="unknown CRMATrainerConfig field"):
        prepare_trainer(_trainer(tmp_path), structual_lr=1e-3)
    with pytest.raises(ValueError, match="`gate_lr` must be > 0"):
        CRMATrainerConfig(gate_lr=0.0)
    trainer = prepare_trainer(_trainer(tmp_path))
    with pytest.raises(ValueError, match="already prepared"):
        prepare_trainer(trainer)
    model = _peft_model()
    with pytest.raises(ValueError, match="already has an optimizer"):
        prepare_trainer(
            _trainer(tmp_path, model=model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
        )
    attached = crma.attach(_peft_model())
    with pytest.raises(ValueError, match="already attached"):
        prepare_trainer(_trainer(tmp_path, model=attached), crma=crma.CRMAConfig())
    crma.disable(attached)
    with pytest.raises(ValueError, match="switched off"):
        prepare_trainer(_trainer(tmp_path, model=attached))


class _GradNormAtStep:
    """Records the global gradient norm the optimizer stepped with (on_optimizer_step runs before zero_grad)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Probe(TrainerCallback):
            def __init__(self) -> None:
                self.norms: list[float] = []

            def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                self.norms.append(torch.nn.utils.get_total_norm(grads).item())

        return Probe()


def test_trainer_trains_three_steps_with_zclip_and_mixing_logs_and_writes_crma_files(tmp_path) -> None:
    from crma.integrations import prepare_trainer

    probe = _GradNormAtStep()
    trainer = _trainer(tmp_path / "out", callbacks=[probe])
    cap = 2.0  # a hard cap on top of ZClip: the first step's norm (~3.4) is clipped, so clipping is exercised
    prepare_trainer(trainer, zclip=crma.ZClipConfig(warmup_steps=2, max_grad_norm=cap))
    before = _crma_state(trainer.model)
    trainer.train()

    logs = _train_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry, stepped_with in zip(logs, probe.norms, strict=True):
        assert set(ZCLIP_KEYS + MIXING_KEYS) <= set(entry)
        assert entry["grad_norm_pre"] == pytest.approx(entry["grad_norm"], rel=1e-6)  # the Trainer's own measure
        assert entry["zclip_clipped"] == int(entry["grad_norm_pre"] > cap)
        expected_post = (
            cap * entry["grad_norm_pre"] / (entry["grad_norm_pre"] + 1e-6) if entry["zclip_clipped"] else None
        )
        assert entry["grad_norm_post"] == pytest.approx(expected_post or entry["grad_norm_pre"], rel=1e-6)
        assert stepped_with == pytest.approx(entry["grad_norm_post"], rel=1e-5)  # the optimizer got clipped grads
        assert 0.0 < entry["crma_sigma2"] <= 1.0 and entry["crma_composite_gain"] == pytest.approx(1.0, abs=1e-4)
    assert sum(entry["zclip_clipped"] for entry in logs) >= 1
    assert trainer._crma.zclip.step_count == 3 and trainer._crma.zclip.mean is not None

    after = _crma_state(trainer.model)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(n.endswith("crma_B") for n in moved) and any(n.endswith("crma_log_alpha") for n in moved)
    for folder in ("checkpoint-2", "checkpoint-3", "."):
        assert all((tmp_path / "out" / folder / name).is_file() for name in CRMA_FILES), folder
    zclip_state = json.loads((tmp_path / "out" / "zclip_state.json").read_text())
    assert zclip_state == json.loads(json.dumps(trainer._crma.zclip.state_dict()))
    fresh = crma.load(_peft_model(), tmp_path / "out")
    assert all(torch.equal(after[n], v) for n, v in _crma_state(fresh).items())


def test_zclip_runs_once_per_optimizer_step_after_gradient_accumulation(tmp_path) -> None:
    from crma.integrations import prepare_trainer

    trainer = _trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_strategy="no")
    prepare_trainer(trainer, zclip=crma.ZClipConfig(warmup_steps=5))
    trainer.train()
    logs = _train_logs(trainer)
    assert trainer._crma.zclip.step_count == 3 and len(trainer._crma.zclip._warmup) == 3  # 3 steps, not 6 batches
    # The norm ZClip saw is the accumulated one the Trainer measured, the warm-up values are those norms.
    assert [e["grad_norm_pre"] for e in logs] == pytest.approx([e["grad_norm"] for e in logs], rel=1e-6)
    assert trainer._crma.zclip._warmup == pytest.approx([e["grad_norm"] for e in logs], rel=1e-6)


def test_under_fsdp_the_mixing_diagnostics_are_skipped_with_one_warning(tmp_path, caplog) -> None:
    # FSDP cannot run through the Trainer on CPU (accelerate falls back to DDP), so only this fallback is tested:
    # sharded CRMA parameters are not read, the ZClip keys still are logged.
    from crma.integrations import prepare_trainer

    trainer = prepare_trainer(_trainer(tmp_path))
    trainer.is_fsdp_enabled = True
    for _ in range(2):
        trainer._crma.window.add(crma.ClipResult(3.0, 2.0, True))
        trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert (logged["grad_norm_pre"], logged["grad_norm_post"], logged["zclip_clipped"]) == (3.0, 2.0, 1)
    assert not any(key.startswith("crma_") for key in logged)
    assert sum("mixing diagnostics are skipped" in r.getMessage() for r in caplog.records) == 1


def test_resuming_from_a_checkpoint_restores_crma_and_zclip_and_gives_the_same_next_losses(tmp_path) -> None:
    from crma.integrations import prepare_trainer

    zclip = crma.ZClipConfig(warmup_steps=2)  # statistics are set at step 2: steps 3-4 depend on them
    straight = prepare_trainer(_trainer(tmp_path / "a", max_steps=4), zclip=zclip)
    straight.train()
    # A different LoRA init: anything the resume failed to restore would change the losses.
    resumed = prepare_trainer(_trainer(tmp_path / "b", model=_peft_model(lora_seed=1), max_steps=4), zclip=zclip)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))

    expected = {e["step"]: e for e in _train_logs(straight)}
    got = {e["step"]: e for e in _train_logs(resumed)}
    assert sorted(got) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer_state.json
    for step in (3, 4):
        for key in ("loss", "grad_norm_pre", "grad_norm_post", "crma_alpha", "crma_sigma2"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)
    state_a, state_b = straight._crma.zclip.state_dict(), resumed._crma.zclip.state_dict()
    assert (
        (state_b["step_count"], state_b["config"])
        == (state_a["step_count"], state_a["config"])
        == (4, zclip.to_dict())
    )
    assert (state_b["mean"], state_b["var"]) == pytest.approx((state_a["mean"], state_a["var"]), rel=1e-6)
    final_a, final_b = _crma_state(straight.model), _crma_state(resumed.model)
    assert all(torch.allclose(final_a[n], final_b[n], atol=1e-7) for n in final_a)


def test_resuming_from_a_checkpoint_without_crma_files_is_an_error(tmp_path) -> None:
    from crma.integrations import prepare_trainer

    trainer = prepare_trainer(_trainer(tmp_path / "a", max_steps=2))
    trainer.train()
    (tmp_path / "a" / "checkpoint-2" / "crma.safetensors").unlink()
    resumed = prepare_trainer(_trainer(tmp_path / "a", max_steps=4))
    with pytest.raises(FileNotFoundError, match="crma.safetensors"):
        resumed.train(resume_from_checkpoint=True)  # True: the last checkpoint in output_dir, as Trainer resolves it


def test_trl_example_trains_an_sft_trainer_with_crma(tmp_path, monkeypatch) -> None:
    # docs/trl_example.py as written, offline: a saved tiny model folder for the Hub id, local rows, 3 steps.
    from conftest import make_tiny_llama
    from datasets import Dataset
    from test_data import CHAT_TEMPLATE, make_byte_tokenizer

    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    make_byte_tokenizer(CHAT_TEMPLATE).save_pretrained(model_dir)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {n}."},
                {"role": "assistant", "content": " ".join("1" * n)},
            ]
        }
        for n in range(1, 9)
    ]
    monkeypatch.chdir(tmp_path)
    example = (ROOT / "docs" / "trl_example.py").read_text()
    swaps = {
        'load_dataset("trl-lib/Capybara", split="train")': "Dataset.from_list(ROWS)",
        '"HuggingFaceTB/SmolLM2-135M-Instruct"': repr(str(model_dir)),
        'SFTConfig(output_dir="smollm2-crma", report_to="trackio")': (
            'SFTConfig(output_dir="smollm2-crma", report_to="none", max_steps=3, logging_steps=1, '
            "per_device_train_batch_size=4, max_length=64, use_cpu=True, save_steps=2, disable_tqdm=True)"
        ),
    }
    for original, offline in swaps.items():
        assert original in example, original
        example = example.replace(original, offline)
    namespace = {"Dataset": Dataset, "ROWS": rows}
    exec(compile(example, "docs/trl_example.py", "exec"), namespace)  # noqa: S102 - our own example, run as a test

    trainer = namespace["trainer"]
    assert type(trainer).__name__ == "CRMASFTTrainer"
    logs = _train_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:
        # Ours and TRL's own metrics (its `log` override still runs, after ours).
        assert set(ZCLIP_KEYS + MIXING_KEYS + ("mean_token_accuracy", "num_tokens")) <= set(entry)
    crma_params = {n: p for n, p in trainer.model.named_parameters() if ".crma." in n}
    assert crma_params and all(p.requires_grad for p in crma_params.values())  # peft had frozen nothing of ours
    assert any(p.abs().sum() > 0 for n, p in crma_params.items() if n.endswith("crma_B"))  # B left zero: it trained
    for folder in ("smollm2-crma/checkpoint-2", "smollm2-crma"):
        assert all((tmp_path / folder / name).is_file() for name in CRMA_FILES), folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = {
    # --standalone: torchrun picks a free port itself (other test runs may share this machine).
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # --multi_gpu selects accelerate's torch.distributed launcher; the script's use_cpu=True makes it gloo on CPU
    # (accelerate's --cpu with several processes wants mpirun instead).
    "accelerate launch": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> tuple[dict, Path]:
    """tests/trainer_dist_script.py in this process (world size 1, batch 4 per step)."""
    from trainer_dist_script import run

    out = tmp_path_factory.mktemp("one_process")
    return run(str(out)), out


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_gloo_processes_match_one_process(one_process_run, launcher: str, tmp_path) -> None:
    from safetensors.torch import load_file

    reference, reference_dir = one_process_run
    command = [sys.executable, *LAUNCHERS[launcher]]
    if launcher == "accelerate launch":
        command += ["--main_process_port", str(_free_port())]
    command += [str(ROOT / "tests" / "trainer_dist_script.py"), "--out", str(tmp_path), "--report-to", "trackio"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reference["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    # Fresh processes: importing peft, transformers' Trainer and crma.integrations imported no trl/trackio/gradio.
    assert [r["optional_imported"] for r in ranks] == [[], []]

    # Each rank did its share: per step, two disjoint halves of the one-process batch (the data loader fetches
    # one batch ahead, so only the first 3 batches were trained on).
    for step in range(3):
        halves = [set(r["indices"][step]) for r in ranks]
        assert [len(h) for h in halves] == [2, 2] and halves[0].isdisjoint(halves[1])
        assert halves[0] | halves[1] == set(reference["indices"][step])

    # Same loss, pre- and post-clip norms and clipping decisions as one process, and the same on both ranks.
    expected = _train_logs_of(reference)
    assert sum(e["zclip_clipped"] for e in expected) >= 1  # step 1 is clipped by the hard cap
    for record in ranks:
        got = _train_logs_of(record)
        assert [e["step"] for e in got] == [e["step"] for e in expected] == [1, 2, 3]
        for mine, theirs in zip(got, expected, strict=True):
            for key in ("loss", "grad_norm_pre", "grad_norm_post"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), (mine["step"], key)
            assert mine["zclip_clipped"] == theirs["zclip_clipped"]
    assert [[e[k] for k in ZCLIP_KEYS] for e in _train_logs_of(ranks[0])] == [
        [e[k] for k in ZCLIP_KEYS] for e in _train_logs_of(ranks[1])
    ]

    # Same CRMA (and LoRA) parameters after 3 steps; only the main process wrote CRMA files.
    lora = "train/checkpoint-3/adapter_model.safetensors"
    for name in ("train/crma.safetensors", "train/checkpoint-2/crma.safetensors", lora):
        ours, theirs = load_file(tmp_path / name), load_file(reference_dir / name)
        assert set(ours) == set(theirs)
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5, name
    assert ranks[0]["crma_writes"] == ["train/checkpoint-2", "train/checkpoint-3", "train"]
    assert ranks[1]["crma_writes"] == []

    # trackio (local SQLite under TRACKIO_DIR): one run, from the main process, with the CRMA keys of every step.
    with sqlite3.connect(tmp_path / "trackio" / "crma-dist.db") as db:
        rows = db.execute("SELECT run_id, metrics FROM metrics ORDER BY id").fetchall()
    assert len({run_id for run_id, _ in rows}) == 1
    step_rows = [json.loads(metrics) for _, metrics in rows if b'"train/loss"' in metrics]  # not the run summary
    assert len(step_rows) == 3
    for logged, entry in zip(step_rows, _train_logs_of(ranks[0]), strict=True):
        for key in ZCLIP_KEYS + MIXING_KEYS:
            assert logged[f"train/{key}"] == pytest.approx(entry[key], rel=1e-12), key


def _train_logs_of(record: dict) -> list[dict]:
    return [entry for entry in record["log_history"] if "loss" in entry]

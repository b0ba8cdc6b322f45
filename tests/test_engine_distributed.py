"""The ablation engine data-parallel: `accelerate launch -m crma ablate` with 2 gloo CPU processes against one process,
and the sharding arithmetic (token-weighted losses, summed gradients) checked in this process."""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from crma.ablation.cli import run_cli
from crma.ablation.engine.distributed import DataParallel, data_parallel, loss_tokens
from crma.ablation.output.run_folder import config_json
from crma.ablation.spec.config import AblationConfig

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["lora", "lora+crma", "lora+zclip"]
# Batch 4 over 2 processes: 2 rows each per step. ZClip's warm-up of 2 steps makes step 3 its first decision, and it
# clips there (lora+crma and lora+zclip), so a clipped step is compared too.
ABLATE = [
    "ablate",
    "--model",
    "tiny-random",
    "--rows",
    "12",
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--seq-len",
    "160",
    "--arms",
    ",".join(ARMS),
    "--zclip-warmup-steps",
    "2",
    "--device",
    "cpu",
    "--no-charts",
    "--no-progress",
    "--answer-rows",  # answers are the main process's alone, and another test's subject
    "0",
]
# Figures that measure this machine, not the training.
MACHINE_KEYS = ("wall_s", "tokens_per_s", "memory_mb_peak", "step_time_s", "memory_mb", "eval_s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# In this process: the arithmetic of one data-parallel step, two ranks simulated


def _uneven_batch() -> dict[str, torch.Tensor]:
    # Rows with very different numbers of loss tokens: a plain mean of the ranks' means would weight them wrongly.
    ids = torch.randint(0, 259, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :11] = -100  # 1 loss token (the first position never counts: labels are shifted)
    labels[1, :2] = -100  # 10
    labels[2, :6] = -100  # 6
    labels[3, :] = -100  # 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _grads_of(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_shards_split_each_batch_and_their_weighted_losses_and_gradients_sum_to_one_process() -> None:
    from crma.ablation.engine.arm_set import ArmSet

    model = make_tiny_llama().train()
    batch = _uneven_batch()
    full = model(**batch).loss
    full_grads = _grads_of(model, full)
    assert loss_tokens(batch["labels"]).tolist() == [1, 10, 6, 0]

    shards = [
        DataParallel(rank=r, world_size=2, backend="gloo", device=torch.device("cpu")).shard(batch, [10, 11, 12, 13])
        for r in range(2)
    ]
    assert [s.rows for s in shards] == [[0, 2], [1, 3]] and [s.indices for s in shards] == [[10, 12], [11, 13]]
    assert [s.loss_tokens for s in shards] == [7, 10] and {s.batch_loss_tokens for s in shards} == {17}
    for shard in shards:  # same padded width as the batch, rows copied as they are
        assert torch.equal(shard.tensors["input_ids"], batch["input_ids"][shard.rows])

    losses, grads = [], []
    for shard in shards:
        loss = ArmSet._shard_loss(model(**shard.tensors), shard)
        losses.append(loss.detach())
        grads.append(_grads_of(model, loss))
    assert float(sum(losses)) == pytest.approx(full.item(), rel=1e-6)
    for total, one, two in zip(full_grads, *grads, strict=True):
        assert torch.allclose(one + two, total, rtol=1e-5, atol=1e-7)
    # The unweighted mean of the two shard means misses by more than the 1e-5 the launch test allows (a random model's
    # token losses are all near ln(259), so by little): the weighting is what makes them equal.
    means = [model(**s.tensors).loss.item() for s in shards]
    assert sum(means) / 2 != pytest.approx(full.item(), rel=1e-5, abs=1e-5)


def test_a_shard_without_loss_tokens_adds_zero_gradients_not_nan() -> None:
    from crma.ablation.engine.arm_set import ArmSet

    model = make_tiny_llama().train()
    batch = _uneven_batch()
    batch["labels"][1] = -100  # rank 1 of 4 holds row 1 only, now without any loss token
    shard = DataParallel(rank=1, world_size=4, backend="gloo", device=torch.device("cpu")).shard(batch, [0, 1, 2, 3])
    assert shard.loss_tokens == 0 and shard.batch_loss_tokens == 7
    assert math.isnan(model(**shard.tensors).loss.item())  # what the model alone gives
    loss = ArmSet._shard_loss(model(**shard.tensors), shard)
    grads = _grads_of(model, loss)
    assert loss.item() == 0.0 and grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_one_process_runs_without_a_process_group(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert data_parallel("cpu") is None
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("env", "name"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_sharded_launch_is_refused_before_joining_any_group(env: str, name: str, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(env, "true")
    with pytest.raises(ValueError, match=f"does not support {name}"):
        data_parallel("cpu")
    assert not torch.distributed.is_initialized()


def test_a_batch_smaller_than_the_launch_fails_before_training(monkeypatch) -> None:
    import crma.ablation.engine.loop as engine
    from crma.ablation.spec.schema import parse_config

    four = DataParallel(rank=0, world_size=4, backend="gloo", device=torch.device("cpu"))
    monkeypatch.setattr(engine, "data_parallel", lambda device: four)
    cfg = parse_config({"model": "tiny-random", "rows": 8, "steps": 2, "batch_size": 2})
    result = engine.train(cfg)
    assert result.status == "failed" and not result.records
    assert result.error.startswith("Batch size (2) is smaller than the number of processes (4)")


def test_config_json_records_the_world_size_and_reads_back(tmp_path) -> None:
    cfg = AblationConfig(model="tiny-random", steps=2)
    text = config_json(cfg, world_size=2)
    assert json.loads(text)["world_size"] == 2
    assert AblationConfig.from_json(text) == cfg
    # A run's config.json is a valid --config: the launch fact is skipped, not an unknown setting.
    path = tmp_path / "config.json"
    path.write_text(config_json(AblationConfig(model="tiny-random", rows=8, steps=1, batch_size=2), world_size=2))
    out = tmp_path / "run"
    assert run_cli(["ablate", "--config", str(path), "--out", str(out), "--no-progress", "--no-charts"]) == 0
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Two gloo processes under `accelerate launch -m crma ablate`


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same ablation in this process (one thread, as each launched process has)."""
    out = tmp_path_factory.mktemp("one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli([*ABLATE, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, Path]:
    """`accelerate launch` with 2 CPU processes (gloo), reporting to a local trackio folder."""
    root = tmp_path_factory.mktemp("two")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # accelerate's torch.distributed launcher; `--device cpu` makes the processes gloo ones
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "crma",
        *ABLATE,
        "--out",
        str(root / "run"),
        "--report-to",
        "trackio",
        "--report-project",
        "crma-dist",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRACKIO_DIR": str(root / "trackio")}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("finished: 9 records") == 1  # one process printed the summary
    return root / "run", root / "trackio"


def _metrics(folder: Path, kind: str | None = None) -> list[dict]:
    """`metrics.jsonl`'s step records (`kind` None) or its held-out evaluations (`kind` "eval")."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("kind") == kind]


def _max_difference(a: object, b: object, path: str = "") -> float:
    """Largest difference between two JSON values of the same shape, relative to max(1, |b|); a `rel_pct` (a
    percentage: 100 x a ratio of two such figures) is compared as the fraction it is. Machine figures are skipped;
    anything that is not a float must be equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        return max([_max_difference(a[k], b[k], f"{path}.{k}") for k in a if k not in MACHINE_KEYS], default=0.0)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        pairs = enumerate(zip(a, b, strict=True))
        return max([_max_difference(x, y, f"{path}[{i}]") for i, (x, y) in pairs], default=0.0)
    if isinstance(a, float) and not isinstance(b, bool) and isinstance(b, (int, float)):
        scale = 100.0 if path.endswith(".rel_pct") else 1.0
        return abs(a - b) / max(1.0, abs(b)) / scale
    assert a == b, (path, a, b)
    return 0.0


def test_two_processes_write_the_files_of_one_process(one_process, two_processes) -> None:
    from safetensors.torch import load_file

    two, _ = two_processes
    one = one_process
    # One set of files, in place (no staging folder left), the same ones as one process writes.
    assert sorted(p.name for p in two.parent.iterdir()) == ["run", "trackio"]
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())

    # Every step of every arm: the same loss, grad norms and clipping decision as one process.
    mine, theirs = _metrics(two), _metrics(one)
    assert [(r["arm"], r["step"]) for r in mine] == [(r["arm"], r["step"]) for r in theirs] and len(mine) == 9
    assert sum(r["clipped"] for r in theirs) >= 2
    for got, want in zip(mine, theirs, strict=True):
        assert (got["clipped"], got["tokens"], got["lr"]) == (want["clipped"], want["tokens"], want["lr"])
        for key in ("loss", "grad_norm_pre", "grad_norm_post", "grad_norm_lora"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (got["arm"], got["step"], key)
    # Every process evaluates the whole held-out slice on its replica: the main one's figures are one process's.
    heldout, reference_heldout = _metrics(two, "eval"), _metrics(one, "eval")
    assert [(e["arm"], e["step"]) for e in heldout] == [(e["arm"], e["step"]) for e in reference_heldout]
    assert all(
        a["loss"] == pytest.approx(b["loss"], rel=1e-5) for a, b in zip(heldout, reference_heldout, strict=True)
    )

    # The same trained adapters (LoRA and CRMA tensors).
    saved = sorted(one.rglob("*.safetensors"))
    assert {p.parent.name for p in saved} == set(ARMS) and any(p.name == "crma.safetensors" for p in saved)
    for path in saved:
        ours, ref = load_file(two / path.relative_to(one)), load_file(path)
        assert set(ours) == set(ref)
        assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5, path.name

    # config.json and summary.json: the launch's world size, and otherwise the one-process content.
    configs = [json.loads((folder / "config.json").read_text()) for folder in (two, one)]
    assert [c.pop("world_size") for c in configs] == [2, 1] and configs[0] == configs[1]
    summary, reference = (json.loads((folder / "summary.json").read_text()) for folder in (two, one))
    assert (summary.pop("world_size"), reference.pop("world_size")) == (2, 1)
    shards = summary.pop("distributed")
    assert summary["status"] == "finished" and summary["receipt"]["fair"]
    assert _max_difference(summary, reference) <= 1e-5  # receipts (init hashes, batch digests) compare exactly

    # Each process did its share: per step, two disjoint halves of the step's batch; 2 rows per arm per step each.
    assert shards["world_size"] == 2 and shards["backend"] == "gloo"
    seed = shards["seeds"]["42"]
    assert seed["replicas_in_sync"] is True
    for batch, halves in zip(seed["batches"], seed["examples"], strict=True):
        assert [len(h) for h in halves] == [2, 2] and set(halves[0]).isdisjoint(halves[1])
        assert sorted(halves[0] + halves[1]) == sorted(batch)
    assert seed["rows"] == [dict.fromkeys(ARMS, 6)] * 2  # one process feeds each arm 12 rows in 3 steps


def test_report_to_trackio_logs_one_run_per_arm_from_the_main_process(two_processes) -> None:
    two, trackio_dir = two_processes
    with sqlite3.connect(trackio_dir / "crma-dist.db") as db:
        every = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
        rows = [row for row in every if "loss" in json.loads(row[2])]  # the step records (evaluations log apart)
        assert len(every) - len(rows) == 2 * len(ARMS)  # each arm's held-out loss at step 0 and at the end
        configs = {name: json.loads(config) for name, config in db.execute("SELECT run_name, config FROM configs")}
    names = [f"run-{arm}-seed42" for arm in ARMS]
    assert sorted({name for name, _, _ in rows}) == sorted(names) == sorted(configs)  # not one set per process
    logged_at = {(name, step): json.loads(metrics) for name, step, metrics in rows}
    assert len(logged_at) == len(rows) == 9
    for record in _metrics(two):
        logged = logged_at[(f"run-{record['arm']}-seed42", record["step"])]
        for key in ("loss", "grad_norm_pre", "grad_norm_post", "lr", "tokens"):
            assert logged[key] == record[key], key
        assert logged["clipped"] == int(record["clipped"])
    for arm in ARMS:
        config = configs[f"run-{arm}-seed42"]
        assert (config["arm"], config["seed"], config["world_size"]) == (arm, 42, 2)
        assert config["_Group"] == "run"  # the run folder's name groups the arms
        assert config["ablation"]["arms"] == ARMS and config["receipt"]["fair"] is True
        assert config["receipt"]["setup"]["lora"]["r"] == 8

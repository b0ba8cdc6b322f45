"""Two-process (gloo, CPU) checks of ZClip's global norm, run by tests/test_zclip.py through torch.multiprocessing.

Every rank builds the same full gradients from fixed seeds, so it can compute the one-process reference itself; the
rank then clips only what a distributed run would give it (a shard, a DTensor, an FSDP or DDP model) and writes what
it saw to `<out>/rank<k>.json` for the test to compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from crma import ZClip

# Gradient scale per step: 3 warm-up steps, a spike that must be clipped, then a calm step.
SCALES = (1.0, 2.0, 3.0, 10.0, 2.5)
WARMUP = 3


def _full_grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    shapes = [(6, 4), (5,), (4, 3), (7,)]
    grads = [torch.randn(shape, generator=gen) for shape in shapes]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    return [g * (SCALES[step] / total) for g in grads]


def _reference() -> tuple[list[tuple[float, float, bool]], list[list[list[float]]]]:
    """One process, all parameters: what every distributed variant must reproduce."""
    zclip, results, clipped_grads = ZClip(warmup_steps=WARMUP), [], []
    for step in range(len(SCALES)):
        params = [nn.Parameter(torch.zeros_like(g)) for g in _full_grads(step)]
        for p, g in zip(params, _full_grads(step), strict=True):
            p.grad = g
        results.append(tuple(zclip.step(params)))
        clipped_grads.append([p.grad.flatten().tolist() for p in params])
    return results, clipped_grads


def _with_grads(pairs: list[tuple[int, torch.Tensor]]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros_like(g)) for _, g in pairs]
    for p, (_, g) in zip(params, pairs, strict=True):
        p.grad = g.clone()
    return params


def _hand_split(rank: int, world: int) -> dict:
    """Each rank owns every other parameter (a disjoint part of the gradient): sharded=True sums over ranks."""
    zclip, local = ZClip(warmup_steps=WARMUP, sharded=True), ZClip(warmup_steps=WARMUP)
    results, local_norms, grads = [], [], []
    for step in range(len(SCALES)):
        mine = [(i, g) for i, g in enumerate(_full_grads(step)) if i % world == rank]
        local_norms.append(local.step(_with_grads(mine)).pre_norm)  # without the reduction: this rank's part only
        params = _with_grads(mine)
        results.append(tuple(zclip.step(params)))
        grads.append({i: p.grad.flatten().tolist() for (i, _), p in zip(mine, params, strict=True)})
    return {"results": results, "local_pre_norms": local_norms, "grads": grads}


def _dtensor(world: int) -> dict:
    """Parameters and gradients as DTensors sharded on dim 0 (what FSDP2 holds): no flag, torch reduces the norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    zclip, results, grads = ZClip(warmup_steps=WARMUP), [], []
    for step in range(len(SCALES)):
        full = _full_grads(step)
        params = [nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, [Shard(0)])) for g in full]
        for p, g in zip(params, full, strict=True):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        results.append(tuple(zclip.step(params)))
        grads.append([p.grad.full_tensor().flatten().tolist() for p in params])
    return {"results": results, "grads": grads}


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    # The fourth batch is 40x larger: a gradient spike ZClip must clip.
    return [torch.randn(4, 8, generator=gen) * (40.0 if step == 3 else 1.0) for step in range(len(SCALES))]


def _model_reference() -> list[tuple[float, float, bool]]:
    """One process, the whole batch: the MLP's loss is a mean over samples, as DDP/FSDP average over ranks."""
    model, zclip, results = _mlp(), ZClip(warmup_steps=WARMUP), []
    for x in _batches():
        model.zero_grad()
        model(x).pow(2).mean().backward()
        results.append(tuple(zclip.step(model)))
    return results


def _wrapped_run(model: nn.Module, zclip: ZClip, rank: int, world: int) -> list[tuple[float, float, bool]]:
    results = []
    for x in _batches():
        model.zero_grad()
        half = x.shape[0] // world
        model(x[rank * half : (rank + 1) * half]).pow(2).mean().backward()
        results.append(tuple(zclip.step(model)))
    return results


def _ddp(rank: int, world: int) -> list:
    model = nn.parallel.DistributedDataParallel(_mlp())
    return _wrapped_run(model, ZClip(warmup_steps=WARMUP), rank, world)


def _fsdp2(rank: int, world: int) -> list:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return _wrapped_run(model, ZClip(warmup_steps=WARMUP), rank, world)


def _fsdp1(rank: int, world: int) -> list:
    from torch.distributed.fsdp import FullyShardedDataParallel

    # use_orig_params=False: parameters() are this rank's flat shards, a disjoint part of the gradient.
    model = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"), use_orig_params=False)
    return _wrapped_run(model, ZClip(warmup_steps=WARMUP, sharded=True), rank, world)


def run(rank: int, world: int, out: str) -> None:
    """Entry point of `torch.multiprocessing.spawn`: every scenario in one process group."""
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ref_results, ref_grads = _reference()
        record = {
            "reference": {"results": ref_results, "grads": ref_grads},
            "model_reference": _model_reference(),
            "hand_split": _hand_split(rank, world),
            "dtensor": _dtensor(world),
            "ddp": _ddp(rank, world),
            "fsdp2": _fsdp2(rank, world),
            "fsdp1": _fsdp1(rank, world),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()

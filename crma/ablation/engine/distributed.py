"""Data parallelism for the ablation engine under `accelerate launch` or `torchrun`, through accelerate's
`PartialState` (which joins the launcher's process group: gloo on CPU, NCCL on GPUs).

Every process holds the whole base model and every arm, and plans the same batches. At each step each process trains
every arm, in the same lockstep, on its rows of the step's batch (rows `rank::world_size`):

    loss_r = mean token loss of my rows * (my loss tokens / the batch's loss tokens)
    backward(loss_r); all_reduce(SUM) of the arm's gradients; clip; optimizer step

A causal LM's loss is a mean over the loss tokens of the batch, so the ranks' `loss_r` sum to the one-process loss and
their summed gradients are the one-process gradient (not a mean of per-rank means, which would weight a short shard
like a long one). Clipping then sees the same global norm on every rank (DDP semantics: ZClip with `sharded=False`),
every rank takes the same decision, and the optimizers stay in step without any parameter traffic.

Why not DDP: the arms share one base model and differ by which adapter is active; DDP wraps one module with one set
of parameters and reduces in backward hooks. An explicit all-reduce of the active arm's gradients after its backward
is the same arithmetic, one bucket per dtype.

Only the main process (rank 0) writes files, prints progress, logs to trackers and yields records; the others run
every step and end with their own `RunResult`. Without a launcher (world size 1) none of this is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# What the launchers set when they start several processes; a process group needs WORLD_SIZE > 1 to be worth it.
_WORLD_SIZE_ENV = "WORLD_SIZE"
# Launch modes that shard the model itself: the engine replicates it, so it refuses them rather than ignore them.
_SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


@dataclass
class Shard:
    """This process's rows of one step's batch.

    Args:
        rows (`list[int]`): positions in the batch (`rank::world_size`).
        indices (`list[int]`): the examples those rows hold.
        tensors (`dict[str, Tensor]`): `input_ids`, `attention_mask`, `labels` of those rows (same width as the batch).
        loss_tokens (`int`): tokens of these rows the loss is taken over (labels shifted by one, as the LM does).
        batch_loss_tokens (`int`): the same over the whole batch, every process's rows together.
    """

    rows: list[int]
    indices: list[int]
    tensors: dict[str, torch.Tensor]
    loss_tokens: int
    batch_loss_tokens: int

    @property
    def loss_share(self) -> float:
        """This shard's part of the batch's loss tokens (NaN when the batch has none: the loss is undefined)."""
        return self.loss_tokens / self.batch_loss_tokens if self.batch_loss_tokens else float("nan")


def loss_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Tokens a causal LM's loss averages over, per row: labels are shifted by one inside the model, so the first
    position never counts (as in `transformers`' `ForCausalLMLoss`).

    Args:
        labels (`Tensor`): `(b, t)` labels with `ignore_index` where no loss is taken.
        ignore_index (`int`): the label that is skipped.

    Returns:
        `Tensor`: `(b,)` counts.
    """
    return (labels[:, 1:] != ignore_index).sum(dim=1)


def _buckets(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    # One flat buffer per (device, dtype): one collective each instead of one per tensor.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class DataParallel:
    """This process's place in a data-parallel ablation run, and the few collectives the engine makes.

    Build it with `data_parallel`; every method that communicates must be called by every process at the same point
    of the run.

    Args:
        rank (`int`): this process's rank.
        world_size (`int`): number of processes.
        backend (`str`): the process group's backend (`gloo`, `nccl`).
        device (`torch.device`): this process's device (`cuda:<local rank>` or `cpu`).
    """

    def __init__(self, *, rank: int, world_size: int, backend: str, device: torch.device):
        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, prints progress and logs to trackers."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """`world_size`, `backend` and the split rule, for the summary."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "split": "each step's batch by rows rank::world_size; loss weighted by loss tokens, gradients summed",
        }

    # -- the batch ------------------------------------------------------------------------------------------------
    def shard(self, tensors: dict[str, torch.Tensor], indices: Sequence[int], *, ignore_index: int = -100) -> Shard:
        """This process's rows of a step's batch, with the loss-token counts that weight its loss.

        Args:
            tensors (`dict[str, Tensor]`): the whole batch (`labels` included).
            indices (`Sequence[int]`): the examples of its rows.
            ignore_index (`int`): the label without loss.

        Returns:
            `Shard`.
        """
        rows = list(range(self.rank, len(indices), self.world_size))
        per_row = loss_tokens(tensors["labels"], ignore_index)
        picked = torch.tensor(rows, dtype=torch.long, device=per_row.device)
        return Shard(
            rows=rows,
            indices=[int(indices[r]) for r in rows],
            tensors={k: v.index_select(0, picked.to(v.device)) for k, v in tensors.items()},
            loss_tokens=int(per_row.index_select(0, picked).sum()),
            batch_loss_tokens=int(per_row.sum()),
        )

    # -- collectives (accelerate's, on one flat buffer per dtype) ----------------------------------------------------
    @torch.no_grad()
    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every `.grad` by its sum over the processes (the parameters whose `.grad` is None are skipped;
        every process has the same ones, since every process runs the same graph)."""
        from accelerate.utils import reduce

        for group in _buckets(p.grad for p in params if p.grad is not None):
            _unflatten_into(reduce(torch.cat([g.reshape(-1) for g in group]), reduction="sum"), group)

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` on every process with rank 0's values (in place)."""
        from accelerate.utils import broadcast

        for group in _buckets(tensors):
            _unflatten_into(broadcast(torch.cat([t.detach().reshape(-1) for t in group]), from_process=0), group)

    def sum(self, value: torch.Tensor) -> float:
        """The sum over the processes of a 0-dim tensor, as a float (a host sync)."""
        from accelerate.utils import reduce

        return reduce(value.detach().float().reshape(1), reduction="sum").item()

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on at least one."""
        from accelerate.utils import reduce

        return bool(reduce(torch.tensor([float(flag)], device=self.device), reduction="max").item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable), in rank order, on every process."""
        from accelerate.utils import gather_object

        return gather_object([obj])  # one list per process, concatenated: one `obj` each

    def close(self) -> None:
        """Leave the process group (end of the launch)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched_world_size() -> int:
    """The number of processes the launcher started (`WORLD_SIZE`; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get(_WORLD_SIZE_ENV, "1")))
    except ValueError:
        return 1


def _requested_processes() -> int | None:
    """How many processes `accelerate launch` was asked for, read from its command line (the parent process): its
    simple launcher, used for `--cpu` without mpirun, starts one process and tells it nothing."""
    if "ACCELERATE_USE_CPU" not in os.environ:  # not started by accelerate's simple launcher
        return None
    try:
        import psutil

        argv = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no such process, no permission, no psutil: nothing to say
        return None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value.isdigit():
                return int(value)
    return None


def launch_mismatch_note(parallel: DataParallel | None) -> str | None:
    """A sentence when the launcher asked for more processes than this run sees (None when they agree)."""
    requested, seen = _requested_processes(), parallel.world_size if parallel is not None else 1
    if requested is None or requested <= seen:
        return None
    return (
        f"accelerate launch was asked for {requested} processes, but this run sees {seen}: accelerate starts "
        "multi-process CPU runs only through mpirun (its --mpirun_hostfile); use `torchrun --nproc-per-node "
        f"{requested} -m crma ablate --device cpu ...` for {requested} CPU processes. This run trained in {seen}."
    )


def world_size() -> int:
    """The world size of this process's group: the initialised process group's, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def data_parallel(device: str = "auto") -> DataParallel | None:
    """Join the launcher's process group through accelerate's `PartialState`, or None in a single process.

    Args:
        device (`str`): the config's `device` (`auto`, `cpu`, `cuda`): `cpu` (or `auto` without a GPU) runs gloo
            processes on the CPU; otherwise each process takes the GPU of its local rank (NCCL).

    Returns:
        `DataParallel | None`: None unless started by `accelerate launch` / `torchrun` with more than one process
        (or inside an already initialised process group of several).

    Raises:
        `ValueError`: the launch shards the model (FSDP, DeepSpeed), which the engine does not support, or no process
        group could be formed.
    """
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if launched_world_size() == 1 and not (initialised and torch.distributed.get_world_size() > 1):
        return None
    for env, name in _SHARDING_ENV.items():
        if os.environ.get(env, "false").lower() == "true":
            raise ValueError(
                f"the ablation engine replicates the base model on every process (data parallel) and does not "
                f"support {name}: launch with plain multi-GPU (`accelerate launch --multi_gpu`), or train one arm "
                "with FSDP through the Trainer integration (crma.integrations.prepare_trainer)"
            )
    from accelerate import PartialState

    from ..models import resolve_device

    state = PartialState(cpu=resolve_device(device).type == "cpu")
    if state.num_processes < 2:
        raise ValueError(
            f"launched with {launched_world_size()} processes, but no process group formed on device {device!r} "
            "(a GPU launch needs CUDA; use --device cpu for gloo processes on the CPU)"
        )
    return DataParallel(
        rank=state.process_index, world_size=state.num_processes, backend=str(state.backend), device=state.device
    )

"""Batches: one fixed order of examples for every arm, right-padded collation, and the spike-stress batch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from .errors import DataError
from .examples import IGNORE_INDEX, Example


def batch_order(n_examples: int, *, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The example indices of every step, fixed before training so every arm sees the same batches.

    The stream is a concatenation of epochs, epoch `e` being a permutation drawn from
    `torch.Generator().manual_seed(seed + e)`; step `s` takes the stream's `s`-th chunk of `batch_size` (a chunk may
    span two epochs). The global RNG is neither used nor advanced.

    Args:
        n_examples (`int`): number of examples.
        batch_size (`int`): examples per step.
        steps (`int`): number of steps.
        seed (`int`): seed of the order.

    Returns:
        `list[list[int]]`: `steps` lists of `batch_size` indices in `[0, n_examples)`.
    """
    for label, value in (("n_examples", n_examples), ("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"`{label}` must be a positive integer; got {value!r}")
    needed = batch_size * steps
    stream: list[int] = []
    epoch = 0
    while len(stream) < needed:
        generator = torch.Generator().manual_seed(seed + epoch)
        stream.extend(torch.randperm(n_examples, generator=generator).tolist())
        epoch += 1
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def collate(examples: Sequence[Example], indices: Sequence[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack the chosen examples into one right-padded batch.

    Args:
        examples (`Sequence[Example]`): all examples.
        indices (`Sequence[int]`): which examples form this batch (one entry of `batch_order`).
        pad_id (`int`): token id used for padding `input_ids`.

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask` (1 on real tokens) and `labels` (`IGNORE_INDEX` on
        padding), each a LongTensor of shape `(len(indices), longest example)`.
    """
    if pad_id is None:
        raise DataError("`pad_id` is None: the tokenizer needs a pad token (for example its eos token)")
    if len(indices) == 0:
        raise DataError("a batch needs at least one example index; got none")
    bad = [i for i in indices if not 0 <= i < len(examples)]
    if bad:
        raise DataError(f"batch indices {bad} are out of range for {len(examples)} examples")
    chosen = [examples[i] for i in indices]
    width = max(len(e.input_ids) for e in chosen)
    input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
    for r, example in enumerate(chosen):
        n = len(example.input_ids)
        input_ids[r, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[r, :n] = 1
        labels[r, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def corrupt_batch(batch: dict[str, torch.Tensor], *, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The spike-stress batch: every loss-bearing token replaced by a uniformly random token id.

    The random ids come from a dedicated `torch.Generator` seeded with `seed`, so every arm gets the identical
    corrupted batch and the global RNG is untouched. Prompt tokens and padding are kept; at each position where
    `labels != IGNORE_INDEX`, both `input_ids` and `labels` get the same random id. A model asked to predict noise
    has a large loss and gradient, the spike the clipping arms are compared on.

    Args:
        batch (`dict[str, torch.Tensor]`): a batch from `collate`; not modified.
        vocab_size (`int`): random ids are drawn from `[0, vocab_size)`.
        seed (`int`): seed of the corruption.

    Returns:
        `dict[str, torch.Tensor]`: a new batch with the same keys, shapes and devices.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise DataError(f"`vocab_size` must be a positive integer; got {vocab_size!r}")
    labels = batch["labels"]
    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU so the ids do not depend on the device, then moved next to the batch.
    noise = torch.randint(0, vocab_size, tuple(labels.shape), generator=generator, dtype=torch.long)
    noise = noise.to(labels.device)
    loss_mask = labels != IGNORE_INDEX
    out = {key: value.clone() for key, value in batch.items()}
    out["input_ids"] = torch.where(loss_mask, noise, batch["input_ids"])
    out["labels"] = torch.where(loss_mask, noise, labels)
    return out


def order_hash(order: Sequence[Sequence[int]]) -> str:
    """SHA-256 hex digest of a batch order (the fairness receipt: equal hashes mean equal batches)."""
    payload = json.dumps([[int(i) for i in batch] for batch in order], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

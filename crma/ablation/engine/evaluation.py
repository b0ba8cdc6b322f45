"""Held-out evaluation: the validation and test slices, tokenised like training, and an arm's loss on them.

The loss is the one training computes — the token-weighted mean negative log-likelihood over the response tokens —
summed over the whole slice before dividing, so a slice's figure does not depend on how it is batched. Evaluation
runs under `no_grad` in eval mode and puts the RNG state back, so a run with evaluation on trains bit for bit as the
same run with it off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, collate


@dataclass
class EvalSet:
    """One held-out slice, ready to evaluate: its examples collated in batches of similar length.

    Args:
        split (`str`): `val` or `test`.
        source (`dict`): the data's path-free identity (`SourceInfo.to_dict()`).
        start (`int`): first row of the slice.
        row_numbers (`list[int]`): the data set row of each example.
        batches (`list[dict[str, Tensor]]`): `input_ids`, `attention_mask`, `labels`, on the model's device.
        sha256 (`str`): hash of the examples' token ids and labels (the same for every arm: the receipt checks it).
        tokens (`int`): response tokens over the whole slice.
        example_hashes (`frozenset[str]`): one hash per example, to count overlaps with the other slices.
    """

    split: str
    source: dict[str, Any]
    start: int
    row_numbers: list[int]
    batches: list[dict[str, torch.Tensor]]
    sha256: str
    tokens: int
    example_hashes: frozenset[str]

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of the slice (for `summary.json` and the receipt)."""
        return {
            "split": self.split,
            "source": self.source,
            "rows": [self.row_numbers[0], self.row_numbers[-1]] if self.row_numbers else [],
            "examples": len(self.row_numbers),
            "tokens": self.tokens,
            "sha256": self.sha256,
        }


def example_hash(example: Any) -> str:
    """sha256 of one example's token ids and labels."""
    return hashlib.sha256(repr((example.input_ids, example.labels)).encode()).hexdigest()


def build_eval_set(
    split: str, fitted: Any, source: dict[str, Any], *, batch_size: int, pad_id: int, device: Any
) -> EvalSet:
    """An `EvalSet` of a tokenised slice (`ExampleSet`): batches of `batch_size` examples sorted by length (less
    padding; the summed loss is the same in any order)."""
    examples = fitted.examples
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [
        {k: v.to(device) for k, v in collate(examples, order[i : i + batch_size], pad_id=pad_id).items()}
        for i in range(0, len(order), batch_size)
    ]
    hashes = [example_hash(e) for e in examples]
    return EvalSet(
        split=split,
        source=source,
        start=fitted.row_numbers[0] if fitted.row_numbers else 0,
        row_numbers=list(fitted.row_numbers),
        batches=batches,
        sha256=hashlib.sha256("".join(hashes).encode()).hexdigest(),
        tokens=sum(e.n_loss_tokens for e in examples),
        example_hashes=frozenset(hashes),
    )


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, eval_set: EvalSet) -> float:
    """Token-weighted mean NLL of `model` over the response tokens of `eval_set` (labels shifted as HF's causal-LM
    loss does), in float64 over the slice. The caller sets eval mode and the active adapter."""
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for batch in eval_set.batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += nll.double().cpu()
        tokens += int((labels != IGNORE_INDEX).sum())
    return (total / max(tokens, 1)).item()

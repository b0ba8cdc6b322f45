"""Held-out evaluation: the loss is the token-weighted NLL of the response tokens, as a hand computation gets it."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crma.ablation.data import IGNORE_INDEX, Example, ExampleSet
from crma.ablation.engine.evaluation import build_eval_set, heldout_loss


def _examples() -> ExampleSet:
    # Three rows of different lengths (so a batch is padded), the loss on their "response" tokens only.
    rows = [
        ([5, 9, 3, 7, 2], 2),  # (token ids, prompt length)
        ([4, 8, 8, 1, 6, 3, 2], 4),
        ([7, 2, 9], 1),
    ]
    examples = [Example(ids, [IGNORE_INDEX] * n + ids[n:]) for ids, n in rows]
    return ExampleSet(examples=examples, row_numbers=[10, 11, 12], seq_len=16)


def test_heldout_loss_is_the_token_weighted_nll_of_the_responses() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    fitted = _examples()
    # By hand, one row at a time and token by token: -log p(token t | tokens < t) for every response token t.
    total, count = 0.0, 0
    with torch.no_grad():
        for example in fitted.examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].double()
            for t in range(1, len(example.input_ids)):
                if example.labels[t] == IGNORE_INDEX:
                    continue
                total -= torch.log_softmax(logits[t - 1], dim=-1)[example.input_ids[t]].item()
                count += 1
    assert count == 3 + 3 + 2
    eval_set = build_eval_set("test", fitted, {"kind": "test"}, batch_size=2, pad_id=0, device="cpu")
    assert eval_set.tokens == count and len(eval_set.batches) == 2 and eval_set.row_numbers == [10, 11, 12]
    assert math.isclose(heldout_loss(model, eval_set), total / count, rel_tol=1e-6)
    # Batching and order do not change it: one batch of all three gives the same figure.
    whole = build_eval_set("test", fitted, {"kind": "test"}, batch_size=3, pad_id=0, device="cpu")
    assert math.isclose(heldout_loss(model, whole), total / count, rel_tol=1e-6)
    assert whole.sha256 == eval_set.sha256  # the slice's identity does not depend on its batching

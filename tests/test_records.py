"""Records to and from `metrics.jsonl`: strict JSON (non-finite as null), round trip, errors that name the line."""

from __future__ import annotations

import json
import math

import pytest

from crma.ablation.engine.records import EvalRecord, read_metrics_jsonl, write_metrics_jsonl


def test_metrics_jsonl_round_trip(records, tmp_path):
    path = write_metrics_jsonl(records, tmp_path / "metrics.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    for line in lines:
        json.loads(line, parse_constant=no_constants)  # strict JSON, readable by jq / JavaScript
    back, evals = read_metrics_jsonl(path)
    assert len(back) == len(records) and evals == []
    for a, b in zip(records, back, strict=True):
        da, db = a.to_dict(), b.to_dict()
        for key in ("loss", "grad_norm_pre", "grad_norm_post"):
            x, y = da.pop(key), db.pop(key)
            assert (not math.isfinite(x) and math.isnan(y)) or x == y
        assert da == db
    # One JSON convention: a non-finite value is written as null and read back as NaN; `diverged` keeps the meaning.
    diverged = [r.diverged for r in records].index(True)
    assert json.loads(lines[diverged])["grad_norm_pre"] is None and math.isinf(records[diverged].grad_norm_pre)
    assert back[diverged].diverged and math.isnan(back[diverged].grad_norm_pre)

    write_metrics_jsonl(records[:2], path, append=True)
    assert len(read_metrics_jsonl(path)[0]) == len(records) + 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + '\n\n{"arm": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a metrics JSON line"):
        read_metrics_jsonl(bad)


def test_evaluations_share_the_file_and_come_back_as_their_own_kind(records, tmp_path):
    held_out = [
        EvalRecord(arm="lora", seed=1, step=0, split="test", loss=2.5, tokens=40, eval_s=0.1),
        EvalRecord(arm="lora", seed=1, step=4, split="val", loss=float("nan"), tokens=30, eval_s=0.1),
    ]
    path = write_metrics_jsonl([records[0], *held_out, records[1]], tmp_path / "metrics.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line.get("kind") for line in lines] == [None, "eval", "eval", None]
    assert lines[2]["loss"] is None  # a non-finite held-out loss is null, as a training one is
    steps, evals = read_metrics_jsonl(path)
    assert steps == records[:2] or [s.to_dict() for s in steps] == [r.to_dict() for r in records[:2]]
    assert evals[0] == held_out[0] and evals[1].split == "val" and math.isnan(evals[1].loss)

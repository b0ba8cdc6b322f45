"""The fairness receipt: what each arm really trained with, read from live state, and the verdict on it.

Each arm's *facts* are read from the objects that train it — the optimizer's own `param_groups`, the peft config of its
adapter, its CRMA config, its clipper, the names of the parameters that require grad while it is active, a hash of
the batch tensors it consumed — once after set-up and again at the end. The verdict compares every pair of arms facet
by facet and allows a pair exactly the differences of the properties their names declare differently
(`arms.allowed_facets`: `lora+mix` vs `lora+crma` may differ in the clipper only, `lora+crma@x3` vs `lora+crma` in
the LRs only); anything else, or an arm whose live state does not do what its name says (its LRs included), is a
problem the receipt names. `check_selection` adds the run-level check of a tuned run: each arm's LR was chosen on the
validation slice, which shares no example with the test slice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from typing import Any

import torch

from ..spec.arms import allowed_facets, parse_arm

# Optimizer hyperparameters worth comparing (torch.optim names); `params` and bookkeeping keys are left out.
_OPTIMIZER_KEYS = (
    "initial_lr",
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "momentum",
    "nesterov",
    "dampening",
)
# peft LoraConfig keys that describe the adapter's math (bookkeeping such as base_model_name_or_path is left out).
_LORA_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
)
FACETS = (
    "optimizer",
    "optimizer.lr",
    "optimizer.steps",
    "optimizer.crma_groups",
    "optimizer.crma_groups.lr",
    "optimizer.crma_groups.steps",
    "lora.config",
    "lora.rank",
    "lora.init",
    "crma",
    "crma.mixing",
    "clipper",
    "trainable.other",
    "trainable.count",
    "batches",
    "heldout",
)


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a dict of tensors (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _kind(name: str) -> str:
    return "lora" if "lora_" in name else "crma" if ".crma." in name else "other"


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """`{group name: hyperparameters}` of a live optimizer, read from its own `param_groups` now."""
    return {
        group.get("name", f"group{i}"): {k: _jsonable(group[k]) for k in _OPTIMIZER_KEYS if k in group}
        for i, group in enumerate(optimizer.param_groups)
    }


def optimizer_facts(optimizer: torch.optim.Optimizer, names: dict[int, str], adapter: str) -> dict[str, Any]:
    """Type, per-group hyperparameters and what each group holds (LoRA / CRMA sizes, names of anything else)."""
    groups = group_hyperparameters(optimizer)
    for facts, group in zip(groups.values(), optimizer.param_groups, strict=True):
        held = {"lora": 0, "crma": 0, "other": []}
        for param in group["params"]:
            pname = names.get(id(param), "<not a model parameter>")
            kind = _kind(pname)
            if kind == "other":
                held["other"].append(_normalise(pname, adapter))
            else:
                held[kind] += param.numel()
        facts.update(lora_numel=held["lora"], crma_numel=held["crma"], other=sorted(held["other"]))
    return {"type": type(optimizer).__name__, "groups": groups}


def hyperparameter_digest(groups: dict[str, dict[str, Any]], *, crma_groups: bool) -> str:
    """A short hash of the hyperparameters one step used: the `proj` group's, or (with `crma_groups`) the others'."""
    chosen = {k: v for k, v in groups.items() if (k != "proj") == crma_groups}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def lora_facts(peft_config: Any) -> dict[str, Any]:
    """The math-relevant keys of one adapter's peft `LoraConfig`."""
    data = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    return {k: _jsonable(data.get(k)) for k in _LORA_KEYS}


def _normalise(name: str, adapter: str) -> str:
    # Adapter names differ by construction (arm0, arm1, ...): compare the parameter paths without them.
    return name.replace(f".{adapter}.", ".<adapter>.").removesuffix(f".{adapter}")


def trainable_facts(model: torch.nn.Module, adapter: str) -> dict[str, Any]:
    """Names and sizes of the parameters that require grad right now, split into LoRA, CRMA and anything else."""
    lora, crma_, other = {}, {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = _normalise(name, adapter)
        bucket = {"lora": lora, "crma": crma_, "other": other}[_kind(name)]
        bucket[key] = param.numel()
    return {
        "count": sum(lora.values()) + sum(crma_.values()) + sum(other.values()),
        "lora": {"count": sum(lora.values()), "names": sorted(lora)},
        "crma": {"count": sum(crma_.values()), "names": sorted(crma_)},
        "other": {"count": sum(other.values()), "names": sorted(other)},
    }


def batch_digest(batch: dict[str, torch.Tensor], loss_scale: float) -> str:
    """A short hash of the tensors one arm consumed in one step, and the loss scale it trained them with."""
    digest = hashlib.sha256(tensor_hash(batch).encode())
    digest.update(repr(float(loss_scale)).encode())
    return digest.hexdigest()[:16]


def sequence_hash(digests: list[str]) -> str:
    """sha256 of a list of per-step batch digests."""
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


# Sizes depend on the adapter (declared through `trainable.count`); the current lr depends on how many steps an arm
# took (a diverged arm stops): the lr each step really used is compared through `optimizer.steps`. The initial lr is
# a facet of its own (`optimizer.lr`), which an arm's LR multiplier declares.
_NOT_STATIC = ("lora_numel", "crma_numel", "lr", "initial_lr")


def _facets(facts: dict[str, Any]) -> dict[str, Any]:
    """The comparable pieces of one arm's facts (see `FACETS`)."""
    groups = facts["optimizer"]["groups"]
    proj = {k: v for k, v in groups.get("proj", {}).items() if k not in _NOT_STATIC}
    crma_groups = {
        name: {k: v for k, v in g.items() if k not in _NOT_STATIC} for name, g in groups.items() if name != "proj"
    }
    crma_lrs = {name: g.get("initial_lr") for name, g in groups.items() if name != "proj"}
    lora = dict(facts["lora"])
    rank = {"r": lora.pop("r", None), "lora_alpha": lora.pop("lora_alpha", None)}
    lora.pop("init_lora_weights", None)
    crma_cfg = dict(facts["crma"]) if facts["crma"] is not None else None
    mixing = crma_cfg.pop("mixing", None) if crma_cfg is not None else None
    return {
        "optimizer": {"type": facts["optimizer"]["type"], "proj": proj},
        "optimizer.lr": groups.get("proj", {}).get("initial_lr"),
        "optimizer.steps": facts.get("hyperparameter_digests", []),
        "optimizer.crma_groups": crma_groups or None,
        "optimizer.crma_groups.lr": crma_lrs or None,
        "optimizer.crma_groups.steps": facts.get("crma_hyperparameter_digests", []),
        "lora.config": lora,
        "lora.rank": rank,
        "lora.init": facts["lora_init_sha256"],
        "crma": crma_cfg,
        "crma.mixing": mixing,
        "clipper": facts["clipper"],
        "trainable.other": facts["trainable"]["other"]["names"],
        "trainable.count": facts["trainable"]["count"],
        "batches": facts.get("batch_digests", []),
        "heldout": facts.get("eval_digests", []),
    }


_PER_STEP = ("batches", "optimizer.steps", "optimizer.crma_groups.steps", "heldout")


def _differs(facet: str, a: Any, b: Any) -> bool:
    if facet in _PER_STEP:  # a diverged arm stops early: compare the steps both took
        n = min(len(a), len(b))
        return a[:n] != b[:n]
    return json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)


def _claims(label: str, facts: dict[str, Any], base_lrs: dict[str, float] | None) -> list[str]:
    """Problems where an arm's live state does not do what its name says."""
    parsed = parse_arm(label)
    spec, problems = parsed.spec, []
    has_crma = facts["crma"] is not None and facts["trainable"]["crma"]["count"] > 0
    if spec.crma != has_crma:
        problems.append(f"{label}: CRMA is {'on' if has_crma else 'off'} but the arm's name says it is not")
    if has_crma and facts["crma"].get("mixing", "sinkhorn") != spec.mixing:
        problems.append(f"{label}: the mixing is {facts['crma'].get('mixing')}, not {spec.mixing} as its name says")
    for group, facts_group in facts["optimizer"]["groups"].items():
        base = (base_lrs or {}).get(group)
        lr = facts_group.get("initial_lr")
        if base is not None and lr is not None and not math.isclose(lr, base * parsed.lr_scale, rel_tol=1e-9):
            problems.append(
                f"{label}: the {group} group trains at LR {lr:g}, not {base:g} × {parsed.lr_scale:g} as the run's "
                "LRs and the arm's name say"
            )
    uses_zclip = facts["clipper"].get("kind") == "zclip"
    if spec.zclip != uses_zclip:
        problems.append(f"{label}: the clipper is {facts['clipper'].get('kind')}, not what the arm's name says")
    if facts["trainable"]["lora"]["count"] == 0:
        problems.append(f"{label}: no LoRA parameter is trainable")
    extra = facts["trainable"]["other"]["names"] + [
        n for g in facts["optimizer"]["groups"].values() for n in g.get("other", [])
    ]
    if extra:
        problems.append(f"{label}: trains parameters that are neither LoRA nor CRMA: {sorted(set(extra))[:4]}")
    trainable = facts["trainable"]["lora"]["count"] + facts["trainable"]["crma"]["count"]
    optimized = sum(g.get("lora_numel", 0) + g.get("crma_numel", 0) for g in facts["optimizer"]["groups"].values())
    if trainable != optimized:
        problems.append(
            f"{label}: {trainable:,} adapter parameters require grad but the optimizer updates {optimized:,}"
        )
    return problems


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _what_differs(a: Any, b: Any, limit: int = 3) -> str:
    """`path: value vs value` for the first few leaves that differ (per-step lists: the first step that differs)."""
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, str) for x in a + b):
        step = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return f"first at step {step + 1}"
    left, right = _leaves(a), _leaves(b)
    keys = [k for k in dict.fromkeys([*left, *right]) if left.get(k) != right.get(k)]
    parts = [f"{k or 'value'}: {json.dumps(left.get(k))} vs {json.dumps(right.get(k))}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def verdict(facts: dict[str, dict[str, Any]], *, base_lrs: dict[str, float] | None = None) -> dict[str, Any]:
    """Compare the arms' facts pairwise; allow a pair only the differences of the properties its names declare
    differently (`arms.allowed_facets`).

    Args:
        facts (`dict[str, dict]`): `{arm label: facts}` as `ArmSet.facts()` reads them.
        base_lrs (`dict[str, float] | None`): the run's LR per optimizer group (`proj`, `structural`, `gate`): each
            arm's groups must train at these times its label's multiplier. None skips that check.

    Returns:
        `dict` with `fair` (bool), `problems` (one sentence each), `flagged` (the facets that differ undeclared),
        `differences` (`{facet: {arm: value}}` for every facet that differs between some arms, declared or not) and
        `declared` (`{arm: {property: value}}`: what each arm's name declares).
    """
    facets = {label: _facets(f) for label, f in facts.items()}
    declared = {label: parse_arm(label).properties() for label in facts}
    problems = [p for label, f in facts.items() for p in _claims(label, f, base_lrs)]
    differences: dict[str, dict[str, Any]] = {}
    flagged: set[str] = set()
    for a, b in itertools.combinations(facts, 2):
        allowed = allowed_facets(a, b)
        for facet in FACETS:
            if not _differs(facet, facets[a][facet], facets[b][facet]):
                continue
            differences.setdefault(facet, {label: facets[label][facet] for label in facts})
            if facet not in allowed:
                flagged.add(facet)
                problems.append(
                    f"{b} vs {a}: {facet} differs ({_what_differs(facets[b][facet], facets[a][facet])}), "
                    "which the two arms' names do not declare"
                )
    return {
        "fair": not problems,
        "problems": problems,
        "flagged": sorted(flagged),
        "differences": differences,
        "declared": declared,
    }


_DIGESTS = ("batch_digests", "hyperparameter_digests", "crma_hyperparameter_digests", "eval_digests")


def _stored(facts: dict[str, Any]) -> dict[str, Any]:
    # The per-step digests are compared above; the stored receipt keeps a hash of each list.
    out = {k: v for k, v in facts.items() if k not in _DIGESTS}
    for key in _DIGESTS:
        out[key.replace("_digests", "_sha256")] = sequence_hash(facts.get(key, []))
    return out


def build_receipt(
    seed: int,
    setup: dict[str, dict[str, Any]],
    end: dict[str, dict[str, Any]],
    order_sha256: str,
    *,
    base_lrs: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The receipt of one seed: the facts after set-up and at the end, the verdict on each, and the headline ticks.

    Args:
        seed (`int`): the seed.
        setup (`dict[str, dict]`): facts of every arm right after set-up.
        end (`dict[str, dict]`): facts of every arm after the last step (batches included).
        order_sha256 (`str`): hash of the planned batch order.
        base_lrs (`dict[str, float] | None`): see `verdict`.
    """
    at_setup, at_end = verdict(setup, base_lrs=base_lrs), verdict(end, base_lrs=base_lrs)
    plain = [label for label in end if not parse_arm(label).spec.matched]
    inits = {label: end[label]["lora_init_sha256"] for label in end}
    batches = {label: sequence_hash(end[label].get("batch_digests", [])) for label in end}
    return {
        "seed": seed,
        "fair": at_setup["fair"] and at_end["fair"],
        "problems": list(dict.fromkeys(at_setup["problems"] + at_end["problems"])),
        "lora_init_sha256": inits,
        "lora_init_equal": len({inits[label] for label in plain}) <= 1,
        "batch_order_sha256": order_sha256,
        "batches_seen_sha256": batches,
        "batches_seen_equal": "batches" not in at_end["flagged"],
        "config_diff": at_end["differences"],
        "declared": at_end["declared"],
        "differs_only_in_adapter": at_setup["fair"] and at_end["fair"],
        "arms": {label: {"setup": _stored(setup[label]), "end": _stored(end[label])} for label in end},
    }


def check_selection(
    summary: dict[str, Any], evals: list[Any], heldout: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """How each arm's LR was chosen, checked from the raw evaluations rather than taken from the summary.

    For every arm trained at several multipliers, the chosen one must be the lowest mean over seeds of the arm's last
    *validation* loss (recomputed here from `evals`), and the validation slice must share no example with the test
    slice (`heldout`: the run's held-out data identity). None for a run that tuned nothing.

    Args:
        summary (`dict`): the run's summary with its `lr_selection`.
        evals (`list[EvalRecord]`): every held-out evaluation of the run.
        heldout (`dict | None`): `summary["data"]["heldout"]`.

    Returns:
        `dict` with `fair`, `problems`, `how` (one sentence), `chosen` (`{arm: multiplier}`).
    """
    selection = summary.get("lr_selection") or {}
    if not selection.get("tuned"):
        return None
    problems = []
    if selection.get("split") != "val":
        problems.append(f"the LRs were chosen on the {selection.get('split')!r} slice, not on the validation slice")
    last: dict[tuple[str, int, str], tuple[int, float]] = {}
    for record in evals:
        key = (record.arm, record.seed, record.split)
        if key not in last or record.step >= last[key][0]:
            last[key] = (record.step, record.loss)
    seeds = sorted({record.seed for record in evals})
    chosen = {}
    for name, info in selection.get("arms", {}).items():
        means = {}
        for point in info.get("grid", []):
            losses = [last.get((point["label"], seed, "val"), (0, math.nan))[1] for seed in seeds]
            if losses and all(math.isfinite(x) for x in losses):
                means[point["lr_scale"]] = statistics.fmean(losses)
        expected = min(means, key=lambda m: (means[m], abs(math.log(m)))) if means else None
        chosen[name] = info.get("chosen")
        if info.get("chosen") != expected:
            problems.append(
                f"{name}: LR multiplier {info.get('chosen')} was reported as chosen, but the validation losses pick "
                f"{expected}"
            )
    heldout = heldout or {}
    overlap = heldout.get("val_test_overlap")
    if overlap:
        problems.append(f"the validation and test slices share {overlap} examples")
    val, test = heldout.get("val", {}), heldout.get("test", {})
    how = (
        "each arm's LR multiplier is the one with the lowest mean final validation loss over "
        f"{len(seeds)} seed(s) (validation rows {val.get('rows')}, test rows {test.get('rows')}: no example in "
        "both); the test slice only reports"
    )
    return {"fair": not problems, "problems": problems, "how": how, "chosen": chosen}

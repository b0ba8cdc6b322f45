from __future__ import annotations

import math

import pytest
import torch

from crma import ZClip, ZClipConfig, clip_by_norm
from crma.zclip import global_grad_norm


def _param_with_grad(norm: float, dims: int = 4) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(dims))
    direction = torch.arange(1, dims + 1, dtype=torch.float32)
    p.grad = direction / direction.norm() * norm
    return p


def test_warmup_never_clips_and_sets_population_statistics() -> None:
    z = ZClip(warmup_steps=3)
    for g in (1.0, 2.0, 3.0):
        p = _param_with_grad(g)
        pre, post, clipped = z.step([p])
        assert pre == pytest.approx(g, rel=1e-6) and post == pre and not clipped
        assert p.grad.norm().item() == pytest.approx(g, rel=1e-6)
    assert z.mean == pytest.approx(2.0)
    assert z.var == pytest.approx(2.0 / 3.0)  # population variance


def test_spike_is_clipped_to_reciprocal_threshold_and_stats_use_clipped_value() -> None:
    z = ZClip(warmup_steps=3)
    for g in (1.0, 2.0, 3.0):
        z.step([_param_with_grad(g)])
    mu, var = 2.0, 2.0 / 3.0
    std = math.sqrt(var)
    zscore = (10.0 - mu) / (std + 1e-6)
    target = mu + 2.5**2 * std / zscore  # published "adaptive scaling"
    p = _param_with_grad(10.0)
    pre, post, clipped = z.step([p])
    assert clipped and pre == pytest.approx(10.0, rel=1e-6)
    assert post == pytest.approx(target, rel=1e-5)
    assert p.grad.norm().item() == pytest.approx(target, rel=1e-5)
    new_mu = 0.97 * mu + 0.03 * target
    assert z.mean == pytest.approx(new_mu, rel=1e-6)
    assert z.var == pytest.approx(0.97 * var + 0.03 * (target - new_mu) ** 2, rel=1e-6)


def test_calm_step_passes_and_updates_with_raw_value() -> None:
    z = ZClip(warmup_steps=3)
    for g in (1.0, 2.0, 3.0):
        z.step([_param_with_grad(g)])
    pre, post, clipped = z.step([_param_with_grad(2.5)])
    assert not clipped and post == pre
    assert z.mean == pytest.approx(0.97 * 2.0 + 0.03 * 2.5)


@pytest.mark.parametrize("option", ["mean", "fixed"])
def test_variants(option: str) -> None:
    z = ZClip(ZClipConfig(warmup_steps=3, clip_option=option))
    for g in (1.0, 2.0, 3.0):
        z.step([_param_with_grad(g)])
    p = _param_with_grad(10.0)
    _, post, clipped = z.step([p])
    expected = 2.0 if option == "mean" else 2.0 + 2.5 * math.sqrt(2.0 / 3.0)
    assert clipped and post == pytest.approx(expected, rel=1e-5)


def test_huge_threshold_never_clips() -> None:
    z = ZClip(warmup_steps=2, z_thresh=1e9)
    for g in (1.0, 1.1, 500.0, 3.0):
        assert not z.step([_param_with_grad(g)]).clipped


def test_warmup_with_hard_cap_equals_clip_grad_norm() -> None:
    z = ZClip(warmup_steps=25, max_grad_norm=1.0)
    a, b = _param_with_grad(5.0), _param_with_grad(5.0)
    pre, post, clipped = z.step([a])
    reference = torch.nn.utils.clip_grad_norm_([b], 1.0)
    assert pre == pytest.approx(reference.item()) and clipped
    assert torch.equal(a.grad, b.grad)
    assert post == pytest.approx(1.0, rel=1e-5)


def test_accepts_a_module_and_ignores_params_without_grad() -> None:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad = None
    expected = model.weight.grad.norm().item()
    assert ZClip().step(model).pre_norm == pytest.approx(expected, rel=1e-6)


def test_non_finite_norm_leaves_statistics_and_gradients_alone() -> None:
    z = ZClip(warmup_steps=2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([float("nan"), 1.0])
    pre, _, clipped = z.step([p])
    assert math.isnan(pre) and not clipped and z.step_count == 0 and z._warmup == []


def test_state_dict_round_trip_continues_identically() -> None:
    a = ZClip(warmup_steps=3)
    for g in (1.0, 2.0, 3.0, 2.2):
        a.step([_param_with_grad(g)])
    b = ZClip()
    b.load_state_dict(a.state_dict())
    for g in (9.0, 2.0):
        assert a.step([_param_with_grad(g)]) == b.step([_param_with_grad(g)])
    assert (a.mean, a.var) == (b.mean, b.var)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ZClipConfig(alpha=1.0)
    with pytest.raises(ValueError, match="clip_option"):
        ZClipConfig(clip_option="median")
    assert ZClipConfig.from_json(ZClipConfig(z_thresh=3.0).to_json()) == ZClipConfig(z_thresh=3.0)


def test_clip_by_norm_matches_torch() -> None:
    a, b = _param_with_grad(3.0), _param_with_grad(3.0)
    pre, post, clipped = clip_by_norm([a], 1.0)
    torch.nn.utils.clip_grad_norm_([b], 1.0)
    assert clipped and pre == pytest.approx(3.0, rel=1e-6) and post == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(a.grad, b.grad)
    assert clip_by_norm([_param_with_grad(0.5)], 1.0) == pytest.approx((0.5, 0.5, False))


def test_global_grad_norm_single_process_equals_torch_and_sharded_is_a_no_op_without_a_group() -> None:
    params = [_param_with_grad(3.0), _param_with_grad(4.0, dims=3)]
    expected = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    assert global_grad_norm(params).item() == pytest.approx(5.0, rel=1e-6) == expected
    # One process: the local gradient is the whole gradient, `sharded` has nothing to sum over.
    assert global_grad_norm(params, sharded=True).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="sharded"):
        ZClip(sharded="yes")


@pytest.fixture(scope="module")
def two_rank_records(tmp_path_factory) -> list[dict]:
    """Run tests/zclip_dist_worker.py on 2 gloo processes (CPU) once; every scenario's records per rank."""
    import json

    import torch.multiprocessing as mp
    import zclip_dist_worker

    out = tmp_path_factory.mktemp("zclip_dist")
    mp.spawn(zclip_dist_worker.run, args=(2, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _assert_same_results(got: list, expected: list, rel: float = 1e-6) -> None:
    assert len(got) == len(expected)
    for (pre, post, clipped), (ref_pre, ref_post, ref_clipped) in zip(got, expected, strict=True):
        assert clipped == ref_clipped
        assert pre == pytest.approx(ref_pre, rel=rel) and post == pytest.approx(ref_post, rel=rel)


def test_two_ranks_holding_disjoint_halves_see_the_full_norm_with_sharded(two_rank_records) -> None:
    reference = two_rank_records[0]["reference"]
    assert [r[2] for r in reference["results"]] == [False, False, False, True, False]  # the spike is clipped
    for record in two_rank_records:
        _assert_same_results(record["hand_split"]["results"], reference["results"])
        # Without `sharded` a rank sees only its own part: the reduction is what makes the norm global.
        for local, (full, _, _) in zip(record["hand_split"]["local_pre_norms"], reference["results"], strict=True):
            assert local < 0.99 * full
        # Each rank scaled its own parameters by the factor the one-process run used.
        for step, grads in enumerate(record["hand_split"]["grads"]):
            for index, values in grads.items():
                assert values == pytest.approx(reference["grads"][step][int(index)], rel=1e-5, abs=1e-7)
    halves = [set(record["hand_split"]["grads"][0]) for record in two_rank_records]
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == {"0", "1", "2", "3"}


def test_dtensor_gradients_are_reduced_over_their_mesh(two_rank_records) -> None:
    reference = two_rank_records[0]["reference"]
    for record in two_rank_records:
        _assert_same_results(record["dtensor"]["results"], reference["results"])
        for step, grads in enumerate(record["dtensor"]["grads"]):
            for values, expected in zip(grads, reference["grads"][step], strict=True):
                assert values == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2", "fsdp1"])
def test_data_parallel_wrappers_match_one_process_on_the_whole_batch(two_rank_records, wrapper: str) -> None:
    # Each rank backpropagates half of every batch; DDP all-reduces, FSDP2 holds DTensor shards, FSDP1 flat
    # shards (sharded=True). All must reproduce the one-process norms and clip the same steps on both ranks.
    reference = two_rank_records[0]["model_reference"]
    assert [r[2] for r in reference] == [False, False, False, True, False]
    for record in two_rank_records:
        # 1e-5: two half-batch means averaged vs one whole-batch mean differ in float32 summation order.
        _assert_same_results(record[wrapper], reference, rel=1e-5)
    assert two_rank_records[0][wrapper] == two_rank_records[1][wrapper]  # bit-identical decisions and norms

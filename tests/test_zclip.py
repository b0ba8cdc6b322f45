from __future__ import annotations

import math

import pytest
import torch

from crma import ZClip, ZClipConfig, clip_by_norm


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

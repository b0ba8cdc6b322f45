"""Principal bases of A: the block Krylov solver against an exact SVD, and the cache that shares them."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

import crma
from crma import basis as basis_module
from crma.basis import BasisCache, principal_basis, writing_weights


def _exact_projector(weights: list[torch.Tensor], r: int) -> torch.Tensor:
    u = torch.linalg.svd(torch.cat([w.double() for w in weights], dim=1), full_matrices=False).U[:, :r]
    return u @ u.T


def _projector_error(a: torch.Tensor, weights: list[torch.Tensor]) -> float:
    a = a.double()
    return (a @ a.T - _exact_projector(weights, a.shape[1])).abs().max().item()


def _decaying(d: int, widths: tuple[int, ...], seed: int, gap: float = 0.9) -> list[torch.Tensor]:
    """Writing weights whose singular values decay geometrically (sigma_{i+1} / sigma_i = gap)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    k = sum(widths)
    v = torch.linalg.qr(torch.randn(k, d, generator=gen, dtype=torch.float64))[0]
    w = (u * gap ** torch.arange(d, dtype=torch.float64)) @ v.T  # d x k
    return [part.float() for part in w.split(list(widths), dim=1)]


@pytest.mark.parametrize("hidden", [32, 64])
def test_principal_basis_matches_the_exact_svd_on_the_test_models(hidden: int) -> None:
    model = make_tiny_llama(layers=3, hidden=hidden)
    for index, layer in enumerate(model.model.layers):
        weights = writing_weights(layer, index)
        a = principal_basis(weights, 4)
        assert a.shape == (hidden, 4) and a.dtype == torch.float32
        assert torch.allclose(a.T @ a, torch.eye(4), atol=1e-5)
        assert _projector_error(a, weights) < 1e-4


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "operator"])
def test_krylov_stops_before_the_whole_space_and_is_still_exact(gram: bool, monkeypatch) -> None:
    # d = 512 > the Krylov space of 16 blocks x 8 columns: the iteration, not a full eigendecomposition, answers.
    if not gram:
        monkeypatch.setattr(basis_module, "GRAM_MAX_DIM", 0)  # the path of models wider than 1024
    calls = []
    original = basis_module._block_krylov
    monkeypatch.setattr(basis_module, "_block_krylov", lambda *a: calls.append(a[1].shape) or original(*a))
    weights = _decaying(512, (512, 1024), seed=0)
    a = principal_basis(weights, 4)
    assert calls == [(1, 512, 8)]
    assert _projector_error(a, weights) < 1e-4


def test_principal_basis_is_deterministic_fixes_signs_and_leaves_the_global_rng_alone() -> None:
    weights = _decaying(96, (96, 192), seed=1)
    state = torch.get_rng_state()
    a = principal_basis(weights, 4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, principal_basis(weights, 4))
    rows = a.abs().argmax(0)
    assert (a[rows, torch.arange(4)] > 0).all()
    bf16 = principal_basis([w.bfloat16() for w in weights], 4)  # a bf16 model: iterated in float32
    assert bf16.dtype == torch.float32 and _projector_error(bf16, [w.bfloat16() for w in weights]) < 1e-4
    with pytest.raises(ValueError, match="`rank` must be <= the hidden size 96"):
        principal_basis(weights, 97)


def test_cache_computes_each_basis_once_per_content_of_the_weights() -> None:
    model = make_tiny_llama(layers=3)
    cache = BasisCache()
    first = crma.principal_bases(model, 4, cache=cache)
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 3)
    again = crma.principal_bases(model, 4, cache=cache)
    assert (cache.misses, cache.hits) == (3, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5).add_(0.01)  # e.g. another seed's PiSSA residual
    changed = crma.principal_bases(model, 4, cache=cache)
    assert (cache.misses, cache.hits) == (4, 5)  # only block 1 recomputed
    assert not torch.equal(changed[1], first[1])
    with torch.no_grad():
        weight.copy_(original)  # restored to identical values: found again, not recomputed
    restored = crma.principal_bases(model, 4, cache=cache)
    assert (cache.misses, cache.hits) == (4, 8)
    assert torch.equal(restored[1], first[1])
    crma.principal_bases(model, 2, cache=cache)  # another rank is another basis
    assert cache.misses == 7
    small = BasisCache(max_entries=2)
    crma.principal_bases(model, 4, cache=small)
    assert len(small) == 2
    with pytest.raises(ValueError, match="max_entries"):
        BasisCache(max_entries=0)


def test_attach_shares_bases_between_adapters_and_accepts_precomputed_ones() -> None:
    from crma.basis import DEFAULT_CACHE

    model = make_tiny_llama(layers=2)
    DEFAULT_CACHE.clear()
    misses = DEFAULT_CACHE.misses
    crma.attach(model, adapter_name="a")
    crma.attach(model, adapter_name="b")  # a second arm on the same weights: looked up, not recomputed
    assert DEFAULT_CACHE.misses - misses == 2
    a, b = crma.get_adapter(model, "a").crma_A, crma.get_adapter(model, "b").crma_A
    assert torch.equal(a, b)
    bases = crma.principal_bases(model, 4)
    crma.attach(model, adapter_name="c", bases=bases)
    assert torch.equal(crma.get_adapter(model, "c").crma_A, a)
    custom = [torch.linalg.qr(torch.randn(32, 4))[0] for _ in range(2)]
    crma.attach(model, adapter_name="d", bases=custom)
    assert torch.equal(crma.get_adapter(model, "d").crma_A, torch.stack(custom))
    with pytest.raises(ValueError, match=r"`bases` must be 2 tensors of shape \(32, 4\)"):
        crma.attach(model, adapter_name="e", bases=custom[:1])


def test_principal_basis_comes_from_the_pissa_residual_the_model_holds() -> None:
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(layers=2)
    original = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights="pissa", lora_dropout=0.0),
    )
    layer = peft_model.base_model.model.model.layers[0]
    residual = [layer.self_attn.o_proj.get_base_layer().weight, layer.mlp.down_proj.get_base_layer().weight]
    assert not torch.equal(residual[0], original)  # PiSSA rewrote the base weight
    crma.attach(peft_model)
    assert _projector_error(crma.get_adapter(peft_model).crma_A[0].detach(), residual) < 1e-4


def test_meta_weights_are_a_clear_error() -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_tiny_llama().config)
    with pytest.raises(ValueError, match="meta device"):
        crma.principal_bases(model, 4)

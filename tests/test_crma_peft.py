"""CRMA off the tested path, as a peft user takes it: casts, attach order, merge + save, disable_adapter, meta."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_llama

import crma
from crma import CRMAConfig


def _ids(batch: int = 2, tokens: int = 10, vocab: int = 259) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _crma_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".crma." in n}


def _randomize(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every CRMA parameter away from its init, so that the side channel changes the output."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in _crma_params(model).values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _lora(model: torch.nn.Module, targets: tuple[str, ...] = ("q_proj", "v_proj"), init: bool | str = False):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=init))


@pytest.mark.parametrize(
    ("cast", "dtype", "param_dtype"),
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16, torch.float32),
        (lambda m: m.half(), torch.float16, torch.float32),
        (lambda m: m.double(), torch.float64, torch.float64),
    ],
    ids=["to-bf16", "half", "double"],
)
def test_cast_after_attach_keeps_identity_and_trains(cast, dtype, param_dtype) -> None:
    ids = _ids()
    with torch.no_grad():
        base = cast(make_tiny_llama())(ids).logits
    model = make_tiny_llama()
    crma.attach(model)
    model = cast(model)
    # The rule: CRMA parameters are never stored below float32; a float64 cast makes them float64.
    assert {p.dtype for p in _crma_params(model).values()} == {param_dtype}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # identity at step 0 survives the cast
    _randomize(model)
    out = model(ids, labels=ids)
    assert out.logits.dtype == dtype
    out.loss.backward()
    for name, p in _crma_params(model).items():
        assert p.grad is not None and p.grad.dtype == param_dtype and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_bf16_autocast_trains_a_step_with_finite_gradients_of_every_crma_parameter() -> None:
    model = make_tiny_llama(layers=3).train()
    crma.attach(model)
    optimizer = torch.optim.AdamW(crma.param_groups(model, 1e-2, 1e-2, 1e-2))
    ids = _ids()
    before = {n: p.detach().clone() for n, p in _crma_params(model).items()}
    for _ in range(2):  # the first step moves only B (B = 0 at init); the second reaches every parameter
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        for name, p in _crma_params(model).items():
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    for name, p in _crma_params(model).items():
        assert not torch.equal(p, before[name]), name


def test_attach_before_get_peft_model_is_caught() -> None:
    model = make_tiny_llama()
    crma.attach(model)
    peft_model = _lora(model)  # freezes every non-LoRA parameter, CRMA's included
    assert not any(p.requires_grad for p in _crma_params(peft_model).values())
    with pytest.raises(ValueError, match="no trainable parameter.*attach\\(\\) after get_peft_model"):
        crma.param_groups(peft_model, 1e-3, 1e-3, 1e-3)
    peft_model.train()
    with pytest.warns(UserWarning, match="will not train"):
        peft_model(_ids(), labels=_ids()).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model, not at every step
        peft_model(_ids(), labels=_ids())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # inference: nothing to train, nothing to warn about
        peft_model(_ids())
    crma.set_active(peft_model, "default")  # the documented fix
    groups = {g["name"]: g for g in crma.param_groups(peft_model, 1e-3, 1e-2, 1e-2)}
    assert len(groups["structural"]["params"]) == 3 and len(groups["gate"]["params"]) == 1


def test_attach_after_get_peft_model_trains_and_inactive_adapter_does_not_raise() -> None:
    peft_model = _lora(make_tiny_llama())
    crma.attach(peft_model)
    assert all(p.requires_grad for p in _crma_params(peft_model).values())
    crma.disable(peft_model)  # a LoRA-only arm: CRMA attached but off, frozen; no error
    names = {id(p): n for n, p in peft_model.named_parameters()}
    groups = crma.param_groups(peft_model, 1e-3, 1e-2, 1e-2)
    assert [g["name"] for g in groups] == ["proj"]
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])


def test_a_generic_checkpoint_round_trip_keeps_crma_and_a_base_checkpoint_still_loads(tmp_path) -> None:
    model = make_tiny_llama()
    keys = set(model.state_dict())
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    crma.attach(model)
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    state = model.state_dict()
    crma_keys = set(state) - keys
    assert crma_keys == {f"model.crma.default.{name}" for name, _ in crma.get_adapter(model).named_parameters()}
    # torch.save / accelerate's save_state save model.state_dict(): CRMA comes back with it.
    torch.save(state, tmp_path / "checkpoint.pt")
    fresh = make_tiny_llama()
    crma.attach(fresh)
    result = fresh.load_state_dict(torch.load(tmp_path / "checkpoint.pt"))
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    # A base checkpoint (no CRMA keys) loads strictly into a model with CRMA: CRMA's keys are not "missing".
    result = model.load_state_dict(base_state)
    assert not result.missing_keys and not result.unexpected_keys
    # Detaching forgets the keys again: save_pretrained's ignore list is CRMA's only while it is attached.
    crma.detach(model)
    assert set(model.state_dict()) == keys and not model._keys_to_ignore_on_save


def test_merge_and_unload_then_save_pretrained_keeps_the_base_checkpoint_clean(tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    peft_model = _lora(make_tiny_llama(), targets=("q_proj", "o_proj"))
    crma.attach(peft_model)
    _randomize(peft_model)
    ids = _ids()
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        expected = merged(ids).logits
    merged.save_pretrained(tmp_path)
    crma.save(merged, tmp_path)  # the documented way to keep CRMA beside the merged checkpoint
    assert not [k for k in load_file(str(tmp_path / "model.safetensors")) if "crma" in k]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        without = reloaded(ids).logits
        crma.load(reloaded, tmp_path)
        assert torch.equal(reloaded(ids).logits, expected)
    assert not torch.equal(without, expected)  # CRMA really is what the saved files add back


def test_disable_adapter_gives_the_pure_base_and_restores_both() -> None:
    ids = _ids()
    model = make_tiny_llama()
    with torch.no_grad():
        base = model(ids).logits
    peft_model = _lora(model)
    crma.attach(peft_model)
    _randomize(peft_model)
    with torch.no_grad():
        full = peft_model(ids).logits
        with peft_model.disable_adapter():  # e.g. DPO's reference pass: "reference = base"
            assert torch.equal(peft_model(ids).logits, base)
        assert torch.equal(peft_model(ids).logits, full)
        with crma.disabled(peft_model):  # CRMA alone off: base + LoRA
            lora_only = peft_model(ids).logits
        crma.disable(peft_model)
        assert torch.equal(peft_model(ids).logits, lora_only)
        crma.enable(peft_model)
        assert torch.equal(peft_model(ids).logits, full)
    assert not torch.equal(lora_only, base) and not torch.equal(lora_only, full)


def test_crma_disabled_nests_restores_on_error_and_leaves_trainability() -> None:
    model = make_tiny_llama()
    crma.attach(model)
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        on = model(ids).logits
        crma.disable(model)
        off = model(ids).logits
        crma.enable(model)
        with crma.disabled(model) as same:
            assert same is model
            with crma.disabled(model):
                assert torch.equal(model(ids).logits, off)
            assert torch.equal(model(ids).logits, off)
            assert crma.active_adapter(model) == "default"
            assert all(p.requires_grad for p in _crma_params(model).values())
        assert torch.equal(model(ids).logits, on)
        with pytest.raises(RuntimeError, match="boom"), crma.disabled(model):
            raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, on)


def test_attach_on_meta_then_to_empty_load_and_reset_parameters_equals_attach_on_the_loaded_model() -> None:
    from transformers import AutoModelForCausalLM

    reference = make_tiny_llama(layers=3)
    config = reference.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    crma.attach(model)
    assert all(p.is_meta for p in _crma_params(model).values())
    model.to_empty(device="cpu")  # what accelerate / FSDP do: storage, but no values
    model.load_state_dict(reference.state_dict())  # strict: CRMA keys are not in a base checkpoint
    with torch.no_grad():
        for name, buffer in reference.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in it
            model.get_buffer(name).copy_(buffer)
    crma.get_adapter(model).reset_parameters()
    crma.attach(reference)
    for (name, got), expected in zip(_crma_params(model).items(), _crma_params(reference).values(), strict=True):
        assert torch.equal(got, expected), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        _randomize(model)
        _randomize(reference)
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_reset_parameters_restores_the_attach_init() -> None:
    model = make_tiny_llama()
    crma.attach(model, CRMAConfig(n_streams=4))
    init = {n: p.detach().clone() for n, p in _crma_params(model).items()}
    _randomize(model, scale=0.5)
    crma.get_adapter(model).reset_parameters()
    for name, p in _crma_params(model).items():
        assert torch.equal(p, init[name]), name
    standalone = crma.CRMAAdapter(CRMAConfig(), num_layers=2, hidden_size=32)
    with pytest.raises(ValueError, match="needs the decoder blocks"):
        standalone.reset_parameters()

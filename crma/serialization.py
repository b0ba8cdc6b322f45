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


@torch.no_grad()
def load(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a saved CRMA adapter into `model` (attaching it with the saved config if needed) and make it active.

    Raises `ValueError` when the base model's depth or width differs from the one the adapter was saved from,
    and `FileNotFoundError` when `path` lacks the CRMA files.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path} has no {needed}: not a CRMA adapter folder")
    meta = json.loads((path / CONFIG_NAME).read_text())
    config = CRMAConfig.from_dict(meta["crma"])
    here = _fingerprint(model)
    for key in ("num_layers", "hidden_size"):
        if meta.get(key) != here[key]:
            raise ValueError(
                f"this CRMA adapter was saved from a model with {key}={meta.get(key)} "
                f"({meta.get('model_type')}); the model it is loaded into has {key}={here[key]} ({here['model_type']})"
            )
    layers, channel = _channel(model)
    if channel is None or adapter_name not in channel.adapters:
        adapter = CRMAAdapter(config, len(layers), here["hidden_size"], device=module_device(layers[0]))
        adapter.bind(layers)
        _install(model, layers, channel, adapter_name, adapter)
    adapter = get_adapter(model, adapter_name)
    tensors = load_file(str(path / WEIGHTS_NAME))
    expected = {f"layers.{i}.{key}" for key, _ in adapter.named_parameters() for i in range(adapter.num_layers)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{path / WEIGHTS_NAME} does not match the attached adapter: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for key, param in adapter.named_parameters():
        for i in range(adapter.num_layers):
            value = tensors[f"layers.{i}.{key}"]
            if value.shape != param.shape[1:]:
                raise ValueError(f"layers.{i}.{key}: saved shape {tuple(value.shape)} != {tuple(param.shape[1:])}")
        param.copy_(torch.stack([tensors[f"layers.{i}.{key}"] for i in range(adapter.num_layers)]).to(param))
    set_active(model, adapter_name)
    return model

"""attach / detach / switch CRMA on a HF causal LM, and its optimizer groups.

Einsum letters: `l` layers, `i`/`j` streams.

CRMA lives beside the model rather than around it: every decoder block gets a `crma` ModuleDict
(adapter name -> `CRMABlock`) and one forward hook. Module paths and state_dict keys of the base model and of
peft's LoRA stay unchanged, so `PeftModel.save_pretrained` / `from_pretrained` keep working. The hook runs in
the block's `__call__`, i.e. outside transformers' gradient-checkpointed `forward`, so the side state that flows
from block to block keeps its gradient under (reentrant) checkpointing too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import CRMAConfig
from .layer import CRMABlock, batched_mixing, orthonormal_basis, principal_basis
from .utils import find_decoder_layers, hidden_size_of, module_device

STRUCTURAL_NAMES = ("crma_log_mix", "crma_read_logits", "crma_write_logits")
GATE_NAMES = ("crma_log_alpha",)
WRITING_WEIGHTS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class _Channel:
    """Shared by the hooks of one model: which adapter is active and the side state passed between blocks."""

    configs: dict[str, CRMAConfig] = field(default_factory=dict)
    active: str | None = None
    state: torch.Tensor | None = None
    mixing: list[Any] | None = None  # every block's (M, post, rho) for the forward in progress
    layers: Any = None  # the decoder blocks' ModuleList
    handles: list[Any] = field(default_factory=list)


def _channel(model: nn.Module) -> tuple[nn.ModuleList, _Channel | None]:
    layers = find_decoder_layers(model)
    return layers, getattr(layers, "_crma_channel", None)


def _require(model: nn.Module) -> tuple[nn.ModuleList, _Channel]:
    layers, channel = _channel(model)
    if channel is None or not channel.configs:
        raise ValueError(f"no CRMA adapter is attached to this {type(model).__name__}; call crma.attach() first")
    return layers, channel


def _crma_hook(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    # State is read through the block (not a closure) so that a deep copy of the model hooks into its own copy.
    channel: _Channel = block._crma_channel
    name, index, num_layers = channel.active, block._crma_index, len(channel.layers)
    if name is None:
        return None
    h = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output
    # Block 0 starts a fresh side state for every forward (per token, so KV-cache decoding needs nothing else)
    # and computes every block's mixing in one batched Sinkhorn: it depends on parameters only, not on data.
    if index == 0:
        channel.state = None
        channel.mixing = batched_mixing([layer.crma[name] for layer in channel.layers])
    mixing = channel.mixing[index] if channel.mixing is not None else None
    y_out, new_state = block.crma[name](h, y, channel.state, mixing)
    # Drop the references after the last block so the graph is not kept alive past the forward.
    channel.state = new_state if index < num_layers - 1 else None
    if index == num_layers - 1:
        channel.mixing = None
    return (y_out, *output[1:]) if isinstance(output, tuple) else y_out


def _writing_weights(block: nn.Module, index: int) -> list[torch.Tensor]:
    weights = []
    for path in WRITING_WEIGHTS:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"init_A='principal' needs `{path}` in every decoder block (block {index} of "
                f"{type(block).__name__} has none); use CRMAConfig(init_A='orthonormal')"
            ) from None
        if hasattr(module, "get_base_layer"):  # peft LoRA wrapper: use the (possibly PiSSA-residual) base
            module = module.get_base_layer()
        weight = module.weight
        if type(weight).__name__ == "Params4bit":
            from peft.utils.integrations import dequantize_module_weight

            weight = dequantize_module_weight(module)
        weights.append(weight.detach())
    return weights


@torch.no_grad()
def attach(model: nn.Module, config: CRMAConfig | None = None, *, adapter_name: str = "default") -> nn.Module:
    """Install a CRMA adapter on every decoder block of `model` in place, make it active, and return `model`.

    Works on plain HF causal LMs, peft-wrapped models (attach after `get_peft_model`), bitsandbytes 4-bit models
    and models on the `meta` device. Several named adapters may be attached (one active at a time).

    Args:
        model (`nn.Module`): a causal LM with a `model.layers` ModuleList of decoder blocks.
        config (`CRMAConfig | None`): settings (defaults if None).
        adapter_name (`str`): name of this adapter.

    Returns:
        `nn.Module`: the same model. CRMA parameters are fp32 and trainable; no other `requires_grad` changes.
    """
    return _attach(model, config or CRMAConfig(), adapter_name=adapter_name, init_A=True)


def _attach(model: nn.Module, config: CRMAConfig, *, adapter_name: str, init_A: bool) -> nn.Module:
    layers, channel = _channel(model)
    if channel is not None and adapter_name in channel.configs:
        raise ValueError(f"a CRMA adapter named {adapter_name!r} is already attached; detach it or pick another name")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without '.'; got {adapter_name!r}")
    hidden = hidden_size_of(model)
    blocks = []
    for index, layer in enumerate(layers):
        device = module_device(layer)
        block = CRMABlock(config, hidden, index, device=device)
        if init_A and device.type != "meta":
            if config.init_A == "principal":
                basis = principal_basis(_writing_weights(layer, index), config.rank)
            else:
                basis = orthonormal_basis(hidden, config.rank, seed=config.init_seed + index)
            block.crma_A.copy_(basis.to(device))
        blocks.append(block)
    if channel is None:
        channel = _Channel(layers=layers)
        layers._crma_channel = channel
        for index, layer in enumerate(layers):
            layer.crma = nn.ModuleDict()
            layer._crma_channel, layer._crma_index = channel, index
            # prepend: later hooks (e.g. transformers' output_hidden_states capture) see the CRMA output.
            channel.handles.append(layer.register_forward_hook(_crma_hook, with_kwargs=True, prepend=True))
    for layer, block in zip(layers, blocks, strict=True):
        layer.crma[adapter_name] = block
    channel.configs[adapter_name] = config
    set_active(model, adapter_name)
    return model


def detach(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one CRMA adapter (or all when `adapter_name` is None); the model is then exactly as before attach."""
    layers, channel = _require(model)
    names = list(channel.configs) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in channel.configs:
            raise ValueError(f"no CRMA adapter named {name!r}; attached: {sorted(channel.configs)}")
        for layer in layers:
            del layer.crma[name]
        del channel.configs[name]
        if channel.active == name:
            channel.active = None
    if not channel.configs:
        for handle in channel.handles:
            handle.remove()
        for layer in layers:
            del layer.crma, layer._crma_channel, layer._crma_index
        del layers._crma_channel
    return model


def set_active(model: nn.Module, adapter_name: str | None) -> None:
    """Make one attached CRMA adapter active (trainable, applied), or none (CRMA off; the model is its base)."""
    layers, channel = _require(model)
    if adapter_name is not None and adapter_name not in channel.configs:
        raise ValueError(f"no CRMA adapter named {adapter_name!r}; attached: {sorted(channel.configs)}")
    channel.active = adapter_name
    channel.state = None
    # Mirror peft's set_adapter: only the active adapter's parameters train.
    for layer in layers:
        for name, block in layer.crma.items():
            block.requires_grad_(name == adapter_name)


def enable(model: nn.Module, adapter_name: str = "default") -> None:
    """Switch CRMA on (the named adapter) without re-attaching."""
    set_active(model, adapter_name)


def disable(model: nn.Module) -> None:
    """Switch CRMA off without detaching: the model computes exactly its base (+ LoRA) output."""
    set_active(model, None)


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active CRMA adapter, None when CRMA is off or not attached."""
    _, channel = _channel(model)
    return None if channel is None else channel.active


def crma_blocks(model: nn.Module, adapter_name: str | None = None) -> list[CRMABlock]:
    """The per-layer `CRMABlock`s of an adapter (the active one by default), in depth order."""
    layers, channel = _require(model)
    name = adapter_name or channel.active or next(iter(channel.configs))
    if name not in channel.configs:
        raise ValueError(f"no CRMA adapter named {name!r}; attached: {sorted(channel.configs)}")
    return [layer.crma[name] for layer in layers]


def param_groups(
    model: nn.Module, lr: float, structural_lr: float, gate_lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of every trainable parameter: proj / structural / gate.

    proj: LoRA and CRMA projections (and anything else trainable) at `lr` with `weight_decay`; structural:
    `log_mix`, read and write logits at `structural_lr`; gate: `log_alpha` at `gate_lr`. The last two get no decay:
    decay would pull M toward full averaging and alpha toward 1.
    """
    groups: dict[str, list[nn.Parameter]] = {"proj": [], "structural": [], "gate": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = "structural" if leaf in STRUCTURAL_NAMES else "gate" if leaf in GATE_NAMES else "proj"
        groups[kind].append(param)
    settings = {"proj": (lr, weight_decay), "structural": (structural_lr, 0.0), "gate": (gate_lr, 0.0)}
    return [
        {"name": kind, "params": params, "lr": settings[kind][0], "weight_decay": settings[kind][1]}
        for kind, params in groups.items()
        if params
    ]


def expected_parameter_count(num_layers: int, hidden_size: int, config: CRMAConfig | None = None) -> int:
    """L * (2*d*r + n^2 + 2n + 1): the CRMA parameter count of a model."""
    cfg = config or CRMAConfig()
    n, r = cfg.n_streams, cfg.rank
    return num_layers * (2 * hidden_size * r + n * n + 2 * n + 1)

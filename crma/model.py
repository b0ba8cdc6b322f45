"""attach / detach / switch CRMA on a HF causal LM, and its optimizer groups.

Letters: `l` layers, `i`/`j` streams.

CRMA lives beside the model rather than around it: the module holding the decoder blocks (e.g. `LlamaModel`) gets a
`crma` ModuleDict (adapter name -> `CRMAAdapter`, every block's parameters stacked along depth) and every decoder
block one forward hook. Module paths and state_dict keys of the base model and of peft's LoRA stay unchanged; CRMA's
parameters join the state_dict under the blocks' parent (`model.crma.<adapter>.crma_A`, ...), so a generic
checkpoint round trip keeps them, while the HF model's `_keys_to_ignore_on_save` lists them, so `save_pretrained` of
the base (merged or not) stays a clean base checkpoint and `PeftModel.save_pretrained` writes LoRA only. CRMA itself
is saved with `crma.save`. The hook runs in the
block's `__call__`, i.e. outside transformers' gradient-checkpointed `forward`, so the side state that flows from
block to block keeps its gradient under (reentrant) checkpointing too.

CRMA follows peft's switches: inside `with peft_model.disable_adapter():` (or after `disable_adapter_layers()`) the
model is its pure base, CRMA included. `crma.disabled(model)` switches CRMA alone off for a block of code.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import CRMAConfig
from .layer import CRMAAdapter, Operands, side_channel
from .utils import find_decoder_layers, hidden_size_of, module_device

STRUCTURAL_NAMES = ("crma_log_mix", "crma_read_logits", "crma_write_logits")
GATE_NAMES = ("crma_log_alpha",)


@dataclass
class _Channel:
    """Shared by the hooks of one model: the adapters, the active one, and the state of the forward in progress."""

    adapters: nn.ModuleDict  # also registered on the decoder blocks' parent as `crma`
    layers: nn.ModuleList
    active: str | None = None
    suspended: int = 0  # depth of nested `crma.disabled()` blocks
    running: CRMAAdapter | None = None  # the adapter applied in the forward in progress (None: CRMA off)
    operands: list[Operands] | None = None  # every block's K, W, R for the forward in progress
    state: torch.Tensor | None = None  # the side state S passed from block to block
    handles: list[Any] = field(default_factory=list)
    warned_frozen: bool = False


def _parent_of(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    for name, module in model.named_modules():
        if module is layers:
            return model.get_submodule(name.rpartition(".")[0])
    raise ValueError(f"the decoder blocks are not a submodule of {type(model).__name__}")  # pragma: no cover


def _channel(model: nn.Module) -> tuple[nn.ModuleList, _Channel | None]:
    layers = find_decoder_layers(model)
    return layers, getattr(layers, "_crma_channel", None)


def _require(model: nn.Module) -> tuple[nn.ModuleList, _Channel]:
    layers, channel = _channel(model)
    if channel is None or not len(channel.adapters):
        raise ValueError(f"no CRMA adapter is attached to this {type(model).__name__}; call crma.attach() first")
    return layers, channel


def _peft_adapters_disabled(layers: nn.ModuleList) -> bool:
    # peft's `disable_adapter()` sets `_disable_adapters` on every tuner layer at once; the first one found tells.
    # Duck-typed so that the core never imports peft; a forward scans one block's ~20 modules.
    for layer in layers:
        for module in layer.modules():
            flag = module.__dict__.get("_disable_adapters")  # not getattr: nn.Module's miss path raises
            if isinstance(flag, bool):
                return flag
    return False


def _running_adapter(channel: _Channel) -> CRMAAdapter | None:
    if channel.active is None or channel.suspended or _peft_adapters_disabled(channel.layers):
        return None
    adapter = channel.adapters[channel.active]
    if (
        not channel.warned_frozen
        and adapter.training
        and torch.is_grad_enabled()
        and not any(p.requires_grad for p in adapter.parameters())
    ):
        channel.warned_frozen = True
        warnings.warn(
            f"CRMA adapter {channel.active!r} is applied in a training forward but none of its parameters requires "
            "grad, so it will not train. peft's get_peft_model freezes every non-LoRA parameter: call crma.attach() "
            f"after get_peft_model, or crma.set_active(model, {channel.active!r}) to make it trainable again.",
            stacklevel=3,
        )
    return adapter


def _crma_hook(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    # State is read through the block (not a closure) so that a deep copy of the model hooks into its own copy.
    channel: _Channel = block._crma_channel
    index = block._crma_index
    if index == 0:  # a new forward: fresh side state (per token, so KV-cache decoding needs nothing else)
        channel.state, channel.operands = None, None
        channel.running = _running_adapter(channel)
    adapter = channel.running
    if adapter is None:
        return None
    h = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output
    if channel.operands is None:
        channel.operands = adapter.operands(y.shape[0])
    operands = channel.operands[index]
    if operands[0].device != y.device:  # blocks may sit on different devices (a device_map)
        operands = tuple(t.to(y.device) for t in operands)
    state = channel.state if channel.state is None or channel.state.device == y.device else channel.state.to(y.device)
    y_out, new_state = side_channel(y, h, state, operands)
    last = index == len(channel.layers) - 1
    # Drop the references after the last block so the graph is not kept alive past the forward.
    channel.state = None if last else new_state
    if last:
        channel.operands = None
    return (y_out, *output[1:]) if isinstance(output, tuple) else y_out


@torch.no_grad()
def attach(
    model: nn.Module,
    config: CRMAConfig | None = None,
    *,
    adapter_name: str = "default",
    bases: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Install a CRMA adapter beside every decoder block of `model` in place, make it active, and return `model`.

    Works on plain HF causal LMs, peft-wrapped models (attach *after* `get_peft_model`, which would freeze CRMA),
    bitsandbytes 4-bit models and models on the `meta` device (then materialise, load the base weights and call
    `reset_parameters()` of `model...crma[adapter_name]`). Several named adapters may be attached (one active at a
    time). The principal bases are looked up in `crma.basis.DEFAULT_CACHE`: attaching again to the same writing
    weights (another arm, another seed) does not recompute them.

    Args:
        model (`nn.Module`): a causal LM with a `layers` ModuleList of decoder blocks.
        config (`CRMAConfig | None`): settings (defaults if None).
        adapter_name (`str`): name of this adapter.
        bases (`list[torch.Tensor] | None`): A's initial value, one `(d, rank)` basis per block (e.g. from
            `crma.principal_bases`); None: from `config.init_A`.

    Returns:
        `nn.Module`: the same model. CRMA parameters are fp32 and trainable; no other `requires_grad` changes.
    """
    config = config or CRMAConfig()
    layers, channel = _channel(model)
    if channel is not None and adapter_name in channel.adapters:
        raise ValueError(f"a CRMA adapter named {adapter_name!r} is already attached; detach it or pick another name")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without '.'; got {adapter_name!r}")
    adapter = CRMAAdapter(config, len(layers), hidden_size_of(model), device=module_device(layers[0]))
    adapter.bind(layers)
    if not adapter.crma_A.is_meta:
        adapter.reset_A(bases)
    _install(model, layers, channel, adapter_name, adapter)
    return model


def _install(
    model: nn.Module, layers: nn.ModuleList, channel: _Channel | None, name: str, adapter: CRMAAdapter
) -> None:
    if channel is None:
        parent = _parent_of(model, layers)
        if hasattr(parent, "crma"):
            raise ValueError(f"{type(parent).__name__} already has a `crma` attribute; cannot attach CRMA")
        channel = _Channel(adapters=nn.ModuleDict(), layers=layers)
        parent.crma = channel.adapters
        layers._crma_channel = channel
        for index, layer in enumerate(layers):
            layer._crma_channel, layer._crma_index = channel, index
            # prepend: later hooks (e.g. transformers' output_hidden_states capture) see the CRMA output.
            channel.handles.append(layer.register_forward_hook(_crma_hook, with_kwargs=True, prepend=True))
    channel.adapters[name] = adapter
    _ignore_on_save(model, adapter, add=True)
    set_active(model, name)


def _ignore_on_save(model: nn.Module, adapter: CRMAAdapter, *, add: bool) -> None:
    """List (or unlist) `adapter`'s state_dict keys in `_keys_to_ignore_on_save` of every HF model holding it, so
    `save_pretrained` writes the base without CRMA (the base model would drop the keys as unexpected on reload)."""
    paths = {id(m): name for name, m in model.named_modules()}
    where = paths[id(adapter)]
    for path, module in model.named_modules():
        ignored = module.__dict__.get("_keys_to_ignore_on_save")  # its own, not one forwarded (peft)
        if not isinstance(ignored, set) or not (path == "" or where.startswith(path + ".")):
            continue
        inner = where[len(path) + 1 :] if path else where
        keys = {f"{inner}.{key}" for key, _ in adapter.named_parameters()}
        if add:
            ignored |= keys
        else:
            ignored -= keys


def detach(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one CRMA adapter (or all when `adapter_name` is None); the model is then exactly as before attach."""
    layers, channel = _require(model)
    names = list(channel.adapters) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in channel.adapters:
            raise ValueError(f"no CRMA adapter named {name!r}; attached: {sorted(channel.adapters)}")
        _ignore_on_save(model, channel.adapters[name], add=False)
        del channel.adapters[name]
        if channel.active == name:
            channel.active = None
    if not len(channel.adapters):
        for handle in channel.handles:
            handle.remove()
        for layer in layers:
            del layer._crma_channel, layer._crma_index
        del layers._crma_channel
        del _parent_of(model, layers).crma
    return model


def set_active(model: nn.Module, adapter_name: str | None) -> None:
    """Make one attached CRMA adapter active (trainable, applied), or none (CRMA off; the model is its base)."""
    _, channel = _require(model)
    if adapter_name is not None and adapter_name not in channel.adapters:
        raise ValueError(f"no CRMA adapter named {adapter_name!r}; attached: {sorted(channel.adapters)}")
    channel.active = adapter_name
    channel.state = None
    # Mirror peft's set_adapter: only the active adapter's parameters train.
    for name, adapter in channel.adapters.items():
        adapter.requires_grad_(name == adapter_name)


def enable(model: nn.Module, adapter_name: str = "default") -> None:
    """Switch CRMA on (the named adapter) without re-attaching."""
    set_active(model, adapter_name)


def disable(model: nn.Module) -> None:
    """Switch CRMA off without detaching: the model computes exactly its base (+ LoRA) output."""
    set_active(model, None)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model runs without CRMA (exactly its base + LoRA output); on exit CRMA is as
    before. Unlike `disable`, trainability (`requires_grad`) is left alone. Nests, and is exception-safe.

    Example: a DPO-style reference pass with LoRA kept but CRMA off: `with crma.disabled(model): ref = model(**b)`.
    """
    _, channel = _require(model)
    channel.suspended += 1
    try:
        yield model
    finally:
        channel.suspended -= 1


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active CRMA adapter, None when CRMA is off or not attached."""
    _, channel = _channel(model)
    return None if channel is None else channel.active


def get_adapter(model: nn.Module, adapter_name: str | None = None) -> CRMAAdapter:
    """The `CRMAAdapter` (every block's parameters) of an adapter: the active one by default, else the first."""
    _, channel = _require(model)
    name = adapter_name or channel.active or next(iter(channel.adapters))
    if name not in channel.adapters:
        raise ValueError(f"no CRMA adapter named {name!r}; attached: {sorted(channel.adapters)}")
    return channel.adapters[name]


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> CRMAConfig:
    """The `CRMAConfig` of an attached adapter (the active one by default)."""
    return get_adapter(model, adapter_name).config


def param_groups(
    model: nn.Module, lr: float, structural_lr: float, gate_lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of every trainable parameter: proj / structural / gate.

    proj: LoRA and CRMA projections (and anything else trainable) at `lr` with `weight_decay`; structural:
    `log_mix`, read and write logits at `structural_lr`; gate: `log_alpha` at `gate_lr`. The last two get no decay:
    decay would pull M toward full averaging and alpha toward 1.

    Raises `ValueError` when the active CRMA adapter has no trainable parameter (peft's `get_peft_model` run after
    `crma.attach` freezes it; an optimizer built then would silently leave CRMA at its init).
    """
    _, channel = _channel(model)
    if channel is not None and channel.active is not None:
        adapter = channel.adapters[channel.active]
        if not any(p.requires_grad for p in adapter.parameters()):
            raise ValueError(
                f"the active CRMA adapter {channel.active!r} has no trainable parameter: peft's get_peft_model "
                "freezes every non-LoRA parameter, so call crma.attach() after get_peft_model (or "
                f"crma.set_active(model, {channel.active!r}) to make it trainable again)"
            )
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
    """L * (2*d*r + n^2 + 2n + 1): the CRMA parameter count of a model (without the n^2 mixing logits when the
    mixing is fixed to the identity)."""
    cfg = config or CRMAConfig()
    n, r = cfg.n_streams, cfg.rank
    mix = n * n if cfg.mixing == "sinkhorn" else 0
    return num_layers * (2 * hidden_size * r + mix + 2 * n + 1)

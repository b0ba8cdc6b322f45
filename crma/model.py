"""attach / detach / switch CRMA on a HF causal LM, optimizer groups, mixing diagnostics, save / load.

Einsum letters: `l` layers, `i`/`j` streams.

CRMA lives beside the model rather than around it: every decoder block gets a `crma` ModuleDict
(adapter name -> `CRMABlock`) and one forward hook. Module paths and state_dict keys of the base model and of
peft's LoRA stay unchanged, so `PeftModel.save_pretrained` / `from_pretrained` keep working. The hook runs in
the block's `__call__`, i.e. outside transformers' gradient-checkpointed `forward`, so the side state that flows
from block to block keeps its gradient under (reentrant) checkpointing too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CRMAConfig
from .layer import CRMABlock, batched_mixing, orthonormal_basis, principal_basis
from .sinkhorn import sinkhorn
from .utils import find_decoder_layers, hidden_size_of, module_device

CONFIG_NAME = "crma_config.json"
WEIGHTS_NAME = "crma.safetensors"
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


@dataclass
class LayerMixing:
    """Mixing diagnostics of one block: singular values, Sinkhorn error, distance from identity, gate."""

    index: int
    sigma1: float
    sigma2: float
    max_row_err: float
    max_col_err: float
    dist_from_identity: float
    alpha: float


@dataclass
class MixingReport:
    """Per-layer mixing diagnostics and the composite gain of the product of all layers' M."""

    layers: list[LayerMixing]
    composite_gain: float

    def summary(self) -> dict[str, float]:
        """Means over layers (worst case for the Sinkhorn error) and the composite gain."""
        n = len(self.layers)
        return {
            "sigma1_mean": sum(x.sigma1 for x in self.layers) / n,
            "sigma2_mean": sum(x.sigma2 for x in self.layers) / n,
            "max_rowcol_err": max(max(x.max_row_err, x.max_col_err) for x in self.layers),
            "dist_from_identity_mean": sum(x.dist_from_identity for x in self.layers) / n,
            "composite_gain": self.composite_gain,
            "alpha_mean": sum(x.alpha for x in self.layers) / n,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return asdict(self)


@torch.no_grad()
def mixing_report(model: nn.Module, adapter_name: str | None = None) -> MixingReport:
    """Per layer: sigma1, sigma2, max row/column-sum error, ||M - I||_F, gate alpha; and the composite gain.

    sigma1 is 1 for every doubly stochastic M (it only says Sinkhorn converged); sigma2 says how much the streams
    mix (1: none or a permutation, 0: full averaging). The composite gain is max(max abs row sum, max abs column
    sum) of M_L ... M_1: at most 1 (+ Sinkhorn error) whatever the depth.
    """
    rows, product = [], None
    for block in crma_blocks(model, adapter_name):
        m = sinkhorn(block.crma_log_mix.double().cpu(), block.config.sinkhorn_iters)
        sv = torch.linalg.svdvals(m)
        rows.append(
            LayerMixing(
                index=block.index,
                sigma1=sv[0].item(),
                sigma2=sv[1].item(),
                max_row_err=(m.sum(-1) - 1).abs().max().item(),
                max_col_err=(m.sum(-2) - 1).abs().max().item(),
                dist_from_identity=torch.linalg.matrix_norm(m - torch.eye(m.shape[0], dtype=m.dtype)).item(),
                alpha=block.gate().item(),
            )
        )
        product = m if product is None else m @ product
    gain = max(product.abs().sum(-1).max().item(), product.abs().sum(-2).max().item())
    return MixingReport(layers=rows, composite_gain=gain)


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

    layers, channel = _require(model)
    name = adapter_name or channel.active or next(iter(channel.configs))
    blocks = crma_blocks(model, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "crma": channel.configs[name].to_dict(), **_fingerprint(model)}
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    tensors = {
        f"layers.{i}.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for i, block in enumerate(blocks)
        for key, value in block.state_dict().items()
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
    _, channel = _channel(model)
    if channel is None or adapter_name not in channel.configs:
        _attach(model, config, adapter_name=adapter_name, init_A=False)
    tensors = load_file(str(path / WEIGHTS_NAME))
    blocks = crma_blocks(model, adapter_name)
    expected = {f"layers.{i}.{k}" for i, b in enumerate(blocks) for k in b.state_dict()}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{path / WEIGHTS_NAME} does not match the attached adapter: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for i, block in enumerate(blocks):
        for key, param in block.named_parameters():
            value = tensors[f"layers.{i}.{key}"]
            if value.shape != param.shape:
                raise ValueError(f"layers.{i}.{key}: saved shape {tuple(value.shape)} != {tuple(param.shape)}")
            param.copy_(value.to(param.device))
    set_active(model, adapter_name)
    return model


def expected_parameter_count(num_layers: int, hidden_size: int, config: CRMAConfig | None = None) -> int:
    """L * (2*d*r + n^2 + 2n + 1): the CRMA parameter count of a model."""
    cfg = config or CRMAConfig()
    n, r = cfg.n_streams, cfg.rank
    return num_layers * (2 * hidden_size * r + n * n + 2 * n + 1)

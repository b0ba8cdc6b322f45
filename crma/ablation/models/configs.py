"""What a model name refers to, its config, and whether CRMA can use the architecture it describes."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import hub
from .errors import ModelLoadError, first_line
from .hub import Token
from .presets import PRESETS, ModelPreset, preset_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_SUPPORTED = "CRMA needs a decoder with `model.layers` (Llama, Mistral, Qwen2, ...)"


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved: a preset, a local folder, or a Hub repository.

    Args:
        name (`str`): the name as asked for, stripped.
        preset (`ModelPreset | None`): the preset it names.
        source (`str`): what `from_pretrained` reads: the Hub id, or the local folder; `""` for `tiny-random`.
        is_local (`bool`): `source` is a folder on this machine.
    """

    name: str
    preset: ModelPreset | None
    source: str
    is_local: bool


def resolve_name(name: str, *, allow_local: bool = True) -> ModelRef:
    """Check a model name and say what it refers to, without any download.

    Args:
        name (`str`): a key of `PRESETS`, a Hub id `owner/name`, or (with `allow_local`) a local folder.
        allow_local (`bool`): accept local folders. With False a name that is not a preset must be a valid Hub id
            `owner/name` and is never read from this machine's files, even when a folder of that name exists here.

    Returns:
        `ModelRef`: the resolved name.
    """
    presets = ", ".join(PRESETS)
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"`model` must be a preset ({presets}) or a Hub id; got {name!r}")
    name = name.strip()
    preset = PRESETS.get(name)
    if preset is not None:
        return ModelRef(name, preset, preset.hub_id or "", is_local=False)
    if not allow_local:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name)
            valid = name.count("/") == 1
        except HFValidationError:
            valid = False
        # A valid id is only ever downloaded by huggingface_hub (`hub.download_*`), never looked up as a path, so a
        # folder of the same name here is not read.
        if not valid:
            raise ModelLoadError(
                f"model {name!r} cannot be used here: pick a preset ({presets}) or type a Hub id like 'owner/name' "
                "(local folders are not loaded)"
            )
        return ModelRef(name, None, name, is_local=False)
    if Path(name).is_dir():
        return ModelRef(name, None, name, is_local=True)
    if "/" not in name:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ModelLoadError(f"unknown model {name!r}: {hint}use a preset ({presets}) or a Hub id like 'org/name'")
    return ModelRef(name, None, name, is_local=False)


def hub_access(ref: ModelRef, token: Token) -> bool:
    """Check that `ref` may be read with `token`, and say whether it is read from local files only (a folder, or
    the HF cache while the Hub is unreachable).

    huggingface_hub serves a cached file when the Hub refuses a download, so a private or gated model this
    machine's owner downloaded would be served to any request. For a token other than the machine's own (`None`),
    access is therefore proven on the Hub first (`auth_check`), and without the Hub the cache is not used at all.
    """
    if ref.is_local:
        return True
    if not hub.hub_reachable():
        if token is not None:
            raise ModelLoadError(hub.offline_message(ref.name))
        return True
    if token is not None:
        try:
            hub.check_access(ref.source, token=token)
        except hub.hub_errors() as e:
            raise hub.map_hub_error(ref.name, e, token=token) from e
    return False


def fetch_config(ref: ModelRef, *, token: Token = None, local_only: bool | None = None) -> PretrainedConfig:
    """The config of a Hub repository (its `config.json` downloaded with `token`) or of a local folder; never
    remote code. `local_only` is `hub_access`'s answer when the caller has it already."""
    from transformers import AutoConfig

    if local_only is None:
        local_only = hub_access(ref, token)
    try:
        folder = ref.source if ref.is_local else hub.download_config(ref.source, token=token, local_only=local_only)
        return AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except hub.hub_errors() as e:
        raise hub.map_hub_error(ref.name, e, token=token) from e


def model_config(name: str, *, token: Token = None, allow_local: bool = True) -> PretrainedConfig:
    """The config of a preset (built offline from its architecture), a Hub id (its `config.json`) or a local folder.

    Args:
        name (`str`): a preset, a Hub id or (with `allow_local`) a local folder.
        token (`str | bool | None`): Hub token: None uses this machine's login (`hf auth login` / `HF_TOKEN`),
            False sends none, a string sends that token only.
        allow_local (`bool`): accept local folders (see `resolve_name`).

    Returns:
        `PretrainedConfig`: the config; checked to describe a decoder CRMA can use.
    """
    ref = resolve_name(name, allow_local=allow_local)
    config = preset_config(ref.preset.name) if ref.preset is not None else fetch_config(ref, token=token)
    check_architecture(ref.name, config)
    return config


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of `config` with no storage (meta device): for counting and architecture checks."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def check_architecture(label: str, config: PretrainedConfig) -> nn.Module:
    """The meta model of `config`, once it is known to be a causal LM whose decoder blocks CRMA can find.

    Args:
        label (`str`): the model name, for messages.
        config (`PretrainedConfig`): its config.

    Returns:
        `nn.Module`: the model on the meta device.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from crma.utils import find_decoder_layers

    arch = getattr(config, "model_type", type(config).__name__)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"model '{label}' ({arch}) is not a causal language model; {_SUPPORTED}")
    try:
        meta = meta_model(config)
    except (ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
        raise ModelLoadError(
            f"model '{label}' ({arch}) cannot be built by this transformers version: {first_line(e)}"
        ) from e
    try:
        find_decoder_layers(meta)  # the core's rule: the blocks CRMA attaches to
    except ValueError as e:
        raise ModelLoadError(f"model '{label}' ({arch}) is not supported: {_SUPPORTED}") from e
    return meta

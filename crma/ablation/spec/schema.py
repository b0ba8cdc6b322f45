"""The one parser of ablation configs: CLI flags, `--config` files, the app's form and the `/ablate` API all go
through `parse_config`, so a value is read, checked and explained the same way wherever it comes from.

The schema is the dataclasses themselves: `AblationConfig` and the `CRMAConfig` / `ZClipConfig` it nests. Each leaf
field has a dotted key (`crma.rank`), a label (what the page calls it, used in every error message), a help text (the
class's `Args:` entry) and a CLI flag.

Text is turned into typed values by pydantic (`TypeAdapter`, lax mode: "2e-4" is a float, "no" is False): it is
already installed with gradio, validates nested dataclasses, and its error types map to plain sentences; the ranges
themselves stay in each dataclass's `__post_init__`, so a config built in Python is checked by the same rules.
`transformers.HfArgumentParser` was the other candidate, but it only builds argparse parsers (no dict / form / JSON
input) and does not nest dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crma.config import ConfigFieldError, CRMAConfig, ZClipConfig

from .config import AblationConfig

_NESTED: dict[str, type] = {"crma": CRMAConfig, "zclip": ZClipConfig}

# Core fields an ablation does not take as settings: each arm decides its own mixing (`lora+crma-nomix`).
_NOT_SETTINGS = {"crma.mixing": "sinkhorn"}
# What the page calls each field; every error message uses these names.
LABELS: dict[str, str] = {
    "model": "Model",
    "dataset": "Data",
    "start": "Start row",
    "rows": "Rows",
    "steps": "Steps",
    "seed": "Seed",
    "seeds": "Seeds",
    "arms": "Arms",
    "lr_grid": "LR multipliers",
    "eval_rows": "Held-out rows",
    "val_rows": "Validation rows",
    "eval_start": "Held-out start row",
    "eval_dataset": "Held-out data",
    "eval_every": "Evaluate every",
    "answer_rows": "Answers at the end",
    "answer_tokens": "Answer tokens",
    "lr": "LR",
    "structural_lr": "Structural LR",
    "gate_lr": "Gate LR",
    "weight_decay": "Weight decay",
    "batch_size": "Batch size",
    "seq_len": "Seq len",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_targets": "LoRA targets",
    "lora_dropout": "LoRA dropout",
    "lora_init": "LoRA init",
    "max_grad_norm": "Fixed clip norm",
    "crma.n_streams": "CRMA streams",
    "crma.rank": "CRMA rank",
    "crma.sinkhorn_iters": "Sinkhorn iterations",
    "crma.mix_init_diag": "Mixing diagonal at init",
    "crma.gate_init": "Gate at init",
    "crma.read_init": "Read logit at init",
    "crma.write_init": "Write logit at init",
    "crma.init_A": "CRMA projection init",
    "crma.init_seed": "CRMA init seed",
    "crma.log_alpha_min": "Gate log floor",
    "crma.log_alpha_max": "Gate log ceiling",
    "crma.eps": "CRMA eps",
    "zclip.alpha": "ZClip alpha",
    "zclip.z_thresh": "ZClip z threshold",
    "zclip.warmup_steps": "ZClip warm-up steps",
    "zclip.clip_option": "ZClip clip option",
    "zclip.max_grad_norm": "ZClip hard cap",
    "zclip.eps": "ZClip eps",
    "warmup_steps": "LR warm-up steps",
    "spike_at": "Spike stress at step",
    "spike_scale": "Spike scale",
    "diag_every": "Diagnostics every",
    "device": "Device",
    "dtype": "Dtype",
    "max_wall_s": "Time cap (s)",
    "save_adapters": "Save adapters",
}


class ConfigError(ValueError):
    """A config value is unknown, unreadable or out of range; the message names the field by its label.

    Args:
        key (`str`): the dotted key of the field (`crma.rank`), or the unknown name.
        message (`str`): one sentence, e.g. "Steps must be an integer ≥ 1; got 0".
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class FieldSpec:
    """One leaf field of the schema.

    Args:
        key (`str`): dotted key, e.g. `crma.rank`.
        label (`str`): the page's name for it.
        help (`str`): the field's `Args:` entry of its dataclass.
        hint (`Any`): the resolved type hint.
        default (`Any`): the default value.
    """

    key: str
    label: str
    help: str
    hint: Any
    default: Any

    @property
    def flag(self) -> str:
        """The CLI flag, e.g. `--crma-rank`."""
        return "--" + self.key.replace(".", "-").replace("_", "-")


def _args_docs(cls: type) -> dict[str, str]:
    """`{name: text}` of a PEFT-style `Args:` block (`name (`type`): text`, continued on indented lines)."""
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in (cls.__doc__ or "").split("Args:", 1)[-1].splitlines():
        match = re.match(r"^\s{4,8}([\w, ]+) \(`[^`]*`\): (.*)$", line)
        if match:
            current = [n.strip() for n in match.group(1).split(",")]
            for name in current:
                docs[name] = match.group(2).strip()
        elif line.strip() and current:
            for name in current:
                docs[name] += " " + line.strip()
        elif not line.strip():
            current = []
    return docs


@functools.cache
def schema() -> tuple[FieldSpec, ...]:
    """Every leaf field of `AblationConfig`, nested CRMA and ZClip fields included, in declaration order."""
    specs = []
    top_docs, defaults = _args_docs(AblationConfig), AblationConfig()
    for f in dataclasses.fields(AblationConfig):
        if f.name in _NESTED:
            cls = _NESTED[f.name]
            hints, docs = typing.get_type_hints(cls), _args_docs(cls)
            for sub in dataclasses.fields(cls):
                key = f"{f.name}.{sub.name}"
                if key in _NOT_SETTINGS:
                    continue
                default = getattr(getattr(defaults, f.name), sub.name)
                specs.append(FieldSpec(key, LABELS[key], docs.get(sub.name, ""), hints[sub.name], default))
            continue
        hint = typing.get_type_hints(AblationConfig)[f.name]
        specs.append(FieldSpec(f.name, LABELS[f.name], top_docs.get(f.name, ""), hint, getattr(defaults, f.name)))
    return tuple(specs)


@functools.cache
def _by_key() -> dict[str, FieldSpec]:
    return {spec.key: spec for spec in schema()}


def field_spec(key: str) -> FieldSpec:
    """The `FieldSpec` of a dotted key (KeyError if unknown)."""
    return _by_key()[key]


def label(key: str) -> str:
    """The page's name of a field (its key when it has none)."""
    spec = _by_key().get(key)
    return spec.label if spec is not None else key


# ---------------------------------------------------------------------------------------------------------------------
# Reading one value


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _core(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if _is_optional(hint) and len(args) == 1 else hint


_RULES = {  # pydantic error type -> what the value must be
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "int_type": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "list_type": "a list",
}


def _no_surrogates(spec: FieldSpec, text: str) -> str:
    # A lone surrogate ("\ud800" in JSON) is a valid Python str but not encodable text: refuse it here, not in a
    # tokenizer or a file write three layers down.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(spec.key, f"{spec.label} must be valid text (it holds a lone surrogate character)") from None
    return text


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(hint)


def coerce(spec: FieldSpec, raw: Any) -> Any:
    """Turn one raw value (text from a form or flag, or JSON data) into the field's type, or raise `ConfigError`."""
    from pydantic import ValidationError

    hint, core = spec.hint, _core(spec.hint)
    if isinstance(raw, str):
        raw = _no_surrogates(spec, raw.strip())
        if raw == "":
            if _is_optional(hint):
                return None
            raise ConfigError(spec.key, f"{spec.label} is empty; enter a value")
    if raw is None:
        if _is_optional(hint):
            return None
        raise ConfigError(spec.key, f"{spec.label} is empty; enter a value")
    origin = typing.get_origin(core)
    if origin is list:
        if isinstance(raw, str):
            raw = [part.strip() for part in re.split(r"[,;]", raw) if part.strip()]
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = [raw]
    elements = typing.get_args(core) if origin is list else (core,)
    if int in elements or float in elements:
        values = raw if isinstance(raw, list) else [raw]
        if any(isinstance(v, bool) for v in values):  # JSON true is not the number 1
            raise ConfigError(spec.key, f"{spec.label} must be a number; got {raw!r}")
    if dataclasses.is_dataclass(core):
        raise ConfigError(spec.key, f"{spec.label} is a group of settings; set its fields one by one")
    try:
        value = _adapter(core).validate_python(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "literal_error":
            rule = f"one of {error['ctx']['expected']}"
        else:
            rule = _RULES.get(error["type"], error["msg"][0].lower() + error["msg"][1:])
        where = "".join(f"[{p}]" for p in error["loc"] if isinstance(p, int))
        raise ConfigError(spec.key, f"{spec.label}{where} must be {rule}; got {raw!r}") from None
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(spec.key, f"{spec.label} must be a finite number; got {raw!r}")
        if isinstance(number, str):
            _no_surrogates(spec, number)
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Reading a whole config


def _flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"crma": {"rank": 8}}` and `{"crma.rank": 8}` both become `{"crma.rank": 8}`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(str(key), f"config keys must be text; got {key!r}")
        if key in _NESTED:
            if not isinstance(value, Mapping):
                raise ConfigError(key, f'`{key}` must be an object of its settings, e.g. {{"rank": 8}}; got {value!r}')
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def _unknown(key: str) -> ConfigError:
    known = [spec.key for spec in schema()]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(key, f"unknown setting '{key}'{hint}; `python -m crma ablate --help` lists them all")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    try:
        return cls(**values)
    except ConfigFieldError as exc:
        key = prefix + exc.field
        raise ConfigError(key, exc.message(label(key))) from None


def parse_config(values: Mapping[str, Any], *, base: AblationConfig | None = None) -> AblationConfig:
    """Build and validate an `AblationConfig` from raw values, on top of `base` (the defaults when None).

    Args:
        values (`Mapping[str, Any]`): field values by dotted key (`crma.rank`), nested mapping (`{"crma": {...}}`)
            or plain name; text ("2e-4", "1,2,3", "no") or JSON data.
        base (`AblationConfig | None`): the config the values override (e.g. a `--config` file's).

    Returns:
        `AblationConfig`: a valid config.

    Raises:
        `ConfigError`: one sentence naming the field by its label, for unknown fields, unreadable values and values
        outside their range.
    """
    if not isinstance(values, Mapping):
        raise ConfigError("", f"a config must be a JSON object of settings; got {type(values).__name__}")
    table = _by_key()
    data = (base or AblationConfig()).to_dict()
    for key, raw in _flatten(values).items():
        if key in _NOT_SETTINGS:
            if raw == _NOT_SETTINGS[key]:
                continue  # a run's own config.json holds it at its default: read back as it was written
            raise ConfigError(key, f"`{key}` is not a setting: each arm sets it (the arm lora+crma-nomix has M = I)")
        spec = table.get(key)
        if spec is None:
            raise _unknown(key)
        parent, _, leaf = spec.key.rpartition(".")
        (data[parent] if parent else data)[leaf] = coerce(spec, raw)
    nested = {name: _build(cls, data.pop(name), f"{name}.") for name, cls in _NESTED.items()}
    return _build(AblationConfig, {**data, **nested})


def config_to_values(cfg: AblationConfig) -> dict[str, Any]:
    """`{dotted key: value}` of every leaf field (the inverse of `parse_config` on plain values)."""
    out = {}
    for spec in schema():
        parent, _, leaf = spec.key.rpartition(".")
        out[spec.key] = getattr(getattr(cfg, parent), leaf) if parent else getattr(cfg, leaf)
    return out

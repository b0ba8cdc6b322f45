"""The one config parser: every source (flags, files, form, API) reads values the same way and explains errors by the
field's label."""

from __future__ import annotations

import dataclasses
import json

import pytest

from crma import CRMAConfig, ZClipConfig
from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import LABELS, ConfigError, config_to_values, parse_config, schema


def test_every_field_has_a_label_a_help_text_and_a_flag() -> None:
    keys = [spec.key for spec in schema()]
    nested = [f"crma.{f.name}" for f in dataclasses.fields(CRMAConfig) if f.name != "mixing"] + [
        f"zclip.{f.name}" for f in dataclasses.fields(ZClipConfig)
    ]
    top = [f.name for f in dataclasses.fields(AblationConfig) if f.name not in ("crma", "zclip")]
    assert sorted(keys) == sorted(top + nested)  # every CRMA and ZClip setting is ablatable
    assert set(LABELS) == set(keys)
    for spec in schema():
        assert spec.help, spec.key  # documented once, in the class's Args block
        assert spec.flag.startswith("--") and " " not in spec.flag
    assert len({spec.flag for spec in schema()}) == len(keys)


def test_text_json_nested_and_dotted_values_agree() -> None:
    as_text = parse_config({"steps": "30", "lr": "2e-4", "seeds": "1, 2", "crma.rank": "8", "save_adapters": "no"})
    as_json = parse_config({"steps": 30, "lr": 0.0002, "seeds": [1, 2], "crma": {"rank": 8}, "save_adapters": False})
    assert as_text == as_json
    assert as_text.crma.rank == 8 and as_text.save_adapters is False and as_text.seeds == [1, 2]
    # The mixing is each arm's (lora+crma-nomix), not a setting: it is refused by name.
    with pytest.raises(ConfigError, match="`crma.mixing` is not a setting: each arm sets it"):
        parse_config({"crma.mixing": "identity"})
    assert parse_config({"crma": {"mixing": "sinkhorn", "rank": 2}}).crma.rank == 2  # as a config.json holds it


def test_round_trips_through_json_and_values() -> None:
    cfg = parse_config({"crma": {"n_streams": 4, "init_A": "orthonormal"}, "zclip": {"clip_option": "mean"}})
    assert AblationConfig.from_json(cfg.to_json()) == cfg
    assert parse_config(config_to_values(cfg)) == cfg
    assert json.loads(cfg.to_json())["crma"]["n_streams"] == 4


def test_one_seed_is_just_the_seed() -> None:
    cfg = parse_config({"seeds": "7"})
    assert cfg.seed == 7 and cfg.seeds is None and cfg.seed_list == [7]


def test_values_override_a_base() -> None:
    base = parse_config({"steps": 5, "crma": {"rank": 2}})
    cfg = parse_config({"crma.n_streams": 4}, base=base)
    assert (cfg.steps, cfg.crma.rank, cfg.crma.n_streams) == (5, 2, 4)


@pytest.mark.parametrize(
    ("values", "key", "message"),
    [
        ({"steps": 0}, "steps", "Steps must be an integer ≥ 1; got 0"),
        ({"steps": "three"}, "steps", "Steps must be a whole number; got 'three'"),
        ({"steps": 2.5}, "steps", "Steps must be a whole number; got 2.5"),
        ({"steps": True}, "steps", "Steps must be a number; got True"),
        ({"seq_len": ""}, "seq_len", "Seq len is empty; enter a value"),
        # One rule in one place: a row needs a prompt and a response token; the data layer would refuse 1 too.
        ({"seq_len": 1}, "seq_len", "Seq len must be an integer ≥ 2 (a prompt token and a response token); got 1"),
        ({"lr": "nan"}, "lr", "LR must be a finite number; got 'nan'"),
        ({"lr": 50}, "lr", "LR must be a number in (0, 10); got 50"),
        ({"save_adapters": "maybe"}, "save_adapters", "Save adapters must be true or false; got 'maybe'"),
        ({"device": "tpu"}, "device", "Device must be one of 'auto', 'cpu' or 'cuda'; got 'tpu'"),
        ({"crma.n_streams": 1}, "crma.n_streams", "CRMA streams must be an integer ≥ 2; got 1"),
        ({"crma": {"rank": 0}}, "crma.rank", "CRMA rank must be a positive integer; got 0"),
        ({"zclip.alpha": 1.5}, "zclip.alpha", "ZClip alpha must be a number in (0, 1); got 1.5"),
        ({"zclip": 3}, "zclip", "`zclip` must be an object of its settings"),
        ({"seeds": "1,1"}, "seeds", "Seeds must be None or a list of distinct integers in [0, 2^32); got [1, 1]"),
        ({"seeds": "1,x"}, "seeds", "Seeds[1] must be a whole number"),
        ({"seed": -1}, "seed", "Seed must be an integer in [0, 2^32); got -1"),
        ({"seed": 2**40}, "seed", "Seed must be an integer in [0, 2^32)"),
        ({"arms": "lora,dora"}, "arms", "Arms must be names from"),
        ({"spike_at": 99}, "spike_at", "Spike stress at step must be None or a step in [1, steps]; got 99"),
        ({"model": "\ud800"}, "model", "Model must be valid text (it holds a lone surrogate character)"),
        ({"lora_targets": ["q_proj", "\udc00"]}, "lora_targets", "lone surrogate"),
        ({"setps": 3}, "setps", "unknown setting 'setps' (did you mean 'steps'?)"),
        ({"model": ["a"]}, "model", "Model must be text; got ['a']"),
        ({"lora_init": "pissa_niter_1000000000"}, "lora_init", "LoRA init must be 'default', 'gaussian', 'pissa' or"),
        ({"lora_init": "eva"}, "lora_init", "'pissa_niter_N' with N in 1..32; got 'eva'"),
    ],
)
def test_errors_name_the_field_by_its_label(values, key, message) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(values)
    assert info.value.key == key
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_config_built_in_python_is_checked_by_the_same_rules() -> None:
    with pytest.raises(ValueError, match="`steps` must be an integer ≥ 1; got 0"):
        AblationConfig(steps=0)
    with pytest.raises(ValueError, match="`rank` must be a positive integer; got 0"):
        AblationConfig(crma={"rank": 0})
    with pytest.raises(ValueError, match="`save_adapters` must be true or false; got 'no'"):
        AblationConfig(save_adapters="no")  # a loose JSON type never passes as truthy

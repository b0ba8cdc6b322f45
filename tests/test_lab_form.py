"""`crma.lab.form`: the page's form and the `/ablate` JSON to a capped, path-free config; the data preview."""

from __future__ import annotations

import json

import pytest

from crma.ablation.data import DataError
from crma.ablation.spec.arms import ARM_SPECS
from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import ConfigError
from crma.lab import form


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": "abc"}, "LR must be a number; got 'abc'"),
        ({"structural_lr": ""}, "Structural LR is empty"),
        ({"gate_lr": "nan"}, "Gate LR must be a finite number"),
        ({"lr": "-1"}, "LR must be a number in (0, 10)"),
        ({"steps": "ten"}, "Steps must be a whole number"),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"steps": True}, "Steps must be a number; got True"),
        ({"steps": 0}, "Steps must be an integer ≥ 1; got 0"),
        ({"steps": 1001}, "Steps must be at most 1000 on this Space; got 1001"),
        ({"rows": 5001}, "Rows must be at most 5000 on this Space"),
        ({"seq_len": 4096}, "Seq len must be at most 2048 on this Space"),
        ({"batch_size": 33}, "Batch size must be at most 32 on this Space"),
        ({"batch_size": -2}, "Batch size must be an integer ≥ 1"),
        ({"start": -1}, "Start row must be an integer ≥ 0"),
        ({"seeds": "1,2,3,4,5,6"}, "Seeds must be at most 5 on this Space; got 6 of them"),
        ({"seeds": "1,x"}, "Seeds[1] must be a whole number"),
        ({"seeds": "3,3"}, "Seeds must be None or a list of distinct integers"),
        ({"seeds": "-4"}, "must be an integer in [0, 2^32); got -4"),
        ({"arms": []}, "Arms must be a non-empty list of arm names"),
        ({"arms": ["lora", "dora"]}, "Arms must be names from"),
        ({"arms": ["lora"] * 7}, "Arms must be at most 6 on this Space; got 7 of them"),
        (
            {"arms": ["lora", "lora+crma"] * 3, "lr_grid": "0.3,1,3,10", "val_rows": 8},
            "Arms × LR multipliers must be at most 18",
        ),
        ({"model": "  "}, "Model is empty"),
        ({"model": "/etc/models"}, "Model must be a preset or a Hub id"),
        ({"model": "org/../secret"}, "Model must be a preset or a Hub id"),
        ({"dataset": "/etc/passwd"}, "Data must be one of ['alpaca', 'bundled', 'upload']"),
        ({"dataset": "upload"}, "no file was uploaded"),
        ({"lora_targets": ""}, "LoRA targets is empty"),
        ({"lora_targets": "q_proj, rm -rf"}, "LoRA targets must be module names"),
        ({"lora_r": 512}, "LoRA rank must be at most 256 on this Space"),
        ({"crma.n_streams": 1}, "CRMA streams must be an integer ≥ 2"),
        ({"crma": {"n_streams": 1}}, "CRMA streams must be an integer ≥ 2"),
        ({"eval_dataset": "/etc/passwd"}, "Held-out data must be 'alpaca' or 'bundled' on this Space"),
        ({"lr_grid": "1,3"}, "Validation rows must be ≥ 1"),
        ({"crma": {"rank": 65}}, "CRMA rank must be at most 64 on this Space"),
        ({"crma.sinkhorn_iters": 101}, "Sinkhorn iterations must be at most 100 on this Space"),
        ({"max_wall_s": 5000}, "Time cap (s) must be at most 1500 on this Space"),
        ({"spike_at": 50, "steps": 10}, "Spike stress at step must be None or a step in [1, steps]"),
        ({"spike_at": "soon"}, "Spike stress at step must be a whole number"),
        ({"save_adapters": "maybe"}, "Save adapters must be true or false"),
        ({"learning_rate": 1e-4}, "unknown setting 'learning_rate'"),
        ({"crma": 3}, "`crma` must be an object of its settings"),
    ],
)
def test_config_from_form_names_the_bad_field(values, message):
    with pytest.raises(ConfigError) as info:
        form.config_from_form(values)
    assert message in str(info.value)


def test_config_from_form_takes_a_mapping_only():
    with pytest.raises(ConfigError, match="must be a JSON object; got list"):
        form.config_from_form([("steps", 3)])


def test_config_from_form_parses_ui_values():
    cfg = form.config_from_form(
        {
            "model": " tiny-random ",
            "dataset": "bundled",
            "start": 3.0,
            "rows": "16",
            "arms": ["lora", "lora+crma"],
            "seeds": "7",
            "steps": 12.0,
            "lr": "2e-4",
            "structural_lr": 0.005,
            "gate_lr": "1e-3",
            "batch_size": 4.0,
            "seq_len": "256",
            "lora_r": 8,
            "lora_targets": "q_proj, v_proj",
            "crma.n_streams": 3.0,
            "crma.rank": "4",
            "spike_at": 0,
        }
    )
    assert (cfg.model, cfg.start, cfg.rows, cfg.steps) == ("tiny-random", 3, 16, 12)
    assert (cfg.batch_size, cfg.seq_len, cfg.crma.n_streams, cfg.crma.rank) == (4, 256, 3, 4)
    assert cfg.lr == pytest.approx(2e-4) and cfg.gate_lr == pytest.approx(1e-3)
    assert cfg.seed == 7 and cfg.seeds is None and cfg.seed_list == [7]
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.spike_at is None  # 0 in the number box means "off"
    assert cfg.max_wall_s == form.SPACE_CAPS["max_wall_s"]  # the wall-time cap is filled in


def test_nested_and_dotted_keys_agree():
    nested = form.config_from_form({"crma": {"n_streams": 4, "rank": 2}, "zclip": {"z_thresh": 3.0}})
    dotted = form.config_from_form({"crma.n_streams": 4, "crma.rank": 2, "zclip.z_thresh": "3"})
    assert nested == dotted
    assert (nested.crma.n_streams, nested.crma.rank, nested.zclip.z_thresh) == (4, 2, 3.0)


def test_config_from_form_several_seeds_and_upload(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = form.config_from_form(
        {"seeds": "1, 2,3", "dataset": "upload", "spike_at": "5", "steps": 10}, upload=str(data)
    )
    assert cfg.seeds == [1, 2, 3] and cfg.seed_list == [1, 2, 3]
    assert cfg.dataset == str(data) and cfg.spike_at == 5
    # An upload without a dataset choice (the API's data_file) means "use the upload".
    assert form.config_from_form({}, upload=str(data)).dataset == str(data)
    # Without a file, no value of Data reaches a path.
    assert form.resolve_dataset(" Bundled ", None) == "bundled"
    for choice in ("../assets/bundled_instructions.jsonl", str(data), 3):
        with pytest.raises(ConfigError, match="Data must be one of"):
            form.resolve_dataset(choice, None)


def test_caps_come_from_one_dict_and_can_be_lifted():
    for key in ("steps", "rows", "seq_len", "batch_size", "lora_r", "crma.rank"):
        over = int(form.SPACE_CAPS[key]) + 1
        with pytest.raises(ConfigError, match="must be at most .* on this Space") as info:
            form.config_from_form({key: over})
        assert info.value.key == key
        lifted = form.config_from_form({key: over}, caps=None)
        parent, _, leaf = key.rpartition(".")
        assert getattr(getattr(lifted, parent) if parent else lifted, leaf) == over
    assert form.config_from_form({}, caps=None).max_wall_s is None
    with pytest.raises(TypeError):
        form.SPACE_CAPS["steps"] = 10**6  # read-only: a handler cannot loosen the caps for everyone


def test_check_caps_counts_seeds_and_arms():
    form.check_caps(AblationConfig(seeds=[1, 2, 3, 4, 5], arms=list(ARM_SPECS)))
    with pytest.raises(ConfigError, match="Seeds must be at most 2 on this Space; got 3 of them"):
        form.check_caps(AblationConfig(seeds=[1, 2, 3]), {"seeds": 2})
    with pytest.raises(ConfigError, match="Arms must be at most 3 on this Space; got 4 of them"):
        form.check_caps(AblationConfig(arms=["lora", "lora", "lora+crma", "lora+crma"]), {"arms": 3})


# --------------------------------------------------------------------------------------------------------------------
# Data preview and checks


def test_preview_rows_bundled():
    rows = form.preview_rows("bundled", 2, 30, limit=5)
    assert len(rows) == 5 and [r[0] for r in rows] == ["2", "3", "4", "5", "6"]
    assert all(len(r) == 4 and r[1] and r[3] for r in rows)
    with pytest.raises(DataError, match="do not fit"):
        form.preview_rows("bundled", 390, 50)
    with pytest.raises(DataError, match="past the end"):
        form.preview_rows("bundled", 10**6, 1)
    with pytest.raises(ConfigError, match="Rows must be a whole number"):
        form.preview_rows("bundled", 0, "lots")
    with pytest.raises(ConfigError, match="Rows must be at most 5000"):
        form.preview_rows("bundled", 0, 10**6)
    with pytest.raises(ConfigError, match="Start row must be an integer ≥ 0"):
        form.preview_rows("bundled", -1, 3)
    with pytest.raises(ConfigError, match="Rows must be an integer ≥ 1"):
        form.preview_rows("bundled", 0, 0)


def test_preview_rows_uploads_name_the_file_not_the_server_folder(tmp_path):
    csv_file = tmp_path / "nested" / "no_output.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("instruction,input\nhello,\n")
    with pytest.raises(DataError) as info:
        form.preview_rows(str(csv_file), 0, 1)
    assert "missing column(s) ['output']" in str(info.value) and str(tmp_path) not in str(info.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="unsupported data file extension '.txt'"):
        form.preview_rows(str(text), 0, 1)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "x" * 1000, "output": "y"}) + "\n")
    (row,) = form.preview_rows(str(long), 0, 1)
    assert len(row[1]) == form.PREVIEW_CELL_CHARS and row[1].endswith("…")


def test_check_data_fails_fast_on_a_bad_slice(tmp_path):
    form.check_data(form.config_from_form({"dataset": "bundled", "start": 0, "rows": 8}))
    with pytest.raises(DataError, match="do not fit"):
        form.check_data(form.config_from_form({"dataset": "bundled", "start": 390, "rows": 20}))
    three = tmp_path / "deep" / "three.jsonl"
    three.parent.mkdir()
    three.write_text('{"instruction": "a", "output": "b"}\n' * 3)
    with pytest.raises(DataError, match="do not fit") as info:
        form.check_data(form.config_from_form({"dataset": "upload", "rows": 5}, upload=str(three)))
    assert "three.jsonl" in str(info.value) and str(three.parent) not in str(info.value)


def test_check_model_fails_before_any_weight_is_loaded():
    from crma.ablation.models import ModelLoadError, preset_config

    config = form.check_model(form.config_from_form({"model": "tiny-random"}))
    assert config.to_dict() == preset_config("tiny-random").to_dict()  # handed on to the memory check
    with pytest.raises(ModelLoadError, match="model 'no-such-model' cannot be used here"):
        form.check_model(form.config_from_form({"model": "no-such-model"}), device_checks=False)


def test_tokens_per_step_are_capped_whatever_the_split():
    form.check_caps(AblationConfig(batch_size=8, seq_len=2048))  # 16384 tokens: at the cap
    with pytest.raises(ConfigError, match=r"Batch size × Seq len must be at most 16384 .* at most Batch size 8"):
        form.check_caps(AblationConfig(batch_size=32, seq_len=2048))
    with pytest.raises(ConfigError, match=r"got 32 × 1024 = 32768 \(at Seq len 1024, at most Batch size 16\)"):
        form.check_caps(AblationConfig(batch_size=32, seq_len=1024))


def test_check_memory_says_what_fits_before_anything_loads():
    from crma.ablation.models import ModelLoadError

    # A ZeroGPU lease (70 GB): the estimate is checked against it, never against this machine.
    form.check_memory(AblationConfig(model="smollm2-135m", batch_size=4, seq_len=256), zero_gpu=True)
    big = AblationConfig(model="smollm2-135m", batch_size=32, seq_len=2048)
    with pytest.raises(ModelLoadError) as info:
        form.check_memory(big, zero_gpu=True)
    text = str(info.value)
    assert "batch 32 × seq_len 2048 needs ~" in text and "on the GPU" in text
    max_batch = int(text.split("at most batch ")[1].split()[0])
    assert 1 <= max_batch < 32  # and that batch does fit
    form.check_memory(AblationConfig(model="smollm2-135m", batch_size=max_batch, seq_len=2048), zero_gpu=True)


def test_check_memory_reads_the_cpus_free_memory(monkeypatch):
    from crma.ablation.models import ModelLoadError, devices

    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 2 * 2**30)
    form.check_memory(AblationConfig(model="tiny-random", device="cpu"))
    with pytest.raises(ModelLoadError, match=r"~35\.7 GiB on this CPU \(2\.0 GiB free\); at batch 8 at most"):
        form.check_memory(AblationConfig(model="smollm2-135m", device="cpu", batch_size=8, seq_len=2048))

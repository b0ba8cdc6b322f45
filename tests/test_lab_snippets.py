"""`crma.lab.snippets`: the CLI line and the Python client call reproduce the run they were made from (both are run
here and parsed back), the embed snippet, and the strict-JSON events of the `/ablate` API."""

from __future__ import annotations

import json
import math
import shlex
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from crma.ablation.cli import build_parser, config_from_args
from crma.ablation.engine.records import EvalRecord, Phase, StepRecord
from crma.ablation.output.run_folder import StoredRun
from crma.ablation.spec.arms import ARM_SPECS
from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import config_to_values
from crma.lab import form, snippets

# Every setting away from its default (seed instead of seeds): each flag and payload key is exercised.
EVERY_FIELD = {
    "model": "qwen2.5-0.5b",
    "dataset": "alpaca",
    "start": 5,
    "rows": 64,
    "steps": 20,
    "seed": 7,
    "arms": list(ARM_SPECS),
    "lr_grid": "0.5,2",
    "eval_rows": 8,
    "val_rows": 8,
    "eval_start": 300,
    "eval_dataset": "bundled",
    "eval_every": 5,
    "answer_rows": 2,
    "answer_tokens": 12,
    "lr": "1.23456789e-4",  # more digits than `:g` keeps
    "structural_lr": 0.004,
    "gate_lr": 0.002,
    "weight_decay": 0.01,
    "batch_size": 3,
    "seq_len": 96,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_targets": "q_proj,k_proj,v_proj",
    "lora_dropout": 0.05,
    "lora_init": "gaussian",
    "max_grad_norm": 0.5,
    "crma": {
        "n_streams": 4,
        "rank": 2,
        "sinkhorn_iters": 12,
        "mix_init_diag": 0.8,
        "gate_init": 0.5,
        "read_init": 1.5,
        "write_init": 2.5,
        "init_A": "orthonormal",
        "init_seed": 3,
        "log_alpha_min": -8.5,  # a negative number after a flag
        "log_alpha_max": 1.5,
        "eps": 1e-5,
    },
    "zclip": {
        "alpha": 0.9,
        "z_thresh": 2.25,
        "warmup_steps": 5,
        "clip_option": "mean",
        "max_grad_norm": 3.0,
        "eps": 1e-7,
    },
    "warmup_steps": 2,
    "spike_at": 10,
    "spike_scale": 5.0,
    "diag_every": 3,
    "device": "cpu",
    "dtype": "float32",
    "max_wall_s": 600,
    "save_adapters": False,
}
CASES = {
    "every-field": EVERY_FIELD,
    "defaults": {},
    "seeds": {"model": "tiny-random", "seeds": "1,2", "seed": 9, "steps": 5, "arms": "lora,lora+crma,lora"},
}


def _differs_from_default(cfg: AblationConfig) -> set[str]:
    default = config_to_values(AblationConfig())
    return {key for key, value in config_to_values(cfg).items() if value != default[key]}


def test_every_field_case_covers_every_setting():
    cfg = form.config_from_form(EVERY_FIELD)
    assert _differs_from_default(cfg) == set(config_to_values(cfg)) - {"seeds"}


def _parse_cli(command: str) -> AblationConfig:
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "crma", "ablate"]
    return config_from_args(build_parser().parse_args(argv[3:]))


@pytest.mark.parametrize("case", CASES)
def test_cli_command_parses_back_to_the_same_config(case):
    cfg = form.config_from_form(CASES[case])
    command = snippets.cli_command(cfg, out="/tmp/my runs/out")
    assert "--out '/tmp/my runs/out'" in command  # quoted for the shell
    parsed = _parse_cli(command)
    assert parsed.seed_list == cfg.seed_list
    # With several seeds, `seed` is unused and left out of the line.
    assert parsed == (replace(cfg, seed=AblationConfig().seed) if cfg.seeds else cfg)


def test_cli_command_names_an_upload_by_its_file_name(tmp_path):
    data = tmp_path / "server" / "tmp123" / "my data.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = form.config_from_form({"dataset": "upload", "rows": 1}, upload=str(data))
    command = snippets.cli_command(cfg)
    assert str(data.parent) not in command and "--dataset 'my data.jsonl'" in command
    assert _parse_cli(command) == replace(cfg, dataset="my data.jsonl")


class FakeJob:
    def __init__(self, outputs):
        self.outputs = outputs

    def __iter__(self):
        return iter(self.outputs)


def _fake_gradio_client(calls: list[dict]) -> types.ModuleType:
    """A stand-in `gradio_client` module: `Client(src).submit(...)` records its arguments and streams fake events."""
    module = types.ModuleType("gradio_client")

    class Client:
        def __init__(self, src, **kwargs):
            self.src = src

        def submit(self, *args, api_name=None, **kwargs):
            calls.append({"src": self.src, "args": args, "api_name": api_name, "kwargs": kwargs})
            return FakeJob(
                [
                    ({"type": "started", "run_id": "r" * 32}, None),
                    ({"type": "record", "arm": "lora", "step": 1, "loss": 2.5}, None),
                    ({"type": "result", "status": "finished"}, "/tmp/crma-rrrrrrrr.zip"),
                ]
            )

    module.Client = Client
    module.handle_file = lambda path: {"handled": path}
    return module


def _run_snippet(code: str, monkeypatch) -> dict:
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "gradio_client", _fake_gradio_client(calls))
    exec(compile(code, "client_snippet", "exec"), {"__name__": "__snippet__"})
    (call,) = calls
    return call


@pytest.mark.parametrize("case", CASES)
def test_client_snippet_runs_and_sends_the_same_config(case, monkeypatch, capsys):
    cfg = form.config_from_form(CASES[case])
    code = snippets.client_snippet(cfg, "me/crma-lab")
    call = _run_snippet(code, monkeypatch)
    assert call["src"] == "me/crma-lab" and call["api_name"] == "/ablate" and not call["kwargs"]
    settings, data_file = call["args"]
    assert data_file is None
    json.dumps(settings, allow_nan=False)  # what gradio_client sends: the settings must be plain JSON
    assert settings == snippets.api_payload(cfg)
    assert {"model", "steps"} <= set(settings) and "max_wall_s" not in settings  # the Space sets its own cap
    sent = form.config_from_form(settings)
    carried = {k for k in config_to_values(cfg) if k != "max_wall_s" and not (k == "seed" and cfg.seeds)}
    got, want = config_to_values(sent), config_to_values(cfg)
    assert {k: got[k] for k in carried} == {k: want[k] for k in carried}
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "started None None None",
        "record lora 1 2.5",
        "result None None None",
        "finished /tmp/crma-rrrrrrrr.zip",
    ]


def test_client_snippet_sends_an_upload_as_a_file(tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = form.config_from_form({"model": "tiny-random", "dataset": "upload", "rows": 1, "steps": 3}, upload=str(data))
    code = snippets.client_snippet(cfg, None)
    assert str(tmp_path) not in code
    call = _run_snippet(code, monkeypatch)
    assert call["src"] == "http://127.0.0.1:7860"
    settings, data_file = call["args"]
    assert settings["dataset"] == "upload" and data_file == {"handled": "my_data.jsonl"}
    # The visitor's own copy of the file stands in for the upload.
    assert form.config_from_form(settings, upload=str(data)) == cfg


def test_api_payload_nests_crma_and_zclip():
    cfg = form.config_from_form({"model": "tiny-random", "crma.rank": 2, "zclip.z_thresh": 3})
    assert snippets.api_payload(cfg) == {
        "model": "tiny-random",
        "steps": 40,
        "crma": {"rank": 2},
        "zclip": {"z_thresh": 3.0},
    }


def test_embed_snippet():
    snippet = snippets.embed_snippet("Some_User/CRMA.Lab")
    assert '<iframe src="https://some-user-crma-lab.hf.space"' in snippet
    assert '<gradio-app src="https://some-user-crma-lab.hf.space"></gradio-app>' in snippet
    assert "gradio.js" in snippet and "YOUR-NAME" not in snippet
    placeholder = snippets.embed_snippet(None)
    assert "YOUR-NAME" in placeholder and "<iframe" in placeholder and "<gradio-app" in placeholder
    # Whenever the snippet holds the placeholder, its comment says to replace it (and only then).
    for space_id in (None, "", "no-slash"):
        text = snippets.embed_snippet(space_id)
        assert "YOUR-NAME/crma-lab" in text and "replace YOUR-NAME/crma-lab with the Space id" in text
    assert "replace YOUR-NAME" not in snippet


def _record(loss: float) -> StepRecord:
    return StepRecord(
        arm="lora",
        seed=42,
        step=3,
        loss=loss,
        grad_norm_pre=math.inf,
        grad_norm_post=1.0,
        clipped=True,
        lr=2e-4,
        tokens=300,
        step_time_s=0.5,
        memory_mb=100.0,
        diverged=True,
        crma={"entropy": math.nan},
    )


def test_event_json_is_strict_json(tmp_path):
    event = snippets.event_json(_record(math.nan), run_id="r")
    assert event["type"] == "record" and event["run_id"] == "r" and event["diverged"] is True
    assert event["loss"] is None and event["grad_norm_pre"] is None and event["crma"] == {"entropy": None}
    json.dumps(event, allow_nan=False)
    held_out = EvalRecord(arm="lora", seed=1, step=3, split="test", loss=math.inf, tokens=9, eval_s=0.2)
    assert snippets.event_json(held_out, run_id="r") == {
        "type": "eval",
        "run_id": "r",
        **held_out.to_dict(),
        "loss": None,
    }
    cfg = AblationConfig(model="tiny-random")
    stored = StoredRun(
        tmp_path, cfg, [_record(1.0)], [], {"status": "stopped", "x": math.inf, "notes": ["no browser"], "wall_s": 3.5}
    )
    (tmp_path / "summary.json").write_text("{}")
    result = snippets.result_json(stored, run_id="r")
    json.dumps(result, allow_nan=False)
    assert result["type"] == "result" and result["status"] == "stopped" and result["records"] == 1
    assert result["summary"]["x"] is None and result["files"] == ["summary.json"] and result["wall_s"] == 3.5
    assert result["notes"] == ["no browser"]
    assert snippets.event_json(Phase("loading", seed=1), run_id="r") == {
        "type": "phase",
        "run_id": "r",
        "message": "loading",
        "seed": 1,
    }


def test_snippets_never_name_a_server_path(tmp_path):
    data = tmp_path / "secret-folder" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = form.config_from_form({"dataset": "upload", "rows": 1}, upload=str(data))
    for text in (snippets.cli_command(cfg), snippets.client_snippet(cfg, None), json.dumps(snippets.api_payload(cfg))):
        assert "secret-folder" not in text and str(Path(tmp_path)) not in text


@pytest.mark.parametrize(
    ("headers", "url"),
    [
        ({"host": "127.0.0.1:7861"}, "http://127.0.0.1:7861"),
        ({"Host": "lab.example.org", "X-Forwarded-Proto": "https"}, "https://lab.example.org"),
        ({"host": "inner:7860", "x-forwarded-host": "me-lab.hf.space, proxy", "x-forwarded-proto": "https"},
         "https://me-lab.hf.space"),
        ({"host": "evil\nInjected: 1"}, None),
        ({}, None),
    ],
)  # fmt: skip
def test_the_client_snippet_points_at_the_address_the_visitor_used(headers, url):
    assert snippets.app_url(headers) == url
    cfg = AblationConfig(model="tiny-random")
    code = snippets.client_snippet(cfg, None, url=snippets.app_url(headers))
    assert f"Client({(url or 'http://127.0.0.1:7860')!r})" in code
    assert "Client('me/lab')" in snippets.client_snippet(cfg, "me/lab", url=url)  # a Space id wins

"""The Gradio Space: the page builds, and the running app serves `/ablate`, `/stop`, `/push` and `/preview` through
gradio_client (one server for the module, on 127.0.0.1 and a free port); the UI handlers are also driven directly
through `crma.ui.layout.build_page()`.

Runs train in this process here (`crma.ui.space.GPU_CALL` is `launcher.visitor_run`, called as the ZeroGPU path calls
its worker), so stand-ins patched below apply; the child process of the app's default has its own tests
(test_lab_launcher.py). No test here checks the PNG charts (the run folder's tests do), so the module replaces the PNG
export with one that fails as it does without a browser: no Chromium starts, and the run says why its PNGs are
missing."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from crma.ablation.spec.arms import ARM_SPECS, GRID_ARMS

# Byte tokenizer: long prompts. Two held-out rows keep evaluation in every run at little cost.
TINY = {"model": "tiny-random", "dataset": "bundled", "rows": 8, "seq_len": 512, "eval_rows": 2}
TIMEOUT_S = 150
NO_PNG_NOTE = "PNG charts not written: no browser"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    from crma.ablation.report import render

    def no_browser(*args, **kwargs):
        raise RuntimeError("no browser")

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("runs")
    mp.setenv("CRMA_RUNS_DIR", str(root))
    mp.setattr(render, "write_png_charts", no_browser)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def in_process(runs_dir):
    """Runs train in this process, where the stand-ins apply (the handlers look the call up in `crma.ui.space`)."""
    from crma.lab import launcher
    from crma.ui import space

    mp = pytest.MonkeyPatch()
    mp.setattr(space, "GPU_CALL", launcher.visitor_run)
    yield
    mp.undo()


def _plot(update: dict, page, key: str):
    """The figure a run handler's update sets on the chart `key` (None when it leaves that chart alone)."""
    value = update.get(page.charts.plots[key])
    return value.get("value") if isinstance(value, dict) else value


@pytest.fixture(scope="module")
def page(in_process):
    from crma.ui.layout import build_page

    return build_page()


@pytest.fixture(scope="module")
def client(in_process, request, tmp_path_factory):
    from gradio_client import Client

    from crma.ui.layout import build_demo

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_demo()
    _, url, _ = demo.queue(default_concurrency_limit=1, max_size=20).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    request.addfinalizer(demo.close)
    return Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _wait_for(job, predicate, timeout: float = TIMEOUT_S):
    """The first output of `job` that satisfies `predicate`; each output is taken as it arrives (the job's own
    iterator), and a run that streams on past `timeout` fails the test."""
    deadline = time.monotonic() + timeout
    for output in job:
        if predicate(output):
            return output
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no matching output within {timeout} s; got {len(job.outputs())} outputs")


# --------------------------------------------------------------------------------------------------------------------
# The page


def test_build_demo_builds_without_launching(in_process):
    import gradio as gr

    from crma.ui.layout import build_demo

    demo = build_demo()
    assert isinstance(demo, gr.Blocks)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    from crma.ablation.report.charts import CHART_KEYS

    for key in CHART_KEYS:
        assert isinstance(by_id[f"plot-{key}"], gr.Plot)
    assert isinstance(by_id["run-btn"], gr.Button) and isinstance(by_id["stop-btn"], gr.Button)
    endpoints = demo.get_api_info()["named_endpoints"]
    assert {"/ablate", "/follow", "/stop", "/push", "/preview"} <= set(endpoints)
    assert [p["parameter_name"] for p in endpoints["/ablate"]["parameters"]] == ["config", "data_file"]
    assert [p["parameter_name"] for p in endpoints["/follow"]["parameters"]] == ["run_id"]
    assert [p["parameter_name"] for p in endpoints["/push"]["parameters"]] == ["repo_id", "private"]  # token injected
    assert [p["parameter_name"] for p in endpoints["/preview"]["parameters"]] == ["dataset", "upload", "start", "rows"]
    # Defaults on this CPU machine: the CPU setting, and the page says so.
    note = by_id["default-note"].value
    assert "No GPU" in note
    arms = [b for b in demo.blocks.values() if isinstance(b, gr.CheckboxGroup)][0]
    assert arms.value == list(GRID_ARMS) and [c[1] for c in arms.choices] == list(ARM_SPECS)
    # The GPU queue: one run at a time, UI and API share it; stop never waits behind it.
    deps = {d.api_name: d for d in demo.fns.values()}
    assert deps["ablate"].concurrency_id == deps["run"].concurrency_id == "gpu"
    assert deps["ablate"].concurrency_limit == deps["run"].concurrency_limit == 1
    assert deps["stop"].concurrency_id != "gpu" and deps["stop"].concurrency_limit is None


def test_app_py_is_the_spaces_entry_point(in_process):
    """On a Space gradio imports app.py and serves its `demo`; `python app.py` launches it with `LAUNCH_OPTIONS`."""
    import gradio as gr

    import app
    from crma.ui import space

    assert isinstance(app.demo, gr.Blocks) and app.LAUNCH_OPTIONS is space.LAUNCH_OPTIONS


def test_page_sections_and_form_wiring(page):
    import gradio as gr

    from crma.ablation.spec.schema import label
    from crma.ui.page import Page
    from crma.ui.sections import Charts, Results
    from crma.ui.settings import FORM_KEYS, Form

    assert isinstance(page, Page) and isinstance(page.demo, gr.Blocks)
    assert isinstance(page.form, Form) and isinstance(page.charts, Charts)
    assert isinstance(page.results, Results)
    settings = page.form.settings()
    assert len(settings) == len(FORM_KEYS) == len(set(map(id, settings)))
    # Each setting reaches the run handler from the box that carries its label (a swapped pair would not).
    for key, component in zip(FORM_KEYS, settings, strict=True):
        expected = "Tune the LR per arm" if key == "tune_lr" else label(key)  # the one control that sets two fields
        assert component.label.startswith(expected), (key, component.label)
    assert page.charts.progress in page.run_outputs() and page.results.repro in page.run_outputs()


# --------------------------------------------------------------------------------------------------------------------
# /ablate through gradio_client


def test_ablate_streams_every_arm_and_the_summary(client):
    job = client.submit({**TINY, "steps": 2, "arms": list(ARM_SPECS)}, None, api_name="/ablate")
    job.result(timeout=TIMEOUT_S)
    events = [event for event, _ in job.outputs()]
    assert events[0]["type"] == "started" and events[0]["config"]["arms"] == list(ARM_SPECS)
    assert events[0]["config"]["crma"]["rank"] == 4  # the started event carries the nested config
    records = [e for e in events if e["type"] == "record"]
    assert {(e["arm"], e["step"]) for e in records} == {(arm, s) for arm in ARM_SPECS for s in (1, 2)}
    heldout = [e for e in events if e["type"] == "eval"]
    assert {(e["arm"], e["step"], e["split"]) for e in heldout} == {(a, s, "test") for a in ARM_SPECS for s in (0, 2)}
    assert any(e["type"] == "phase" and e["message"].startswith("seed 42") for e in events)
    assert all(e["run_id"] == events[0]["run_id"] for e in events[1:])
    final, archive = job.outputs()[-1]
    assert final["type"] == "result" and final["status"] == "finished" and final["error"] is None
    assert final["records"] == len(records) == 2 * len(ARM_SPECS)
    assert set(final["summary"]["arms"]) == set(ARM_SPECS)
    assert final["summary"]["receipt"]["lora_init_equal"] is True
    assert NO_PNG_NOTE in final["notes"]  # the run says why its archive has no PNGs
    required = {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "summary.md",
        "report.html",
        "adapters/lora/adapter_model.safetensors",
        "adapters/lora+crma/crma.safetensors",
    }
    assert required <= set(final["files"])
    with zipfile.ZipFile(archive) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
    assert names == set(final["files"])  # the archive holds every file the run wrote


def test_stop_ends_the_run_with_partial_results(client):
    job = client.submit({**TINY, "steps": 1000}, None, api_name="/ablate")
    started, _ = _wait_for(job, lambda out: out[0]["type"] == "started")
    assert started["config"]["arms"] == list(GRID_ARMS)
    _wait_for(job, lambda out: out[0]["type"] == "record")
    message = client.predict(started["run_id"], api_name="/stop")
    assert message.startswith("stopping run")
    final, archive = _wait_for(job, lambda out: out[0]["type"] == "result")
    assert final["status"] == "stopped" and final["error"] == "stopped by request"
    assert 1 <= final["records"] < len(GRID_ARMS) * 1000  # partial, but kept
    assert {"metrics.jsonl", "summary.json", "adapters/lora/adapter_model.safetensors"} <= set(final["files"])
    assert Path(archive).is_file()
    assert "no running run" in client.predict(started["run_id"], api_name="/stop")  # it has ended
    # The stream can be picked up again by the run's id: the same records, then the same result.
    again = client.submit(started["run_id"], api_name="/follow")
    again.result(timeout=TIMEOUT_S)
    replay = [event for event, _ in again.outputs()]
    assert [e for e in replay if e["type"] == "record"] == [e for e, _ in job.outputs() if e["type"] == "record"]
    assert replay[-1]["type"] == "result" and replay[-1]["status"] == "stopped"


def test_an_api_run_trains_on_when_its_client_goes_away(client):
    """A run never depends on who follows it: a client that leaves (as a closed page does) leaves the run training
    until it ends, holding the one run slot; `/follow` picks it up, `/stop` ends it."""
    from crma.lab import launcher

    job = client.submit({**TINY, "steps": 4, "arms": ["lora"]}, None, api_name="/ablate")
    started, _ = _wait_for(job, lambda out: out[0]["type"] == "started")
    job.cancel()  # the client goes away mid-run
    again = client.submit(started["run_id"], api_name="/follow")
    again.result(timeout=TIMEOUT_S)
    final = again.outputs()[-1][0]
    assert final["status"] == "finished" and final["records"] == 4  # every step, though nobody watched
    assert launcher.RUN_SLOT.acquire(timeout=TIMEOUT_S)  # the run ended and gave the slot back
    launcher.RUN_SLOT.release()


@pytest.mark.parametrize(
    ("config", "upload", "message"),
    [
        ({"model": "no-such-model", "steps": 2}, None, "model 'no-such-model' cannot be used here"),
        ({"lr": "fast"}, None, "LR must be a number; got 'fast'"),
        ({"steps": 100000}, None, "Steps must be at most 1000 on this Space"),
        ({"batch_size": 0}, None, "Batch size must be an integer ≥ 1; got 0"),
        ({"crma": {"rank": 65}}, None, "CRMA rank must be at most 64 on this Space"),
        ({"start": 390, "rows": 20}, None, "do not fit"),
        ({"dataset": "/etc/passwd"}, None, "Data must be one of"),
        ({"dataset": "upload", "rows": 1}, ("notes.txt", "instruction: hi\n"), "unsupported data file extension"),
        ({"dataset": "upload", "rows": 1}, ("table.csv", "instruction,input\nhi,\n"), "missing column(s) ['output']"),
        ({"dataset": "upload", "rows": 5}, ("three.jsonl", '{"instruction": "a", "output": "b"}\n' * 3), "do not fit"),
        ({"rows": 1}, ("rows.jsonl", '{"instruction": "a", "output": "b"}\n'), "set `dataset` to 'upload'"),
        ({"optimizer": "sgd"}, None, "unknown setting 'optimizer'"),
        ({"batch_size": 32, "seq_len": 2048}, None, "at most 16384 tokens per step on this Space"),
        ({"lora_init": "pissa_niter_1000000000"}, None, "with N in 1..32"),
        ({"model": "tests"}, None, "model 'tests' cannot be used here"),  # a folder of the app's directory
    ],
)
def test_bad_input_returns_its_message(client, tmp_path, config, upload, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    data = None
    if upload is not None:
        path = tmp_path / upload[0]
        path.write_text(upload[1])
        data = handle_file(str(path))
    with pytest.raises(AppError) as info:
        client.predict({**TINY, **config}, data, api_name="/ablate")
    assert message in str(info.value)
    assert str(tmp_path) not in str(info.value)  # names the file, not the server's folders


def test_push_without_sign_in_says_so(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Sign in with Hugging Face first"):
        client.predict("someone/crma-results", True, api_name="/push")


def test_preview_endpoint_and_the_app_keeps_serving(client):
    table, message = client.predict("bundled", None, 4, 10, api_name="/preview")
    assert [row[0] for row in table["data"]] == [str(i) for i in range(4, 14)]
    assert "reads fine" in message
    table, message = client.predict("bundled", None, 0, 1000, api_name="/preview")
    assert table["data"] in ([], [[]], None) or not any(any(cell for cell in row) for row in table["data"])
    assert message.startswith("⚠️") and "do not fit" in message


# --------------------------------------------------------------------------------------------------------------------
# The UI handlers, driven directly (the same code the buttons call)


def _form(**overrides):
    from crma.ui.settings import FORM_KEYS

    values = {
        "model": "tiny-random",
        "dataset": "bundled",
        "start": 0,
        "rows": 8,
        "arms": ["lora", "lora+crma"],
        "seeds": "42",
        "steps": 3,
        "tune_lr": False,
        "eval_rows": 2,
        "lr": "2e-4",
        "structural_lr": "5e-3",
        "gate_lr": "1e-3",
        "batch_size": 2,
        "seq_len": 512,
        "lora_r": 8,
        "lora_targets": "q_proj,v_proj",
        "crma.n_streams": 3,
        "crma.rank": 4,
        "spike_at": 0,
    }
    assert set(values) == set(FORM_KEYS)
    values.update(overrides)
    return [values[key] for key in FORM_KEYS]


def test_run_ui_streams_charts_and_stop_keeps_partial_results(page, runs_dir):
    import gradio as gr
    import plotly.graph_objects as go

    from crma.lab import runs

    charts, results, form = page.charts, page.results, page.form
    run = page.run(None, 0.6, False, None, *_form(steps=500))
    first = next(run)
    run_id = first[page.run_state]
    assert (Path(runs_dir) / run_id).is_dir()
    assert first[form.stop_btn]["interactive"] is True and first[form.run_btn]["interactive"] is False
    assert "python -m crma ablate" in first[results.repro] and "--steps 500" in first[results.repro]
    assert "client.submit(settings" in first[results.repro]
    update = None
    for update in run:
        if isinstance(_plot(update, page, "loss"), go.Figure) and "Step " in update[charts.progress]:
            break
    assert update is not None and isinstance(_plot(update, page, "loss_delta"), go.Figure)
    assert {t.name for t in _plot(update, page, "loss").data} >= {"lora"}
    assert "/500" in update[charts.progress] and "tokens/s" in update[charts.progress]
    # Another visitor's stop (another run id) does nothing to this run.
    folder = runs.get_run(run_id)
    assert page.stop_button("0" * 32)["interactive"] is False and not folder.stop_file.exists()
    assert page.stop_button(run_id)["interactive"] is False and folder.stop_file.exists()
    *_, final = run
    assert "Stopped at step" in final[charts.progress]
    assert final[results.panel]["visible"] is True
    assert final[form.stop_btn]["interactive"] is False and final[form.run_btn]["interactive"] is True
    assert "Final training loss" in final[results.summary] and "Held-out loss (final)" in final[results.summary]
    assert "Same LoRA init" in final[results.receipt]
    assert "Status: **stopped** (stopped by request)" in final[results.notes]
    assert NO_PNG_NOTE in final[results.notes]
    assert isinstance(_plot(final, page, "mixing"), go.Figure)
    assert final[charts.plots["lr_sensitivity"]]["visible"] is False  # a run that tuned nothing has no LR chart
    archive = Path(final[results.archive])
    assert archive.is_file() and archive.parent == Path(runs_dir) / run_id
    assert final[results.report].endswith("report.html")
    assert "<iframe" in final[results.embed]
    # The smoothing slider and log-scale toggle redraw from the stored records, without a re-run.
    redrawn = page.rerender(run_id, 0.0, True)
    assert _plot(redrawn, page, "grad_norm").layout.yaxis.type == "log" and len(_plot(redrawn, page, "loss").data) >= 2
    assert page.rerender(None, 0.5, False) == {} and gr is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": "abc"}, "LR must be a number; got 'abc'"),
        ({"seeds": "1,2,3,4,5,6"}, "Seeds must be at most 5 on this Space; got 6 of them"),
        ({"steps": 0}, "Steps must be an integer ≥ 1; got 0"),
        ({"crma.rank": 0}, "CRMA rank must be a positive integer; got 0"),
        ({"dataset": "upload"}, "no file was uploaded"),
    ],
)
def test_run_ui_bad_input_is_a_gradio_error(page, overrides, message):
    import gradio as gr

    from crma.ui.errors import guard

    handler = guard(page.run)  # as the Run button calls it
    with pytest.raises(gr.Error) as info:
        next(handler(None, 0.6, False, None, *_form(**overrides)))
    assert message in str(info.value)


def test_preview_handler_shows_the_problem_instead_of_failing(in_process, tmp_path):
    from crma.ui.api import preview

    table, message = preview("bundled", None, 390, 20)
    assert table == [] and "do not fit" in message
    table, message = preview("upload", None, 0, 5)
    assert table == [] and "no file was uploaded" in message
    table, message = preview("bundled", None, 0, "many")
    assert table == [] and "Rows must be a whole number" in message
    table, message = preview("bundled", None, 0, 3)
    assert len(table) == 3 and "reads fine" in message


def test_push_handler_failures_say_why_and_keep_the_results(in_process, runs_dir, monkeypatch):
    import gradio as gr

    from crma.lab import runs
    from crma.ui.api import push

    token = gr.OAuthToken(token="hf_visitorsecret123", scope="write-repos manage-repos", expires_at=2**31)
    with pytest.raises(gr.Error, match="Sign in with Hugging Face first"):
        push(None, "someone/crma-results", True, None)
    with pytest.raises(gr.Error, match="no finished results to push"):
        push(None, "someone/crma-results", True, token)
    folder = runs.new_run()
    folder.out_dir.mkdir()
    for name in ("config.json", "summary.json"):
        (folder.out_dir / name).write_text("{}")
    archive = runs.make_archive(folder.out_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub cannot be reached here: the push must fail, and say so
    with pytest.raises(gr.Error) as info:
        push(folder.run_id, "someone/crma-results", True, token)
    message = str(info.value)
    assert "offline" in message.lower() and "still available to download" in message
    assert token.token not in message
    assert archive.is_file() and folder.finished()  # nothing was removed


def _out_of_memory_at(monkeypatch, step: int) -> None:
    """The real engine, running out of memory at `step` (as a CUDA OOM would); the second arm diverges at step 2."""
    import crma
    from crma.ablation.engine.arm_set import ArmSet

    original = ArmSet.train_step

    def train_step(self, arm, batch):
        if batch.step == step:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if arm.label == "lora+crma" and batch.step == 2:
            with torch.no_grad():
                crma.get_adapter(self.model, arm.adapter).crma_B.fill_(float("nan"))
        return original(self, arm, batch)

    monkeypatch.setattr(ArmSet, "train_step", train_step)


def test_run_ui_failure_after_some_steps_keeps_the_partial_results(page, monkeypatch):
    _out_of_memory_at(monkeypatch, step=3)
    with pytest.warns(UserWarning) as warned:  # gr.Warning outside a request is a Python warning
        *_, final = page.run(None, 0.6, False, None, *_form())
    messages = " ".join(str(w.message) for w in warned)
    assert "lora+crma diverged at step 2" in messages and "The run failed: out of memory" in messages
    charts, results = page.charts, page.results
    assert "Failed at step 2/3: out of memory" in final[charts.progress]
    assert "lora+crma diverged at step 2" in final[charts.progress]
    assert final[results.panel]["visible"] is True and "Final training loss" in final[results.summary]
    assert "**failed** (out of memory" in final[results.notes]
    assert Path(final[results.archive]).is_file()


def test_run_ui_failure_before_any_step_is_a_gradio_error(page, monkeypatch):
    import gradio as gr

    _out_of_memory_at(monkeypatch, step=1)
    updates = []
    with pytest.raises(gr.Error, match="out of memory"):
        for update in page.run(None, 0.6, False, None, *_form()):
            updates.append(update)
    assert "Failed at step 0/3" in updates[-1][page.charts.progress]
    assert updates[-1][page.form.run_btn]["interactive"] is True
    assert page.results.panel not in updates[-1]  # no results to show


def test_receipt_markdown_of_the_results_panel():
    from crma.ablation.report.render import receipt_markdown

    summary = {
        "receipt": {
            "seed": 42,
            "lora_init_sha256": {"lora": "a" * 64, "lora+crma": "a" * 64},
            "lora_init_equal": True,
            "batch_order_sha256": "b" * 64,
            "batches_seen_equal": True,
            "differs_only_in_adapter": True,
            "config_diff": {
                "crma": {"lora": False, "lora+crma": True},
                "clipper": {"lora": "clip_grad_norm(1.0)", "lora+crma": "zclip"},
            },
        }
    }
    text = receipt_markdown(summary)
    assert "| 42 | ✅ yes | ✅ yes | ✅ yes |" in text
    assert "| crma | False | True |" in text and "| clipper | clip_grad_norm(1.0) | zclip |" in text
    assert "No fairness receipt" in receipt_markdown({})


# --------------------------------------------------------------------------------------------------------------------
# The page's layout


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    """A toy study as `python -m crma study --toy` writes it (charts stood in by a PNG: only the files are read)."""
    import shutil

    from crma.ablation.output.study import StudyProtocol, run_study

    root = tmp_path_factory.mktemp("study")
    run_study(StudyProtocol.toy(), root / "study", work_dir=root / "work", charts=False)
    for name in ("plain_loss.png", "spike_grad_norm.png"):
        shutil.copyfile(Path(__file__).resolve().parents[1] / "assets" / "screenshot.png", root / "study" / name)
    return root / "study"


def _blocks_in_order(page):
    return list(page.demo.blocks.values())


def test_layout_run_first_help_texts_and_the_author_recipe(page):
    import gradio as gr

    from crma.ablation.spec.arms import AUTHOR_ARMS
    from crma.lab.page_assets import PAGE_JS

    f, c = page.form, page.charts
    order = [b._id for b in _blocks_in_order(page)]
    # Run and Stop come before every setting, so the first screen shows them.
    assert order.index(f.run_btn._id) < order.index(f.model._id) < order.index(f.arms._id)
    # The model box shows short names ("name: description" no longer than one line of it).
    assert all(len(label) <= 40 for label, _ in f.model.choices), f.model.choices
    assert "lora-matched" in f.arms.info and "lora-matched" in [value for _, value in f.arms.choices]
    assert "lora+crma-nomix" in f.arms.info and "lora+crma-nomix" in [value for _, value in f.arms.choices]
    assert f.presets["recipe"].value == "Author's recipe: two changes at once"
    # One control tunes the LR per arm, and says what it costs; the held-out slice is on by default.
    assert "Tune the LR per arm" in f.tune_lr.label and "3×" in f.tune_lr.label and f.tune_lr.value is False
    assert f.eval_rows.value > 0
    js = {d.js for d in page.demo.fns.values() if d.js}
    assert f"() => [{json.dumps(list(AUTHOR_ARMS))}]" in js
    assert PAGE_JS in js  # the page script (clocks, zoom kept) runs on load
    for component in (f.structural_lr, f.gate_lr, f.crma_streams, f.crma_rank, f.spike_at):
        assert component.info, component.label
    markdown = [b.value for b in _blocks_in_order(page) if isinstance(b, gr.Markdown) and isinstance(b.value, str)]
    assert any("[How CRMA works](#method)" in text and "σ₂" in text and "Composite gain" in text for text in markdown)
    method = next(b for b in _blocks_in_order(page) if getattr(b, "elem_id", None) == "method")
    for term in ("Structural LR", "gate LR", "CRMA streams", "CRMA rank", "σ₂", "‖M − I‖_F", "composite gain"):
        assert term in method.value, term
    # The attribution box sits in the charts column, hidden until a run ends; the run handler can fill it.
    assert isinstance(c.attribution, gr.Markdown) and c.attribution.visible is False
    assert c.attribution in page.run_outputs()
    assert all(plot.show_label is False for plot in c.plots.values())  # the figure's own title names it


def test_attribution_box_text():
    from crma.ui.sections import attribution_update

    two = {"arms": {"lora": {}, "lora+crma": {}}, "attribution": {"available": False, "reason": "needs the grid"}}
    update = attribution_update(two)
    assert update["visible"] is True and "two things at once" in update["value"] and "(#study)" in update["value"]
    assert attribution_update({"arms": {"lora": {}}, "attribution": {}})["visible"] is False


def test_study_panel_without_a_study(in_process, tmp_path):
    from crma.ui.layout import build_page

    page = build_page(study_dir=tmp_path / "no-study")
    assert page.study.text.value.startswith("**No published study yet.**")
    assert "python -m crma study" in page.study.text.value
    assert page.study.charts.visible is False


def test_study_panel_shows_the_committed_study(in_process, toy_study, monkeypatch):
    from crma.ui.layout import build_page

    study = json.loads((toy_study / "summary.json").read_text())
    monkeypatch.setenv("CRMA_STUDY_DIR", str(toy_study))  # the variable the Space reads, as the parameter would
    page = build_page()
    text = page.study.text.value
    assert "**2 seeds** (1, 2), **4 steps**" in text and "corrupted batch at step 3" in text
    assert "#### Plain training" in text and "#### With a spike at step 3" in text
    # Each condition's attribution, with its intervals, straight from summary.json: held-out, at each arm's best LR.
    best = study["conditions"]["plain"]["attribution"]["sets"]["best_lr"]["contrasts"]["sinkhorn"]
    assert best["metrics"]["final_test_loss"]["sentence"] in text and "95 % CI over 2 seeds" in text
    assert "Primary outcome: the final held-out (test) loss" in text and "own best LR" in text
    assert "validation rows 16–21; **the answer is the held-out loss on test rows 22–27**" in text  # toy protocol
    assert "LRs tuned: the answer is each arm at its own best LR" in text
    assert "#### The author's claims, against this study" in text and "a lower peak gradient norm" in text
    captions = [item["caption"] for item in page.study.charts.value]
    assert captions == ["Plain training: loss", "With a spike: gradient norm"] and page.study.charts.visible


def test_off_zero_gpu_runs_train_in_a_child_process(monkeypatch, tmp_path):
    from crma.lab import form, launcher
    from crma.ui import slot, space

    assert space.ZERO_GPU is False and space.choose_gpu_call(False) is None  # off ZeroGPU: no GPU call
    assert callable(space.choose_gpu_call(True))  # on ZeroGPU: spaces.GPU's wrapper of launcher.visitor_run
    monkeypatch.setattr(space, "GPU_CALL", space.choose_gpu_call(space.ZERO_GPU))
    calls = []
    monkeypatch.setattr(launcher, "launch", lambda cfg, folder, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(launcher, "preflight", lambda cfg, data_name, *, zero_gpu: cfg)
    monkeypatch.setattr(launcher, "RUN_SLOT", threading.BoundedSemaphore(1))
    monkeypatch.setenv("CRMA_RUNS_DIR", str(tmp_path))
    launcher.RUN_SLOT.acquire()
    slot.start(form.config_from_form({**TINY, "steps": 1}), "mine.jsonl")
    assert calls == [{"data_name": "mine.jsonl", "gpu_call": None}]  # no GPU call: the launcher's child process


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "the config is nested too deeply"),
        ('{"seeds": "1,\\ud800"}', "Seeds must be valid text (it holds a lone surrogate character)"),
        ({"model": "\ud800"}, "Model must be valid text"),
        ({"crma": {"rank": "\udc80"}}, "CRMA rank must be valid text"),
        ({"\ud800": 1}, "unknown setting"),
    ],
)
def test_hostile_api_configs_get_one_line_errors(in_process, config, message):
    import gradio as gr

    from crma.ui.api import ablate

    with pytest.raises(gr.Error) as info:
        list(ablate(config, None))
    assert message in str(info.value) and "\n" not in str(info.value)
    str(info.value).encode("utf-8")  # no lone surrogate reaches the response


def test_uploads_are_capped_and_named_not_located(client, tmp_path):
    from gradio_client import handle_file

    from crma.ablation.data import MAX_UPLOAD_BYTES
    from crma.lab import runs
    from crma.ui.space import LAUNCH_OPTIONS

    assert LAUNCH_OPTIONS["max_file_size"] == MAX_UPLOAD_BYTES  # gradio refuses bigger files
    path = tmp_path / "my rows.jsonl"
    path.write_text("".join(f'{{"instruction": "say {i}", "output": "{i}"}}\n' for i in range(8)))
    job = client.submit({**TINY, "dataset": "upload", "steps": 1, "arms": ["lora"], "eval_rows": 0},
                        handle_file(str(path)), api_name="/ablate")  # fmt: skip
    job.result(timeout=TIMEOUT_S)
    events = [event for event, _ in job.outputs()]
    started, final = events[0], events[-1]
    assert started["config"]["dataset"] == "my rows.jsonl"  # its name, not where the server keeps it
    assert final["status"] == "finished", final["error"]
    assert final["summary"]["data"]["source"]["name"] == "my rows.jsonl"
    assert final["summary"]["data"]["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    folder = runs.get_run(started["run_id"])
    saved = (folder.out_dir / "config.json").read_text()
    assert json.loads(saved)["dataset"] == "my rows.jsonl" and str(runs.runs_root()) not in saved


def test_a_reloaded_page_follows_its_run_then_shows_the_results(page):
    from crma.lab import launcher

    first_page = page.run(None, 0.6, False, None, *_form(steps=500))
    started = next(first_page)
    run_id = started[page.run_state]
    assert started[page.browser_run] == run_id  # kept in the browser's localStorage too
    # The reload: gradio stops reading the first page's stream and leaves its generator as it is. The run goes on.
    updates = page.reattach(run_id, 0.6, False)  # the reloaded page, with the id from localStorage
    following = next(updates)
    assert following[page.run_state] == run_id and following[page.form.stop_btn]["interactive"] is True
    for update in updates:  # the charts keep coming while the run trains
        loss = _plot(update, page, "loss")
        if "Step " in update.get(page.charts.progress, "") and loss is not None and loss.data:
            break
    else:
        raise AssertionError("the run did not go on after the reload")
    assert page.stop_button(run_id)["interactive"] is False  # the reloaded page's Stop reaches the run
    *_, last = updates
    assert last[page.results.panel]["visible"] is True and "Status: **stopped**" in last[page.results.notes]
    assert Path(last[page.results.archive]).is_file() and "Final training loss" in last[page.results.summary]
    assert launcher.RUN_SLOT.acquire(timeout=TIMEOUT_S)  # the ended run gave the slot back
    launcher.RUN_SLOT.release()
    first_page.close()
    # A page opened after the run ended shows its results at once; an unknown or malformed id shows nothing.
    (again,) = list(page.reattach(run_id, 0.6, False))
    assert again[page.results.panel]["visible"] is True and "Status: **stopped**" in again[page.results.notes]
    assert list(page.reattach("0" * 32, 0.6, False)) == [{page.run_state: None}]
    assert list(page.reattach("../etc", 0.6, False)) == [{page.run_state: None}]


def test_a_waiting_run_can_leave_the_queue(page):
    deps = page.demo.config["dependencies"]
    ids = {id(block): key for key, block in page.demo.blocks.items()}
    run_click = next(
        i for i, d in enumerate(deps) if d.get("api_name") == "run" and ids[id(page.form.run_btn)] in
        [t[0] for t in d["targets"]]
    )  # fmt: skip
    cancel = [d for d in deps if [ids[id(page.form.cancel_btn)], "click"] in [list(t) for t in d["targets"]]]
    assert any(run_click in d["cancels"] for d in cancel)  # gradio adds the cancel as a listener of its own
    assert page.form.cancel_btn.visible is False  # shown only while a run waits


def test_a_run_waits_for_the_slot_of_a_run_whose_page_went_away(page, monkeypatch):
    from crma.lab import launcher
    from crma.ui.slot import WAITING_FOR_SLOT

    _out_of_memory_at(monkeypatch, step=3)
    slot = launcher.RUN_SLOT
    assert slot.acquire(blocking=False)  # an earlier run, whose page was closed, still trains
    try:
        left = page.run(None, 0.6, False, None, *_form())
        assert next(left)[page.charts.progress] == WAITING_FOR_SLOT
        left.close()  # this page went away too while it waited: nothing starts for nobody
        waiting = page.run(None, 0.6, False, None, *_form())
        assert next(waiting)[page.charts.progress] == WAITING_FOR_SLOT
    finally:
        slot.release()  # the earlier run ended
    started = next(waiting)
    assert started[page.form.stop_btn]["interactive"] is True and page.run_state in started
    with pytest.warns(UserWarning):  # the run fails after 4 records: a warning, results kept
        *_, final = waiting
    assert final[page.results.panel]["visible"] is True
    assert slot.acquire(timeout=TIMEOUT_S)  # given back, once
    slot.release()


def test_the_readmes_client_example_runs_as_written(client):
    """The README's gradio_client example, against this server, with a tiny run in place of its SmolLM2 one."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in block)
    settings = '{"model": "smollm2-135m", "rows": 200, "steps": 30, "eval_rows": 16}'
    assert code.count(settings) == 1 and code.count('Client("http://127.0.0.1:7860")') == 1
    code = code.replace(settings, repr({**TINY, "steps": 2})).replace('"http://127.0.0.1:7860"', repr(client.src))
    printed: list[tuple] = []
    namespace = {"print": lambda *args: printed.append(args)}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README, run as a test
    status, mean, ci95, archive = printed[-1]
    assert status == "finished" and isinstance(mean, float) and ci95 is None  # one seed: no interval
    assert Path(archive).is_file() and namespace["answer"]["done"] is True
    assert namespace["answer"]["arm"] == "lora+crma"  # the last arm to answer, after the base model and the others

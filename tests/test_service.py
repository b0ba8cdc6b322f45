"""The Space's service layer: form parsing and caps, estimates, live-view throttling, run folders, archives."""

from __future__ import annotations

import json
import math
import os
import shlex
import threading
import time
import zipfile
from pathlib import Path

import pytest

from crma.ablation import service
from crma.ablation.config import ARM_SPECS, AblationConfig, Phase, RunResult, StepRecord
from crma.ablation.data import DataError

# --------------------------------------------------------------------------------------------------------------------
# config_from_form


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": "abc"}, "`lr` must be a number"),
        ({"structural_lr": ""}, "`structural_lr` is empty"),
        ({"gate_lr": "nan"}, "`gate_lr` must be a finite number"),
        ({"lr": "-1"}, "`lr` must be a number in (0, 10)"),
        ({"steps": "ten"}, "`steps` must be a whole number"),
        ({"steps": 2.5}, "`steps` must be a whole number"),
        ({"steps": True}, "`steps` must be a whole number"),
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({"steps": 1001}, "`steps` must be at most 1000 on this Space"),
        ({"rows": 5001}, "`rows` must be at most 5000"),
        ({"seq_len": 4096}, "`seq_len` must be at most 2048"),
        ({"batch_size": 33}, "`batch_size` must be at most 32"),
        ({"batch_size": -2}, "`batch_size` must be a positive integer"),
        ({"start": -1}, "`start` must be an integer >= 0"),
        ({"seeds": "1,2,3,4,5,6"}, "`seeds` must be at most 5"),
        ({"seeds": "1,x"}, "`seeds` must be whole numbers"),
        ({"seeds": "3,3"}, "`seeds` lists a seed twice"),
        ({"seeds": "-4"}, "`seeds` values must be in [0, 2^32)"),
        ({"arms": []}, "`arms` is empty"),
        ({"arms": ["lora", "dora"]}, "`arms` must be a non-empty list drawn from"),
        ({"arms": ["lora"] * 5}, "`arms` must be at most 4"),
        ({"model": "  "}, "`model` is empty"),
        ({"model": "/etc/models"}, "`model` must be a preset or a Hub id"),
        ({"model": "org/../secret"}, "`model` must be a preset or a Hub id"),
        ({"dataset": "/etc/passwd"}, "`dataset` must be one of"),
        ({"dataset": "upload"}, "no file was uploaded"),
        ({"lora_targets": ""}, "`lora_targets` is empty"),
        ({"lora_targets": "q_proj; rm"}, "`lora_targets` must be module names"),
        ({"lora_r": 512}, "`lora_r` must be at most 256"),
        ({"crma_streams": 1}, "`crma_streams` must be an integer >= 2"),
        ({"spike_at": 50, "steps": 10}, "`spike_at` must be None or a step in [1, steps]"),
        ({"spike_at": "soon"}, "`spike_at` must be a whole number"),
        ({"save_adapters": "maybe"}, "`save_adapters` must be true or false"),
        ({"learning_rate": 1e-4}, "unknown config field(s) ['learning_rate']"),
    ],
)
def test_config_from_form_names_the_bad_field(fields, message):
    with pytest.raises(ValueError) as info:
        service.config_from_form(**fields)
    assert message in str(info.value)


def test_config_from_form_parses_ui_values():
    cfg = service.config_from_form(
        model=" tiny-random ",
        dataset="bundled",
        start=3.0,
        rows="16",
        arms=["lora", "lora+crma"],
        seeds="7",
        steps=12.0,
        lr="2e-4",
        structural_lr=0.005,
        gate_lr="1e-3",
        batch_size=4.0,
        seq_len="256",
        lora_r=8,
        lora_targets="q_proj, v_proj",
        crma_streams=3.0,
        crma_rank="4",
        spike_at=0,
    )
    assert (cfg.model, cfg.start, cfg.rows, cfg.steps) == ("tiny-random", 3, 16, 12)
    assert (cfg.batch_size, cfg.seq_len, cfg.crma_streams, cfg.crma_rank) == (4, 256, 3, 4)
    assert cfg.lr == pytest.approx(2e-4) and cfg.gate_lr == pytest.approx(1e-3)
    assert cfg.seed == 7 and cfg.seeds is None and cfg.seed_list == [7]
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.spike_at is None  # 0 in the number box means "off"
    assert cfg.max_wall_s == service.SPACE_CAPS["max_wall_s"]  # the wall-time cap is filled in


def test_config_from_form_several_seeds_and_upload(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = service.config_from_form(seeds="1, 2,3", dataset="upload", upload=str(data), spike_at="5", steps=10)
    assert cfg.seeds == [1, 2, 3] and cfg.seed_list == [1, 2, 3]
    assert cfg.dataset == str(data) and cfg.spike_at == 5
    # An upload without a dataset choice (the API's data_file) means "use the upload".
    assert service.config_from_form(upload=str(data)).dataset == str(data)


def test_caps_come_from_one_dict_and_can_be_lifted():
    for name in ("steps", "rows", "seq_len", "batch_size"):
        over = int(service.SPACE_CAPS[name]) + 1
        with pytest.raises(ValueError, match=f"`{name}` must be at most"):
            service.config_from_form(**{name: over})
        assert getattr(service.config_from_form(caps=None, **{name: over}), name) == over
    assert service.config_from_form(caps=None).max_wall_s is None
    with pytest.raises(TypeError):
        service.SPACE_CAPS["steps"] = 10**6  # read-only: a handler cannot loosen the caps for everyone


def test_cli_command_round_trips_through_the_cli():
    from crma.ablation.cli import build_parser, config_from_args

    cfg = service.config_from_form(
        model="tiny-random",
        seeds="1,2",
        steps=5,
        lr="3e-4",
        arms=list(ARM_SPECS),
        lora_targets="q_proj,k_proj",
        spike_at=3,
        rows=8,
        seq_len=512,
    )
    command = service.cli_command(cfg, out="/tmp/out")
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "crma", "ablate"]
    assert config_from_args(build_parser().parse_args(argv[3:])) == cfg


# --------------------------------------------------------------------------------------------------------------------
# Defaults and estimates


def test_default_config_cpu_and_gpu():
    cpu, cpu_note = service.default_config(False)
    gpu, gpu_note = service.default_config(True)
    assert (cpu.model, cpu.rows, cpu.seed, cpu.dataset) == ("smollm2-135m", 200, 42, "bundled")
    assert cpu.steps <= 40 and cpu.batch_size == 2 and cpu.seq_len == 128
    assert (gpu.model, gpu.rows, gpu.seed, gpu.steps, gpu.batch_size, gpu.seq_len) == (
        "tinyllama-1.1b",
        200,
        42,
        100,
        4,
        256,
    )
    assert cpu.arms == gpu.arms == ["lora", "lora+crma"]
    assert "No GPU" in cpu_note and "CPU" in cpu_note and "author" in cpu_note
    assert "GPU found" in gpu_note and "author" in gpu_note
    for cfg in (cpu, gpu):
        service.check_caps(cfg)
    assert service.estimate_run_seconds(cpu, gpu=False) < 5 * 60  # "finishes in a few minutes"


def test_estimate_gpu_seconds_is_monotone_and_clamped():
    low, high = service.GPU_SECONDS_RANGE
    base = dict(model="tinyllama-1.1b", caps=None)
    by_steps = [service.estimate_gpu_seconds(service.config_from_form(steps=s, **base)) for s in (50, 100, 200, 400)]
    assert by_steps == sorted(by_steps) and by_steps[0] < by_steps[-1]
    two, four = (
        service.estimate_gpu_seconds(service.config_from_form(steps=200, arms=a, **base))
        for a in (["lora", "lora+crma"], list(ARM_SPECS))
    )
    assert four > two
    one, three = (
        service.estimate_gpu_seconds(service.config_from_form(steps=100, seeds=s, **base)) for s in ("1", "1,2,3")
    )
    assert three > one
    small, large = (
        service.estimate_gpu_seconds(service.config_from_form(model=m, steps=300, caps=None))
        for m in ("smollm2-135m", "org/Some-Model-7B")
    )
    assert large > small
    assert service.estimate_gpu_seconds(service.config_from_form(model="tiny-random", steps=1)) == low
    biggest = service.config_from_form(model="mistral-7b", steps=1000, seeds="1,2,3,4,5", arms=list(ARM_SPECS))
    assert service.estimate_gpu_seconds(biggest) == high
    capped = service.fit_wall_cap(biggest, service.estimate_gpu_seconds(biggest))
    assert capped.max_wall_s < high  # the run stops (and saves) before ZeroGPU's lease runs out


# --------------------------------------------------------------------------------------------------------------------
# LiveView


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _record(
    arm: str, step: int, *, seed: int = 42, loss: float = 2.0, diverged: bool = False, tokens_per_step: int = 100
) -> StepRecord:
    return StepRecord(
        arm=arm,
        seed=seed,
        step=step,
        loss=loss,
        grad_norm_pre=1.0 + 0.01 * step,
        grad_norm_post=1.0,
        clipped=step % 7 == 0,
        lr=2e-4,
        tokens=tokens_per_step * step,
        step_time_s=0.5,
        memory_mb=1536.0,
        diverged=diverged,
    )


def _result(cfg: AblationConfig, records: list[StepRecord], status: str = "finished", error: str | None = None):
    return RunResult(status=status, error=error, config=cfg, records=records, summary={}, wall_s=12.0)


def test_liveview_throttles_redraws_and_always_draws_phases_and_the_end():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=10, arms=["lora", "lora+crma"])
    view = service.LiveView(cfg, clock=clock, min_interval_s=0.35)
    assert view.update(Phase("loading model tiny-random")) is True
    clock.now += 0.01
    assert view.update(_record("lora", 1)) is True  # first step: draw at once
    draws = []
    for (step, arm), wait in zip([(1, "lora+crma"), (2, "lora"), (2, "lora+crma")], (0.1, 0.1, 0.2), strict=True):
        clock.now += wait
        draws.append(view.update(_record(arm, step)))
    assert draws == [False, False, True]  # 0.1 and 0.2 s after the last draw: no; 0.4 s: yes
    clock.now += 0.05
    assert view.update(Phase("seed 42: saving adapters")) is True
    assert view.update(_result(cfg, view.records)) is True  # the end is always drawn, even right after a draw


def test_liveview_redraw_rate_is_bounded_on_a_long_fast_run():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=1000, arms=list(ARM_SPECS))
    view = service.LiveView(cfg, clock=clock, min_interval_s=0.35)
    started = time.perf_counter()
    for step in range(1, 1001):
        for arm in ARM_SPECS:
            clock.now += 0.005  # 20 ms per lockstep step: 20 s of run
            view.update(_record(arm, step))
    elapsed = time.perf_counter() - started
    assert len(view.records) == 4000 and view.done == 1000
    assert view.redraws <= 20 / 0.35 + 2  # at most ~3 per second
    assert elapsed < 1.0  # O(1) per event: 4,000 events in well under a second
    assert view.tokens == 4 * 100 * 1000 and math.isclose(view.compute_s, 4000 * 0.5)


def test_liveview_backs_off_when_drawing_is_slow():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=50, arms=["lora", "lora+crma"])
    view = service.LiveView(cfg, clock=clock, min_interval_s=0.35)
    view.update(_record("lora", 1))

    class SlowClock(FakeClock):  # each reading advances 0.5 s: figures() measures a 0.5 s drawing cost
        def __call__(self) -> float:
            self.now += 0.5
            return self.now

    slow = SlowClock()
    view.clock = slow
    view.figures()
    view.clock = clock
    clock.now = slow.now
    view._last_draw = clock.now
    clock.now += 1.0
    assert view.update(_record("lora+crma", 1)) is False  # 1 s < 3 x 0.5 s drawing cost
    clock.now += 0.6
    assert view.update(_record("lora", 2)) is True


def test_liveview_progress_text_and_figures():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=10, arms=["lora+crma", "lora"])  # baseline arm yields second
    view = service.LiveView(cfg, clock=clock, device="CPU (2 cores)")
    assert "waiting" in view.progress_text()
    view.update(_record("lora+crma", 1))
    loss, grad, delta = view.figures()  # no baseline record yet: the delta chart is empty, not an error
    assert {t.name for t in loss.data} >= {"lora+crma"}
    assert not [t for t in delta.data if t.name == "lora+crma"]
    for step in range(1, 5):
        clock.now += 1.0
        if step > 1:
            view.update(_record("lora+crma", step))
        view.update(_record("lora", step, loss=2.5))
    text = view.progress_text()
    assert "Step 4/10" in text and "elapsed 0:04" in text and "ETA 0:08" in text and "CPU (2 cores)" in text
    assert "RSS 1.50 GiB" in text and "200 tokens/s" in text
    assert view.fraction() == pytest.approx(0.4)
    loss, grad, delta = view.figures(smoothing=0.0, log_scale=True)
    assert {t.name for t in loss.data} >= {"lora", "lora+crma"}
    assert grad.layout.yaxis.type == "log"
    assert [t.name for t in delta.data if t.name == "lora+crma"]
    view.update(_record("lora+crma", 5, loss=float("nan"), diverged=True))
    assert "lora+crma diverged at step 5" in view.progress_text() and "other arms continue" in view.progress_text()
    assert 'role="progressbar"' in view.progress_html()
    view.update(_result(cfg, view.records, status="stopped", error="stopped by request"))
    assert view.progress_text().startswith("Stopped at step 5/10")
    view.update(_result(cfg, view.records, status="failed", error="out of memory: <lower batch_size>"))
    assert "Failed at step 5/10: out of memory" in view.progress_text()
    assert "&lt;lower batch_size&gt;" in view.progress_html()  # error text is escaped in the HTML


def test_liveview_multi_seed_progress_counts_all_seeds():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=5, seeds=[1, 2], arms=["lora", "lora+crma"])
    view = service.LiveView(cfg, clock=clock)
    for seed in (1, 2):
        for step in range(1, 6 if seed == 1 else 3):
            for arm in ("lora", "lora+crma"):
                clock.now += 0.5
                view.update(_record(arm, step, seed=seed))
    assert view.done == 7 and view.total_steps == 10
    assert "Step 7/10 · seed 2 (2/2)" in view.progress_text()
    loss, _, _ = view.figures()  # live: the current seed only
    assert "seed 2" in (loss.layout.title.text or "")


def test_view_registry_is_bounded_and_rebuilds_from_files(tmp_path):
    registry = service.ViewRegistry(max_views=2)
    cfg = AblationConfig(model="tiny-random", steps=3)
    views = [service.LiveView(cfg) for _ in range(3)]
    for i, view in enumerate(views):
        registry.add(f"{i:032x}", view)
    assert registry.get(f"{0:032x}") is None and registry.get(f"{2:032x}") is views[2]
    space = service.new_run(tmp_path)
    space.out_dir.mkdir()
    (space.out_dir / "config.json").write_text(cfg.to_json())
    (space.out_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(_record(arm, s).to_dict()) + "\n" for s in (1, 2) for arm in ("lora", "lora+crma"))
    )
    rebuilt = registry.view_for(space.run_id, tmp_path)
    assert rebuilt is not None and len(rebuilt.records) == 4
    assert registry.view_for("../../etc", tmp_path) is None


# --------------------------------------------------------------------------------------------------------------------
# Data preview


def test_preview_rows_bundled():
    rows = service.preview_rows("bundled", 2, 30, limit=5)
    assert len(rows) == 5 and [r[0] for r in rows] == ["2", "3", "4", "5", "6"]
    assert all(len(r) == 4 and r[1] and r[3] for r in rows)
    with pytest.raises(DataError, match="do not fit"):
        service.preview_rows("bundled", 390, 50)
    with pytest.raises(DataError, match="past the end"):
        service.preview_rows("bundled", 10**6, 1)
    with pytest.raises(ValueError, match="`rows` must be a whole number"):
        service.preview_rows("bundled", 0, "lots")
    with pytest.raises(ValueError, match="`rows` must be at most 5000"):
        service.preview_rows("bundled", 0, 10**6)


def test_preview_rows_uploads_name_the_file_not_the_server_folder(tmp_path):
    csv_file = tmp_path / "nested" / "no_output.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("instruction,input\nhello,\n")
    with pytest.raises(DataError) as info:
        service.preview_rows(str(csv_file), 0, 1)
    assert "missing column(s) ['output']" in str(info.value) and str(tmp_path) not in str(info.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="unsupported data file extension '.txt'"):
        service.preview_rows(str(text), 0, 1)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "x" * 1000, "output": "y"}) + "\n")
    (row,) = service.preview_rows(str(long), 0, 1)
    assert len(row[1]) == service.PREVIEW_CELL_CHARS and row[1].endswith("…")


def test_check_data_fails_fast_on_a_bad_slice():
    service.check_data(service.config_from_form(dataset="bundled", start=0, rows=8))
    with pytest.raises(DataError, match="do not fit"):
        service.check_data(service.config_from_form(dataset="bundled", start=390, rows=20))


# --------------------------------------------------------------------------------------------------------------------
# Run folders, stop signal, archive


def test_run_folders_are_private_per_run(tmp_path):
    a, b = service.new_run(tmp_path), service.new_run(tmp_path)
    assert a.run_id != b.run_id and len(a.run_id) == 32 and int(a.run_id, 16) >= 0
    assert a.root.parent == b.root.parent == tmp_path and a.root.is_dir() and b.root.is_dir()
    assert a.out_dir.parent == a.root and a.archive.parent == a.root
    assert service.get_run(a.run_id, tmp_path) == a
    for bad in ("../" + a.run_id, a.run_id.upper(), "", None, 42, "0" * 32):
        assert service.get_run(bad, tmp_path) is None


def test_stop_signal_crosses_processes_through_the_file(tmp_path):
    space = service.new_run(tmp_path)
    engine_side = service.StopSignal(space.stop_file)  # what the (possibly forked) engine holds
    assert isinstance(engine_side, threading.Event) and not engine_side.is_set()
    assert service.request_stop(space.run_id, tmp_path) is True
    assert engine_side.is_set()  # set by another object: as in a forked ZeroGPU worker
    assert service.request_stop("f" * 32, tmp_path) is False
    space.out_dir.mkdir()
    (space.out_dir / "summary.json").write_text("{}")
    assert space.finished() and service.request_stop(space.run_id, tmp_path) is False


def test_cleanup_removes_old_and_surplus_runs(tmp_path):
    spaces = [service.new_run(tmp_path) for _ in range(5)]
    now = time.time()
    for i, space in enumerate(spaces):  # runs 0..4, oldest first; run 0 is a day old
        (space.root / "f.txt").write_text("x")
        stamp = now - 86400 if i == 0 else now - 100 * (5 - i)
        for path in (space.root / "f.txt", space.root):
            os.utime(path, (stamp, stamp))
    removed = service.cleanup_runs(tmp_path, max_age_s=3600, max_runs=3, keep=(spaces[1].run_id,), now=now)
    assert set(removed) == {spaces[0].run_id, spaces[2].run_id}
    assert [s.root.is_dir() for s in spaces] == [False, True, False, True, True]
    (tmp_path / "not-a-run").mkdir()
    service.cleanup_runs(tmp_path, max_age_s=0, max_runs=0, now=now + 10)
    assert (tmp_path / "not-a-run").is_dir()  # only run folders are ever removed


def test_new_run_keeps_disk_bounded(tmp_path):
    for _ in range(4):
        service.new_run(tmp_path, max_runs=3)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_make_archive_holds_everything(tmp_path):
    out = tmp_path / "crma-1234abcd"
    files = [
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "summary.md",
        "report.html",
        "loss.png",
        "grad_norm.png",
        "loss_delta.png",
        "adapters/lora/adapter_model.safetensors",
        "adapters/lora+crma/adapter_config.json",
        "adapters/lora+crma/crma.safetensors",
    ]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(name.encode() * 3)
    archive = service.make_archive(out)
    assert archive == tmp_path / "crma-1234abcd.zip" and not list(tmp_path.glob("*.part"))
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(f"crma-1234abcd/{name}" for name in files)
        content = zf.read("crma-1234abcd/adapters/lora+crma/crma.safetensors")
    assert content == b"adapters/lora+crma/crma.safetensors" * 3
    with pytest.raises(FileNotFoundError):
        service.make_archive(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------------
# Snippets and API events


def test_embed_snippet():
    snippet = service.embed_snippet("Some_User/CRMA.Lab")
    assert '<iframe src="https://some-user-crma-lab.hf.space"' in snippet
    assert '<gradio-app src="https://some-user-crma-lab.hf.space"></gradio-app>' in snippet
    assert "gradio.js" in snippet
    placeholder = service.embed_snippet(None)
    assert "YOUR-NAME" in placeholder and "<iframe" in placeholder and "<gradio-app" in placeholder


def test_event_json_is_strict_json():
    record = _record("lora", 3, loss=float("nan"), diverged=True)
    event = service.event_json(record, run_id="r")
    assert event["type"] == "record" and event["loss"] is None and event["diverged"] is True
    json.dumps(event, allow_nan=False)
    cfg = AblationConfig(model="tiny-random")
    result = service.event_json(
        RunResult("stopped", "stopped by request", cfg, [record], {"x": math.inf}, files=["summary.json"]), run_id="r"
    )
    assert result["type"] == "result" and result["status"] == "stopped" and result["records"] == 1
    assert result["summary"] == {"x": None} and result["files"] == ["summary.json"]
    assert service.event_json(Phase("loading"), run_id="r") == {
        "type": "phase",
        "run_id": "r",
        "message": "loading",
        "seed": None,
    }


def test_receipt_markdown():
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
    text = service.receipt_markdown(summary)
    assert "| 42 | ✅ yes | ✅ yes | ✅ yes |" in text
    assert "| crma | False | True |" in text and "| clipper | clip_grad_norm(1.0) | zclip |" in text
    assert "No fairness receipt" in service.receipt_markdown({})


def test_client_snippet_is_python():
    cfg = service.config_from_form(model="tiny-random", steps=3)
    code = service.client_snippet(cfg, "me/crma-lab")
    compile(code, "snippet", "exec")
    assert 'api_name="/ablate"' in code and "'me/crma-lab'" in code and '"steps": 3' in code


def test_runs_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(service.RUNS_ENV, str(tmp_path / "runs"))
    assert service.runs_root() == Path(tmp_path / "runs")
    assert service.new_run().root.parent == tmp_path / "runs"

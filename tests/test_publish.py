"""`crma.ablation.output.publish`: push a run folder through the real `huggingface_hub` client to a local Hub stand-in.

The folder holds the files a run writes: config and metrics from the records module, a PEFT LoRA adapter saved by peft
and the CRMA files saved by `crma.save`, so the pushed bytes are loaded back the way the model card says. An `HF_TOKEN`
decoy is set throughout: a request carrying anything but the visitor's token fails a test."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import struct
import threading
import zlib
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from conftest import make_tiny_llama
from hub_standin import HubStandIn, TokenInfo
from huggingface_hub import ModelCard

import crma
from crma.ablation.engine.records import StepRecord, write_metrics_csv, write_metrics_jsonl
from crma.ablation.jsonio import write_json
from crma.ablation.models import PRESETS
from crma.ablation.output.publish import PushError, hub_model_id, model_card, push_results
from crma.ablation.report.charts import CHARTS
from crma.ablation.report.render import md_table
from crma.ablation.spec.config import AblationConfig

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
PRESET_HUB_IDS = {name: preset.hub_id for name, preset in PRESETS.items()}
SUMMARY_MD = "## lora vs lora+crma on smollm2-135m\n\nthe run's own document\n"
BATCH_ORDER = "ab12cd" + "0" * 58
ARMS = ["lora", "lora+crma"]
ARM_FIGURES = {
    "lora": {"arm": "lora", "seed": 7, "final_loss": 2.311, "final_test_loss": 2.4012, "diverged": False},
    "lora+crma": {"arm": "lora+crma", "seed": 7, "final_loss": 2.287, "final_test_loss": 2.3771, "diverged": False},
}
CHART_FILES = [chart.key for chart in CHARTS][:3]  # a run without the CRMA mixing or LR charts: those PNGs are absent


def _png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([255, 0, 0] * width) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _trained_model(seed: int, *, with_crma: bool):
    """A tiny LoRA (+ CRMA) model whose adapters are not a no-op (B and the CRMA up-projection moved off zero)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    if with_crma:
        crma.attach(model, crma.CRMAConfig(n_streams=3, rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _record(arm: str, step: int) -> StepRecord:
    return StepRecord(arm, 7, step, 2.5 - 0.1 * step, 1.2, 1.0, False, 2e-4, 64 * step, 0.01, 100.0)


def make_out_dir(root: Path, models: dict, *, preset: str = "smollm2-135m", dataset: str = "alpaca") -> Path:
    """A run folder as the writer and the engine leave it: config, metrics, summaries, report, PNG charts, a peft
    LoRA adapter per arm and `crma.save`'s files beside the CRMA arm's."""
    out = root / "out"
    out.mkdir()
    cfg = AblationConfig(model=preset, dataset=dataset, rows=16, steps=3, seed=7, arms=list(ARMS))
    (out / "config.json").write_text(cfg.to_json())
    records = [_record(arm, s) for s in (1, 2, 3) for arm in ARMS]
    write_metrics_jsonl(records, out / "metrics.jsonl")
    write_metrics_csv(records, out / "metrics.csv")
    write_json(out / "progress.json", {"status": "finished", "arms": {arm: {"step": 3} for arm in ARMS}})
    write_json(
        out / "summary.json",
        {
            "baseline": "lora",
            "arms": ARM_FIGURES,
            "receipt": {
                "seed": 7,
                "lora_init_sha256": {arm: "f" * 64 for arm in ARMS},
                "lora_init_equal": True,
                "batch_order_sha256": BATCH_ORDER,
                "batches_seen_equal": True,
                "differs_only_in_adapter": True,
                "config_diff": {"crma": {"lora": False, "lora+crma": True}},
            },
        },
    )
    (out / "summary.md").write_text(SUMMARY_MD)
    (out / "report.html").write_text("<!doctype html><html><body><h1>report</h1></body></html>")
    for i, key in enumerate(CHART_FILES):
        (out / f"{key}.png").write_bytes(_png(2 + i, 2))
    for arm in ARMS:
        staging = root / f"peft-{arm}"
        models[arm].save_pretrained(staging, save_embedding_layers=False)
        shutil.move(str(staging), out / "adapters" / arm)
    crma.save(models["lora+crma"], out / "adapters" / "lora+crma")
    return out


@pytest.fixture(scope="module")
def models() -> dict:
    return {"lora": _trained_model(1, with_crma=False), "lora+crma": _trained_model(2, with_crma=True)}


@pytest.fixture(scope="module")
def template(models, tmp_path_factory) -> Path:
    return make_out_dir(tmp_path_factory.mktemp("run"), models)


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
def out_dir(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "out"))


def test_push_uploads_every_file_byte_identical_in_one_commit(hub, out_dir):
    before = local_files(out_dir)
    url = push_results(out_dir, "alice/crma-ablation", token=VISITOR, endpoint=hub.url)
    assert local_files(out_dir) == before  # the card is staged elsewhere: the run folder stays as the run left it

    assert url == f"{hub.url}/alice/crma-ablation"
    repo = hub.repos["alice/crma-ablation"]
    assert repo.private is True
    assert len(repo.commits) == 1 and repo.commits[0]["summary"] == "CRMA ablation: lora, lora+crma (3 steps)"
    expected = local_files(out_dir)
    assert set(repo.files) == set(expected) | {"README.md"}
    cards = {rel for rel in expected if rel.endswith("README.md")}  # peft's adapter cards give way to ours
    assert cards == {"adapters/lora/README.md", "adapters/lora+crma/README.md"}
    for rel, data in expected.items():
        if rel not in cards:
            assert repo.files[rel] == data, rel
    for rel in cards:
        arm = rel.split("/")[1]
        assert repo.files[rel].decode().startswith(f"# {arm}\n"), rel
        assert "[the repo's card](../../README.md)" in repo.files[rel].decode()
    # The binary files took the LFS path (batch -> presigned PUT -> verify), not inline base64.
    lfs_paths = [rel for rel in expected if rel.endswith((".png", ".safetensors"))]
    assert len(lfs_paths) == 6  # 3 charts, 2 LoRA adapters, 1 crma.safetensors
    assert "adapters/lora+crma/crma.safetensors" in lfs_paths and "adapters/lora+crma/crma_config.json" in expected
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
    # The summary table is render.md_table's, the headline (held-out here) first and said to be held-out.
    table = md_table(["figure", *ARMS], [["**final_test_loss**", "2.401", "2.377"], ["final_loss", "2.311", "2.287"]])
    assert table in readme
    assert "Headline figure: **the final held-out (test) loss** (`final_test_loss`), a held-out figure" in readme
    assert "a training figure" not in readme and "| seed |" not in readme and "diverged |" not in readme
    # The charts present, by their registry title; the absent ones are not linked.
    for chart in CHARTS:
        assert (f"![{chart.title}]({chart.key}.png)" in readme) == (chart.key in CHART_FILES), chart.key
    # Every file of the run folder is listed, and nothing it does not hold.
    for rel in ("config.json", "progress.json", "metrics.jsonl", "metrics.csv", "summary.json", "summary.md"):
        assert f"| `{rel}` | " in readme, rel
    assert "| `report.html` | " in readme and "| `adapters/lora/` | PEFT LoRA adapter |" in readme
    assert "| `adapters/lora+crma/` | PEFT LoRA adapter + CRMA side channel" in readme
    assert "mixing.png" not in readme and "lr_sensitivity.png" not in readme
    assert 'PeftModel.from_pretrained(base, "alice/crma-ablation", subfolder="adapters/lora+crma")' in readme
    assert 'PeftModel.from_pretrained(base, "alice/crma-ablation", subfolder="adapters/lora")' in readme
    assert readme.count("crma.load(model, ") == 1  # only the arm that carries CRMA files
    assert "ab12cd" in readme and "Same LoRA init" in readme  # the fairness receipt
    # The client validated this exact card before uploading (upload_folder checks it early, create_commit again).
    assert hub.validated_yaml and set(hub.validated_yaml) == {readme}


def test_pushed_adapters_load_as_the_card_says(hub, out_dir, models, tmp_path):
    from peft import PeftModel

    push_results(out_dir, "alice/crma-ablation", token=VISITOR, endpoint=hub.url)
    local = tmp_path / "snapshot"  # what `snapshot_download` would give: the pushed bytes
    for rel, data in hub.repos["alice/crma-ablation"].files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = make_tiny_llama()(ids).logits
        for arm in ARMS:
            # The card's lines: PeftModel.from_pretrained(base, ..., subfolder=arm), then crma.load for CRMA arms.
            model = PeftModel.from_pretrained(make_tiny_llama(), local / "adapters" / arm).eval()
            if arm == "lora+crma":
                crma.load(model, local / "adapters" / arm)
            logits = model(ids).logits
            torch.testing.assert_close(logits, models[arm](ids).logits)
            assert not torch.allclose(logits, base_logits, atol=1e-4)  # the adapters really change the output


def test_model_card_maps_presets_and_omits_non_hub_sources(tmp_path, models):
    out = make_out_dir(tmp_path, models, preset="tiny-random", dataset="bundled")
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
        assert ModelCard(text).data.base_model == hub_id == hub_model_id(preset)
    assert hub_model_id("org/some-model") == "org/some-model"
    assert hub_model_id("/srv/models/mine") is None and hub_model_id(None) is None  # never a path in metadata


def test_second_push_reuses_the_repo_and_adds_a_commit(hub, out_dir):
    push_results(out_dir, "lab-org/runs", token=VISITOR, endpoint=hub.url, private=False)
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["arms"]["lora+zclip"] = {"final_loss": 2.30, "final_test_loss": 2.39}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(SUMMARY_MD + "lora+zclip\n")
    url = push_results(out_dir, "lab-org/runs", token=VISITOR, endpoint=hub.url, commit_message="rerun")

    repo = hub.repos["lab-org/runs"]
    assert url == f"{hub.url}/lab-org/runs" and repo.private is False
    assert [c["summary"] for c in repo.commits][1] == "rerun" and len(repo.commits) == 2
    assert b"lora+zclip" in repo.files["summary.md"]
    assert "| **final_test_loss** | 2.401 | 2.377 | 2.39 |" in repo.files["README.md"].decode()


def test_hidden_files_are_left_out_and_the_card_replaces_a_readme(hub, out_dir):
    (out_dir / ".lock").write_text("x")
    (out_dir / "adapters" / ".cache").mkdir()
    (out_dir / "adapters" / ".cache" / "junk").write_text("x")
    (out_dir / "README.md").write_text("an old card")
    push_results(out_dir, "alice/r", token=VISITOR, endpoint=hub.url)

    files = hub.repos["alice/r"].files
    assert not any(part.startswith(".") for rel in files for part in rel.split("/"))
    assert files["README.md"].decode().startswith("---\n") and b"an old card" not in files["README.md"]
    assert (out_dir / "README.md").read_text() == "an old card"  # the folder's own file is not touched


@pytest.mark.parametrize(
    ("attribution", "figures", "headline"),
    [
        (
            {"available": True, "primary": "final_loss_ema", "primary_kind": "training"},
            {"final_loss_ema": 2.2, "final_loss": 2.3},
            "**the final training loss (EMA)** (`final_loss_ema`), a training figure: no held-out slice",
        ),
        (None, {"final_loss": 2.3}, "**the final training loss** (`final_loss`), a training figure"),
        (
            {"available": True, "primary": "final_test_loss", "primary_kind": "held-out"},
            {"final_loss": 2.3, "final_test_loss": 2.4},
            "**the final held-out (test) loss** (`final_test_loss`), a held-out figure",
        ),
    ],
    ids=["attribution-training", "no-attribution-training", "attribution-held-out"],
)
def test_card_says_which_kind_the_headline_figure_is(out_dir, attribution, figures, headline):
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["arms"] = {arm: dict(figures) for arm in ARMS}
    if attribution is None:
        summary.pop("attribution", None)
    else:
        summary["attribution"] = {**attribution, "n_seeds": 1, "sets": {}}
    write_json(out_dir / "summary.json", summary)
    card = model_card(out_dir, repo_id="me/x", base_model="smollm2-135m", dataset="alpaca")
    assert f"Headline figure: {headline}" in card
    primary = headline.split("`")[1]
    assert f"| **{primary}** |" in card  # the headline is the table's first row
    assert all(card.index(f"| **{primary}** |") < card.index(f"| {k} |") for k in figures if k != primary)


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


@pytest.mark.parametrize(
    ("token", "repo_id"),
    [(VISITOR, "someone-else/x"), (VISITOR, "readers-org/x"), (READ_ONLY, "alice/x")],
    ids=["foreign-namespace", "read-only-org-role", "read-only-token"],
)
def test_the_hubs_403_says_where_the_token_cannot_write(hub, out_dir, token, repo_id):
    namespace = repo_id.split("/")[0]
    with pytest.raises(PushError) as err:
        push_results(out_dir, repo_id, token=token, endpoint=hub.url)
    message = str(err.value)
    assert message.startswith(f"cannot write to {repo_id}: the token has no write access there (403 Forbidden")
    assert f'namespace "{namespace}"' in message and "\n" not in message  # the Hub's own reason, on one line
    # Refused when creating the repo: nothing was prepared, uploaded or committed.
    assert [(r.method, r.path, r.status) for r in hub.requests][:2] == [
        ("GET", "/api/whoami-v2", 200),
        ("POST", "/api/repos/create", 403),
    ]
    assert not any(p in r.path for r in hub.requests for p in ("/preupload/", "/commit/", ".git/", "_lfs_storage"))
    assert not hub.repos


def test_server_403_becomes_cannot_write(hub, out_dir):
    # A fine-grained token scoped to alice's own namespace: whoami lists lab-org, the Hub still answers 403.
    with pytest.raises(PushError, match=r"cannot write to lab-org/x: .*403 Forbidden") as err:
        push_results(out_dir, "lab-org/x", token=FINE_GRAINED, endpoint=hub.url)
    assert "\n" not in str(err.value)
    assert 403 in [r.status for r in hub.requests] and not hub.repos


@pytest.mark.parametrize(
    ("fragment", "step"),
    [
        ("/api/whoami-v2", "checking the token"),
        ("/api/repos/create", "creating the repo"),
        ("/api/validate-yaml", "validating the model card"),
        ("/preupload/", "preparing the upload"),
        ("/info/lfs/objects/batch", "uploading large files (LFS)"),
        ("/commit/", "committing"),
    ],
)
def test_failed_upload_names_the_step(request, hub_env, out_dir, fragment, step):
    hub = _start(request, fail={fragment: 422})
    with pytest.raises(PushError) as err:
        push_results(out_dir, "alice/x", token=VISITOR, endpoint=hub.url)
    assert str(err.value) == f"upload failed while {step}: HTTP 422 (injected failure for {fragment})"
    assert not any(repo.files for repo in hub.repos.values())  # nothing half-committed


def test_refused_connection_is_reported(hub_env, out_dir):
    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PushError) as err:
        push_results(out_dir, "alice/x", token=VISITOR, endpoint=f"http://127.0.0.1:{port}")
    assert str(err.value).startswith(
        f"cannot reach the Hub at http://127.0.0.1:{port} while checking the token: network unreachable (ConnectError"
    )


class HangUp:
    """A listener that accepts each connection, reads the request and closes without an answer; counts them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by stop()
                return
            self.connections += 1
            with conn:
                conn.recv(65536)

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not on Linux)
        self.sock.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


def test_unreachable_hub_fails_on_the_first_request_without_retries(hub_env, out_dir, request):
    dead = HangUp()
    request.addfinalizer(dead.stop)
    with pytest.raises(PushError) as err:
        push_results(out_dir, "alice/x", token=VISITOR, endpoint=dead.url)
    message = str(err.value)
    assert message.startswith(f"cannot reach the Hub at {dead.url} while checking the token: network unreachable")
    assert VISITOR not in message
    # whoami is the first request and is not retried: one connection, and nothing after it (no upload_folder
    # retry loop).
    assert dead.connections == 1


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

"""Push a finished ablation's output folder to the Hugging Face Hub as one model repo, in one commit.

Only the token passed in is ever sent: `HfApi(token=...)` plus an explicit `token=` on every call means
`huggingface_hub` never falls back to `HF_TOKEN` or the locally saved token (on a Space, `HF_TOKEN` is
the Space owner's secret — a visitor's push must not use it). The token never appears in a log record
or an error message.

Failure modes and what a visitor reads (`PushError`, one line each):
- no token -> "not signed in ..."; a token the Hub answers 401 -> "... token was rejected ...";
- a namespace that is not theirs or a read-only token: the Hub answers 403 -> "cannot write to <repo> ...";
- a malformed repo id -> checked locally with `validate_repo_id` before any request;
- an unreachable endpoint -> "cannot reach ...". The first request is `whoami`, which `huggingface_hub` sends
  without retries, so an unreachable Hub fails at once rather than after `upload_folder`'s retries;
- anything else -> "upload failed while <step>: ...", naming the step (checking the token, creating
  the repo, validating the model card, preparing the upload, uploading large files, committing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from ..data import ALPACA_REPO
from ..report.render import receipt_markdown

logger = logging.getLogger(__name__)

CARD_TAGS = ["crma", "lora", "peft", "ablation"]
CHARTS = {"loss.png": "Training loss", "grad_norm.png": "Gradient norm", "loss_delta.png": "Loss difference"}
FILE_NOTES = {
    "config.json": "the run configuration (`AblationConfig`), enough to re-run it",
    "metrics.jsonl": "one `StepRecord` per arm and step (loss, grad norm before/after clipping, lr, time, memory)",
    "summary.json": "per-arm figures and the fairness receipt",
    "summary.md": "the results table below",
    "report.html": "a self-contained interactive report (download it and open it in a browser)",
    **{name: f"chart: {title.lower()}" for name, title in CHARTS.items()},
}


class PushError(RuntimeError):
    """A push to the Hub failed; the message is one line a visitor can act on and never contains the token."""


def hub_model_id(model: str | None) -> str | None:
    """The Hub id of a preset name or Hub id; None for config-built presets and anything that is not a repo id."""
    if model is None:
        return None
    from ..models import PRESETS

    if model in PRESETS:
        return PRESETS[model].hub_id
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None  # a local path or some other non-Hub name: leave `base_model` out rather than lie
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _summary_table(summary: dict[str, Any]) -> str:
    arms = summary.get("arms")
    if not isinstance(arms, dict) or not arms:
        return ""
    columns = sorted({k for figures in arms.values() if isinstance(figures, dict) for k in figures})
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm, figures in arms.items():
        figures = figures if isinstance(figures, dict) else {}
        lines.append(f"| {arm} | " + " | ".join(_card_cell(figures.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _load_snippet(repo_id: str, base_id: str | None, model_name: str | None, arm_dir: str, has_crma: bool) -> str:
    base_line = (
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")'
        if base_id
        else f"base = ...  # the run's base model ({model_name or 'unknown'}) is not on the Hub"
    )
    lines = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        base_line,
        f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{arm_dir}")',
    ]
    if has_crma:
        lines[1:1] = ["import crma", "from huggingface_hub import snapshot_download"]
        lines += [
            f'local = snapshot_download("{repo_id}", allow_patterns="{arm_dir}/*")',
            f'crma.load(model, f"{{local}}/{arm_dir}")  # the CRMA side channel on top of the LoRA',
        ]
    return "\n".join(lines + ["```"])


def model_card(out_dir: Path, *, repo_id: str, base_model: str | None, dataset: str | None) -> str:
    """Build the README.md (metadata + body) of a results repo from an ablation output folder.

    Args:
        out_dir (`Path`): the folder `run_ablation` wrote (config.json, summary.*, charts, adapters/).
        repo_id (`str`): the repo the card will live in (used in the loading snippets).
        base_model (`str | None`): the run's `model` (preset name or Hub id); a preset is mapped to its Hub id,
            and the base is left out of the metadata when it is not on the Hub.
        dataset (`str | None`): the run's `dataset`; listed in the metadata only when it is a Hub data set.

    Returns:
        `str`: the model card text, YAML front matter first.
    """
    out_dir = Path(out_dir)
    config = _read_json(out_dir / "config.json")
    summary = _read_json(out_dir / "summary.json")
    base_id = hub_model_id(base_model)
    dataset_id = ALPACA_REPO if dataset == "alpaca" else None  # the one Hub data set a run can name
    arm_dirs = (
        sorted(p for p in (out_dir / "adapters").glob("*") if p.is_dir()) if (out_dir / "adapters").is_dir() else []
    )
    crma_arms = {p.name for p in arm_dirs if (p / "crma_config.json").is_file()}
    arms = [str(a) for a in config.get("arms", [])] or [p.name for p in arm_dirs]

    data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        tags=list(CARD_TAGS),
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag="text-generation",
    )

    title = " vs ".join(arms) if arms else "CRMA ablation"
    body = [
        f"# CRMA ablation: {title}",
        "",
        f"Paired fine-tuning runs made with CRMA Lab on **{base_id or base_model or 'an unknown base model'}**: "
        "every arm shares the seed, the batches and the hyper-parameters; only the adapter differs.",
    ]
    run = {k: config[k] for k in ("model", "dataset", "start", "rows", "steps", "seed", "arms") if k in config}
    if run:
        body += ["", "## Run", ""] + [f"- **{k}**: `{_card_cell(v)}`" for k, v in run.items()]

    table = (
        (out_dir / "summary.md").read_text(encoding="utf-8").strip()
        if (out_dir / "summary.md").is_file()
        else _summary_table(summary)
    )
    if table:
        body += ["", "## Results", "", table]
    charts = [(name, title) for name, title in CHARTS.items() if (out_dir / name).is_file()]
    if charts:
        # Relative links: the Hub resolves them against this repo, so the images render on the model page.
        body += ["", "## Charts", ""] + [f"![{title}]({name})" for name, title in charts]
    if isinstance(summary.get("receipt"), dict) and summary["receipt"]:
        body += ["", "## Fairness receipt", "", receipt_markdown(summary)]

    body += ["", "## What this repo holds", "", "| path | contents |", "|---|---|"]
    for name, note in FILE_NOTES.items():
        if (out_dir / name).is_file():
            body.append(f"| `{name}` | {note} |")
    for arm in arm_dirs:
        note = "PEFT LoRA adapter" + (
            " + CRMA side channel (`crma_config.json`, `crma.safetensors`)" if arm.name in crma_arms else ""
        )
        body.append(f"| `adapters/{arm.name}/` | {note} |")

    if arm_dirs:
        body += ["", "## Load an arm", ""]
        for arm in arm_dirs:
            body += [
                f"**{arm.name}**",
                "",
                _load_snippet(repo_id, base_id, base_model, f"adapters/{arm.name}", arm.name in crma_arms),
                "",
            ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"))


# ---- pushing -------------------------------------------------------------------------------------------------


def _one_line(text: str, token: str, limit: int = 200) -> str:
    text = " ".join(str(text).replace(token, "***").split()) if token else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _step_of(url: str, default: str) -> str:
    # The client bundles several requests in one call (create_commit); the failing URL says which step it was.
    for fragment, step in (
        ("/validate-yaml", "validating the model card"),
        ("/preupload/", "preparing the upload"),
        ("/info/lfs/", "uploading large files (LFS)"),
        ("xet-", "uploading large files (Xet)"),
        ("/commit/", "committing"),
        ("/repos/create", "creating the repo"),
    ):
        if fragment in url:
            return step
    return default


def _as_push_error(exc: Exception, *, step: str, repo_id: str, endpoint: str, token: str) -> PushError:
    import httpx2  # the HTTP client huggingface_hub 2.x is built on

    if isinstance(exc, OfflineModeIsEnabled):
        return PushError(f"cannot reach the Hub at {endpoint} while {step}: offline mode is on (HF_HUB_OFFLINE=1)")
    if isinstance(exc, httpx2.TransportError):
        reason = _one_line(f"{type(exc).__name__}: {exc}", token, 120)
        return PushError(f"cannot reach the Hub at {endpoint} while {step}: network unreachable ({reason})")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        try:
            step = _step_of(str(exc.response.request.url), step)
        except RuntimeError:  # a response built without its request
            pass
        server = _one_line(exc.server_message or "", token, 150)
        if status == 401:
            return PushError(
                f"the Hugging Face token was rejected (401 Unauthorized) while {step}: sign in again "
                "or use a token with write access"
            )
        if status == 403:
            return PushError(
                f"cannot write to {repo_id}: the token has no write access there (403 Forbidden"
                + (f": {server})" if server else ")")
            )
        return PushError(f"upload failed while {step}: HTTP {status}" + (f" ({server})" if server else ""))
    return PushError(f"upload failed while {step}: {_one_line(f'{type(exc).__name__}: {exc}', token)}")


def _full_repo_id(repo_id: str, me: dict[str, Any]) -> str:
    """`name` alone means the signed-in user's namespace; whether the token may write there is the Hub's to say
    (its 403 becomes the push error), not a guess of ours from `whoami`."""
    namespace, _, name = repo_id.rpartition("/")
    user = me.get("name")
    return f"{user}/{name}" if not namespace and isinstance(user, str) else repo_id


def _files_to_push(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every regular file; hidden files and a README.md at the top are skipped."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == "README.md":
            continue
        files.append((rel, path))
    return files


def push_results(
    out_dir: str | Path,
    repo_id: str,
    *,
    token: str,
    private: bool = True,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create (or reuse) a model repo and upload an ablation output folder plus its model card in one commit.

    Args:
        out_dir (`str | Path`): the ablation output folder.
        repo_id (`str`): `namespace/name`, or just `name` for the token owner's namespace.
        token (`str`): the visitor's Hugging Face token (e.g. from Gradio OAuth); the only token ever sent.
        private (`bool`): create the repo private (an existing repo keeps its visibility).
        endpoint (`str | None`): Hub URL; `None` -> huggingface_hub's configured endpoint (`HF_ENDPOINT`).
        commit_message (`str | None`): defaults to a summary of the run.

    Returns:
        `str`: the repo URL.

    Raises:
        `PushError`: with a one-line message naming the failure (see the module docstring).
    """
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise PushError("the repo id is empty: use 'namespace/name'")
    repo_id = repo_id.strip()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(
            f"malformed repo id {repo_id!r}: use 'namespace/name' with letters, digits, '-', '_' "
            f"or '.' ({_one_line(exc, '', 160)})"
        ) from None
    if not isinstance(token, str) or not token.strip():
        raise PushError("not signed in: no Hugging Face token was given; sign in (or pass a write token) to push")
    token = token.strip()
    folder = Path(out_dir)
    if not folder.is_dir():
        raise PushError(f"the results folder {str(folder)!r} does not exist")
    files = _files_to_push(folder)
    if not files:
        raise PushError(f"the results folder {str(folder)!r} has no files to push")

    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint

    def call(step: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PushError:
            raise
        except Exception as exc:  # every failure of a remote step becomes a PushError naming the step
            raise _as_push_error(exc, step=step, repo_id=repo_id, endpoint=where, token=token) from exc

    me = call("checking the token", api.whoami, token=token)
    repo_id = _full_repo_id(repo_id, me)
    url = call("creating the repo", api.create_repo, repo_id, token=token, private=private, exist_ok=True)

    config = _read_json(folder / "config.json")
    card = model_card(folder, repo_id=repo_id, base_model=config.get("model"), dataset=config.get("dataset"))
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))]
    operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
    if commit_message is None:
        arms = ", ".join(str(a) for a in config.get("arms", [])) or "results"
        commit_message = f"CRMA ablation: {arms}" + (f" ({config['steps']} steps)" if "steps" in config else "")
    call("uploading the files", api.create_commit, repo_id, operations, commit_message=commit_message, token=token)
    logger.info("pushed %d files to %s", len(operations), repo_id)
    return str(url)

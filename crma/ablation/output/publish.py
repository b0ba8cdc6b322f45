"""Push a finished run folder to the Hugging Face Hub as one model repo, in one commit, with a generated model card.

`HfApi.create_repo(exist_ok=True)` then `HfApi.upload_folder` do the work. Only the token passed in is ever sent:
`HfApi(token=...)` plus an explicit `token=` on every call means `huggingface_hub` never falls back to `HF_TOKEN` or
the locally saved login (on a Space, `HF_TOKEN` is the Space owner's secret: a visitor's push must not use it). The
token never appears in a log record or an error message.

Failure modes and what a visitor reads (`PushError`, one line each):
- no token -> "not signed in ..."; a token the Hub answers 401 -> "... token was rejected ...";
- a namespace that is not theirs or a read-only token: the Hub answers 403 -> "cannot write to <repo> ...";
- a malformed repo id -> checked locally with `validate_repo_id` before any request;
- an unreachable endpoint -> "cannot reach ...". The first request is `whoami`, which `huggingface_hub` sends
  without retries, so an unreachable Hub fails at once rather than after `upload_folder`'s retries;
- offline mode (`HF_HUB_OFFLINE=1`) -> "... offline mode is on", before any request;
- anything else -> "upload failed while <step>: ...", naming the step (checking the token, creating the repo,
  validating the model card, preparing the upload, uploading large files, committing).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from ..data import ALPACA_REPO
from ..models.hub import connection_errors
from ..report.charts import CHARTS
from ..report.render import answers_blocks, attribution_markdown, md_table, receipt_markdown, to_markdown

logger = logging.getLogger(__name__)

CARD_TAGS = ["crma", "lora", "peft", "ablation"]
FILE_NOTES = {
    "config.json": "the run configuration (`AblationConfig`), enough to re-run it",
    "progress.json": "how far each arm got, and how the run ended",
    "metrics.jsonl": "one record per arm and step (loss, grad norm before/after clipping, lr, time, memory)",
    "metrics.csv": "the same records as a table",
    "summary.json": "per-arm figures, the attribution and the fairness receipt",
    "summary.md": "the full results document (tables, attribution, notes, receipt)",
    "report.html": "a self-contained interactive report (download it and open it in a browser)",
    **{f"{chart.key}.png": f"chart: {chart.title}" for chart in CHARTS},
}
# The run's headline loss, best first: held-out when a test slice was evaluated, else the (smoothed) training loss.
HEADLINES = {
    "final_test_loss": "the final held-out (test) loss",
    "final_loss_ema": "the final training loss (EMA)",
    "final_loss": "the final training loss",
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


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _results(summary: dict[str, Any]) -> list[str]:
    """What kind of figure the headline is, then a row per numeric figure (the headline first), a column per arm."""
    arms = {arm: f for arm, f in (summary.get("arms") or {}).items() if isinstance(f, dict)}
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    keys = list(dict.fromkeys(k for f in arms.values() for k, v in f.items() if is_number(v) and k != "seed"))
    if not keys:
        return []
    block = summary.get("attribution") or {}
    primary = block.get("primary") or next((k for k in HEADLINES if k in keys), keys[0])
    kind = block.get("primary_kind") or ("held-out" if primary == "final_test_loss" else "training")
    why = (
        "a held-out figure, measured on a test slice no arm trained on"
        if kind == "held-out"
        else "a training figure: no held-out slice was evaluated, so it says how well each arm fits its training "
        "batches, not how it generalises"
    )
    keys.sort(key=lambda k: k != primary)  # stable: the headline first, the rest as the summary lists them
    rows = [[f"**{k}**" if k == primary else k, *(_cell(f.get(k)) for f in arms.values())] for k in keys]
    return [
        f"Headline figure: **{HEADLINES.get(primary, primary)}** (`{primary}`), {why}.",
        md_table(["figure", *arms], rows),
        attribution_markdown(summary).strip(),
        "The full document is in `summary.md` and `report.html`.",
    ]


def _load_snippet(repo_id: str, base_id: str | None, model_name: str | None, arm_dir: str, has_crma: bool) -> str:
    lines = ["import crma", "from huggingface_hub import snapshot_download"] if has_crma else []
    lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", ""]
    lines.append(
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")'
        if base_id
        else f"base = ...  # the run's base model ({model_name or 'unknown'}) is not on the Hub"
    )
    lines.append(f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{arm_dir}")')
    if has_crma:  # crma.load reads a local folder: fetch just this arm's files
        lines.append(f'local = snapshot_download("{repo_id}", allow_patterns="{arm_dir}/*")')
        lines.append(f'crma.load(model, f"{{local}}/{arm_dir}")  # the CRMA side channel on top of the LoRA')
    return "\n".join(["```python", *lines, "```"])


def model_card(out_dir: Path, *, repo_id: str, base_model: str | None, dataset: str | None) -> str:
    """The README.md of a results repo (YAML metadata, then the body) built from a run folder.

    `base_model` (the run's preset name or Hub id) and `dataset` go into the metadata only when they are on the Hub;
    `repo_id` is the repo the card will live in (the loading snippets name it).
    """
    out_dir = Path(out_dir)
    config, summary = _read_json(out_dir / "config.json"), _read_json(out_dir / "summary.json")
    base_id = hub_model_id(base_model)
    dataset_id = ALPACA_REPO if dataset == "alpaca" else None  # the one Hub data set a run can name
    data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        tags=list(CARD_TAGS),
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag="text-generation",
    )
    arm_dirs = sorted(p for p in (out_dir / "adapters").glob("*") if p.is_dir())
    crma_arms = {p.name for p in arm_dirs if (p / "crma_config.json").is_file()}
    arms = [str(a) for a in config.get("arms", [])] or [p.name for p in arm_dirs]
    run = {k: config[k] for k in ("model", "dataset", "start", "rows", "steps", "seed", "arms") if k in config}
    results = _results(summary)
    charts = [chart for chart in CHARTS if (out_dir / f"{chart.key}.png").is_file()]
    files = [[f"`{p.name}`", FILE_NOTES.get(p.name, "")] for p in sorted(out_dir.iterdir()) if _pushed(p)]
    crma_note = "PEFT LoRA adapter + CRMA side channel (`crma_config.json`, `crma.safetensors`)"
    files += [[f"`adapters/{p.name}/`", crma_note if p.name in crma_arms else "PEFT LoRA adapter"] for p in arm_dirs]

    blocks = [
        f"# CRMA ablation: {' vs '.join(arms) or 'results'}",
        f"Paired fine-tuning runs made with CRMA Lab on **{base_id or base_model or 'an unknown base model'}**: "
        "every arm shares the seed, the batches and the hyper-parameters; only the adapter differs.",
        *(["## Run", "\n".join(f"- **{k}**: `{_cell(v)}`" for k, v in run.items())] if run else []),
        *(["## Results", *results] if results else []),
        # Relative links: the Hub resolves them against this repo, so the images render on the model page.
        *(["## Charts", *(f"![{c.title}]({c.key}.png)" for c in charts)] if charts else []),
        *(["## Fairness receipt", receipt_markdown(summary).strip()] if summary.get("receipt") else []),
        to_markdown(answers_blocks(summary)).strip() if summary.get("answers") else "",
        "## What this repo holds",
        md_table(["path", "contents"], files),
        *(["## Load an arm"] if arm_dirs else []),
    ]
    for p in arm_dirs:
        blocks += [
            f"**{p.name}**",
            _load_snippet(repo_id, base_id, base_model, f"adapters/{p.name}", p.name in crma_arms),
        ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(b for b in blocks if b) + "\n"))


def adapter_card(out_dir: Path, arm: str, *, repo_id: str, base_model: str | None) -> str:
    """The README.md of one adapter's folder: what it is, how to load it, and its own answers to the run's
    held-out rows next to the base model's."""
    summary, base_id = _read_json(Path(out_dir) / "summary.json"), hub_model_id(base_model)
    has_crma = (Path(out_dir) / "adapters" / arm / "crma_config.json").is_file()
    blocks = [
        f"# {arm}",
        f"One arm of a paired CRMA Lab ablation on **{base_id or base_model or 'an unknown base model'}**; the other "
        f"arms and the run's results are in [the repo's card](../../README.md).",
        _load_snippet(repo_id, base_id, base_model, f"adapters/{arm}", has_crma),
        to_markdown(answers_blocks(summary, arms=[arm])).strip() if summary.get("answers") else "",
    ]
    return "\n\n".join(b for b in blocks if b) + "\n"


# ---- pushing -------------------------------------------------------------------------------------------------------


def _pushed(path: Path) -> bool:
    # Hidden files are no results; a README.md of the folder is replaced by the card.
    return path.is_file() and not path.name.startswith(".") and path.name != "README.md"


def _one_line(text: Any, token: str, limit: int = 200) -> str:
    text = " ".join(str(text).replace(token, "***").split()) if token else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# One library call sends several requests (upload_folder); the failing URL says which step it was.
STEPS = {
    "/validate-yaml": "validating the model card",
    "/preupload/": "preparing the upload",
    "/info/lfs/": "uploading large files (LFS)",
    "xet-": "uploading large files (Xet)",
    "/commit/": "committing",
    "/repos/create": "creating the repo",
}


def _as_push_error(exc: Exception, *, step: str, repo_id: str, endpoint: str, token: str) -> PushError:
    where = f"cannot reach the Hub at {endpoint} while {step}"
    if isinstance(exc, OfflineModeIsEnabled):
        return PushError(f"{where}: offline mode is on (HF_HUB_OFFLINE=1)")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        try:
            url = str(exc.response.request.url)
            step = next((name for fragment, name in STEPS.items() if fragment in url), step)
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
    if isinstance(exc, connection_errors()):  # refused, timed out or hung up: no answer
        return PushError(f"{where}: network unreachable ({_one_line(f'{type(exc).__name__}: {exc}', token, 120)})")
    return PushError(f"upload failed while {step}: {_one_line(f'{type(exc).__name__}: {exc}', token)}")


def push_results(
    out_dir: str | Path,
    repo_id: str,
    *,
    token: str,
    private: bool = True,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create (or reuse) a model repo and upload a run folder plus its model card in one commit; returns the repo URL.

    Args:
        out_dir (`str | Path`): the run folder.
        repo_id (`str`): `namespace/name`, or just `name` for the token owner's namespace.
        token (`str`): the visitor's Hugging Face token (e.g. from Gradio OAuth); the only token ever sent.
        private (`bool`): create the repo private (an existing repo keeps its visibility).
        endpoint (`str | None`): Hub URL; `None` -> huggingface_hub's configured endpoint (`HF_ENDPOINT`).
        commit_message (`str | None`): defaults to a summary of the run.

    Raises:
        `PushError`: with a one-line message naming the failure (see the module docstring).
    """
    repo_id = repo_id.strip() if isinstance(repo_id, str) else ""
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
    if not any(_pushed(p) for p in folder.iterdir()):
        raise PushError(f"the results folder {str(folder)!r} has no files to push")

    api = HfApi(endpoint=endpoint, token=token)

    def call(step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, token=token, **kwargs)
        except Exception as exc:  # every failure of a remote step becomes a PushError naming the step
            raise _as_push_error(exc, step=step, repo_id=repo_id, endpoint=api.endpoint, token=token) from exc

    me = call("checking the token", api.whoami)
    if "/" not in repo_id and isinstance(me.get("name"), str):
        # `name` alone means the token owner's namespace; whether it may write there is the Hub's 403 to say.
        repo_id = f"{me['name']}/{repo_id}"
    url = call("creating the repo", api.create_repo, repo_id, private=private, exist_ok=True)

    config = _read_json(folder / "config.json")
    card = model_card(folder, repo_id=repo_id, base_model=config.get("model"), dataset=config.get("dataset"))
    if commit_message is None:
        arms = ", ".join(str(a) for a in config.get("arms", [])) or "results"
        commit_message = f"CRMA ablation: {arms}" + (f" ({config['steps']} steps)" if "steps" in config else "")
    with tempfile.TemporaryDirectory(prefix="crma-push-") as staging:
        # upload_folder takes one folder, so the card joins the run's files in a folder of links to them: one
        # commit, and the run folder (the run's interface) stays exactly as the run left it.
        stage = Path(staging) / "repo"
        shutil.copytree(folder.resolve(), stage, copy_function=os.symlink, ignore=shutil.ignore_patterns(".*"))
        (stage / "README.md").unlink(missing_ok=True)
        (stage / "README.md").write_text(card, encoding="utf-8")
        for arm_dir in sorted(p for p in (stage / "adapters").glob("*") if p.is_dir()):
            # Each adapter folder gets a card of its own (its folder of links is a real folder: the card is new).
            (arm_dir / "README.md").unlink(missing_ok=True)
            text = adapter_card(folder, arm_dir.name, repo_id=repo_id, base_model=config.get("model"))
            (arm_dir / "README.md").write_text(text, encoding="utf-8")
        call(
            "uploading the files", api.upload_folder, repo_id=repo_id, folder_path=stage, commit_message=commit_message
        )
    logger.info("pushed %s to %s", folder, repo_id)
    return str(url)

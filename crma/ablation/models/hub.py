"""The Hugging Face Hub as model loading sees it: is it reachable, the downloads, and their failures in one line.

Every Hub request of a model load is made here, by huggingface_hub with an explicit `token`; transformers then reads
the downloaded folder with `local_files_only=True`. Passing `token=` to `from_pretrained` is not enough: some of
transformers' own look-ups (the tokenizer's `list_repo_files`) drop it and fall back to this machine's login.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModelLoadError, exception_chain, first_line
from .presets import OFFLINE_PRESETS

logger = logging.getLogger(__name__)

Token = str | bool | None

# What a model load downloads: configs and tokenizer files, chat templates, and safetensors weights (one file or
# `model-XXXXX-of-XXXXX` shards). Never pickles (.bin, .pt), code (.py), GGUF or other formats' copies of the weights
# (such as Mistral's `consolidated.safetensors`).
MODEL_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "model.safetensors", "model-*-of-*.safetensors"]

_reachable: bool | None = None


@functools.cache
def hub_errors() -> tuple[type[BaseException], ...]:
    """What transformers and huggingface_hub raise for a config or weights they cannot get."""
    from huggingface_hub.errors import EntryNotFoundError

    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, EntryNotFoundError]
    for client in ("httpx2", "httpx"):  # huggingface_hub 2.x speaks httpx2, 1.x httpx
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def connection_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP client raises when the Hub does not answer (refused, timed out, hung up mid-answer): its
    `TransportError` family, whichever client huggingface_hub speaks (httpx2 for 2.x, httpx for 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def offline_flag() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) forbids Hub requests, as huggingface_hub reads it now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def hub_reachable(*, timeout_s: float = 2.0, refresh: bool = False) -> bool:
    """Whether the Hugging Face Hub can be reached: False at once under `HF_HUB_OFFLINE`, else one TCP connect.

    The connect result is cached for the process (`refresh=True` re-checks), so no load waits for huggingface_hub's
    retries against an unreachable endpoint.
    """
    global _reachable
    if offline_flag():
        return False
    if _reachable is not None and not refresh:
        return _reachable
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which `create_connection`'s timeout does not cover.
    thread = threading.Thread(target=probe, name="crma-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    _reachable = bool(result and result[0])
    if not _reachable:
        logger.info("Hugging Face Hub endpoint %s:%s is not reachable; using local files only", host, port)
    return _reachable


def offline_message(label: str) -> str:
    """One line for a model that is neither in the local cache nor downloadable now."""
    why = "HF_HUB_OFFLINE is set" if offline_flag() else "no connection to the Hub endpoint"
    return (
        f"model '{label}' is not in the local Hugging Face cache and the Hub is not reachable from this machine "
        f"({why}); use an offline preset: {', '.join(OFFLINE_PRESETS)}"
    )


def _access_hint(token: Token) -> str:
    if token is False:
        return "only public models can be loaded here (no token is sent)"
    if isinstance(token, str):
        return "the token in use has no access to it"
    return "log in with a token that has access (`hf auth login` or the HF_TOKEN environment variable)"


def map_hub_error(label: str, exc: BaseException, *, token: Token = None) -> ModelLoadError:
    """Turn a transformers / huggingface_hub failure into one line that says what to do.

    Args:
        label (`str`): the model id as the user typed it.
        exc (`BaseException`): what transformers or huggingface_hub raised.
        token (`str | bool | None`): the token rule of the request, to say the right thing about access.

    Returns:
        `ModelLoadError`: never containing a token or a path of this machine.
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    chain = exception_chain(exc)
    lower = " ".join(str(e) for e in chain).lower()
    gated = any(isinstance(e, hf_errors.GatedRepoError) for e in chain)
    # huggingface_hub's not-found text mentions "private or gated repo": its error types decide before any text.
    missing = not gated and any(
        isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError)) for e in chain
    )
    if gated or (not missing and "gated repo" in lower):
        return ModelLoadError(
            f"model '{label}' is gated: accept its licence at {constants.ENDPOINT}/{label}; {_access_hint(token)}"
        )
    if missing or "not a valid model identifier" in lower or "not a valid repository name" in lower:
        private = "" if token is False else "; private repos need a token with access"
        return ModelLoadError(f"model '{label}' was not found on the Hub (check the spelling{private})")
    if "trust_remote_code" in lower or "custom code" in lower:
        return ModelLoadError(
            f"model '{label}' needs custom code from its repository, and CRMA never executes remote code; pick a "
            "model whose architecture ships with transformers (Llama, Mistral, Qwen2, ...)"
        )
    if "does not recognize this architecture" in lower or any(isinstance(e, KeyError) for e in chain):
        return ModelLoadError(
            f"model '{label}' has an architecture this transformers version does not know; CRMA needs a decoder "
            "with `model.layers` (Llama, Mistral, Qwen2, ...)"
        )
    offline_types = (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, *connection_errors())
    if any(isinstance(e, offline_types) for e in chain) or "couldn't connect" in lower:
        return ModelLoadError(offline_message(label))
    if "invalid credentials" in lower or "invalid user token" in lower:
        return ModelLoadError(f"model '{label}': the Hub rejected the token in use; log in again with a valid token")
    if any(isinstance(e, hf_errors.EntryNotFoundError) for e in chain):
        return ModelLoadError(f"model '{label}' has no config.json on the Hub; is it a transformers model?")
    logger.info("Loading %s failed: %r", label, exc)
    return ModelLoadError(f"could not load model '{label}': {first_line(exc)}")


def check_access(repo_id: str, *, token: Token) -> None:
    """Raise huggingface_hub's error (`RepositoryNotFoundError`, `GatedRepoError`, ...) unless `token` may read the
    files of Hub repository `repo_id` now (`HfApi.auth_check`)."""
    from huggingface_hub import HfApi

    HfApi().auth_check(repo_id, token=token)


def download_config(repo_id: str, *, token: Token, local_only: bool) -> Path:
    """The folder holding `config.json` of Hub repository `repo_id` (in the HF cache), downloaded with `token`.

    Args:
        repo_id (`str`): `owner/name`.
        token (`str | bool | None`): None: this machine's login; False: none; a string: that token only.
        local_only (`bool`): use the HF cache only, no request.

    Returns:
        `Path`: the snapshot folder of the repository in the HF cache.
    """
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, "config.json", token=token, local_files_only=local_only)).parent


def download_model(repo_id: str, *, token: Token, local_only: bool) -> Path:
    """The snapshot folder of Hub repository `repo_id` with the files of `MODEL_FILES`, downloaded with `token`.

    Args:
        repo_id (`str`): `owner/name`.
        token (`str | bool | None`): as for `download_config`.
        local_only (`bool`): use the HF cache only, no request.

    Returns:
        `Path`: the snapshot folder in the HF cache, ready for `from_pretrained(..., local_files_only=True)`.
    """
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, token=token, local_files_only=local_only))

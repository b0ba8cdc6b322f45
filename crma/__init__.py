"""CRMA: a Sinkhorn-constrained residual mixing side channel that trains beside LoRA, plus ZClip.

The core imports only torch (peft lazily, to dequantise 4-bit weights). The ablation engine lives in
`crma.ablation`, the Space's logic in `crma.lab` and its Gradio page in `crma.ui` (started by `app.py`).
"""

from __future__ import annotations

from .basis import BasisCache, principal_bases
from .config import CRMAConfig, ZClipConfig
from .diagnostics import MixingReport, mixing_report
from .layer import CRMAAdapter
from .model import (
    active_adapter,
    attach,
    detach,
    disable,
    disabled,
    enable,
    get_adapter,
    param_groups,
    set_active,
)
from .serialization import load, save
from .sinkhorn import sinkhorn
from .zclip import ClipResult, ZClip, clip_by_norm

__all__ = [
    "BasisCache",
    "CRMAAdapter",
    "CRMAConfig",
    "ClipResult",
    "MixingReport",
    "ZClip",
    "ZClipConfig",
    "active_adapter",
    "attach",
    "clip_by_norm",
    "detach",
    "disable",
    "disabled",
    "enable",
    "get_adapter",
    "load",
    "mixing_report",
    "param_groups",
    "principal_bases",
    "save",
    "set_active",
    "sinkhorn",
]
__version__ = "0.1.0"

"""CRMA: a Sinkhorn-constrained residual mixing side channel that trains beside LoRA, plus ZClip.

The core imports only torch (peft lazily, to dequantise 4-bit weights). The ablation engine lives in
`crma.ablation`, the Gradio app in `app.py`.
"""

from __future__ import annotations

from .config import CRMAConfig, ZClipConfig
from .diagnostics import MixingReport, mixing_report
from .model import active_adapter, attach, detach, disable, enable, param_groups, set_active
from .serialization import load, save
from .sinkhorn import sinkhorn
from .zclip import ClipResult, ZClip, clip_by_norm

__all__ = [
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
    "enable",
    "load",
    "mixing_report",
    "param_groups",
    "save",
    "set_active",
    "sinkhorn",
]
__version__ = "0.1.0"

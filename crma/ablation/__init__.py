"""The paired ablation engine: LoRA vs LoRA+CRMA (and the 2x2 attribution grid) in lockstep on one base model.

Imports transformers, peft and plotly lazily through its submodules; never gradio.
"""

from __future__ import annotations

from .engine.records import Phase, RunResult, StepRecord
from .spec.arms import ARM_NAMES, ARM_SPECS, GRID_ARMS
from .spec.config import AblationConfig
from .spec.schema import ConfigError, parse_config

__all__ = [
    "ARM_NAMES",
    "ARM_SPECS",
    "GRID_ARMS",
    "AblationConfig",
    "ConfigError",
    "Phase",
    "RunResult",
    "StepRecord",
    "parse_config",
    "run_ablation",
]


def __getattr__(name: str):
    # The engine imports torch; `from crma.ablation import AblationConfig` should not have to.
    if name == "run_ablation":
        from .engine.loop import run_ablation

        return run_ablation
    raise AttributeError(name)

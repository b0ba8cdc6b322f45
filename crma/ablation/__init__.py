"""The paired ablation engine: LoRA vs LoRA+CRMA (and the 2x2 attribution grid) in lockstep on one base model.

Imports transformers, peft, datasets and plotly lazily through its submodules; never gradio.
"""

from __future__ import annotations

from .config import ARM_NAMES, AblationConfig, Phase, RunResult, StepRecord
from .engine import run_ablation

__all__ = ["ARM_NAMES", "AblationConfig", "Phase", "RunResult", "StepRecord", "run_ablation"]

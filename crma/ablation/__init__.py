"""The paired ablation engine: LoRA vs LoRA+CRMA (and the controls that attribute a difference) in lockstep on one
base model.

    from crma.ablation import parse_config, run_to_folder
    result = run_to_folder(parse_config({"steps": 40, "seeds": [1, 2, 3]}), "runs/demo")   # every file of a run

Its subpackages follow the seams of the work: `spec` (what a run is: config, schema, arms), `data` and `models` (its
inputs), `engine` (how it trains: the loop, the arms, evaluation, the receipt), `analysis` (what the numbers say),
`report` (charts and documents), `output` (the run folder, the Hub push, trackers, the study). Imports transformers,
peft and plotly lazily; never gradio.
"""

from __future__ import annotations

from .engine.records import EvalRecord, Phase, RunResult, StepRecord
from .spec.arms import ARM_NAMES, ARM_SPECS, GRID_ARMS
from .spec.config import AblationConfig
from .spec.schema import ConfigError, parse_config

__all__ = [
    "ARM_NAMES",
    "ARM_SPECS",
    "GRID_ARMS",
    "AblationConfig",
    "ConfigError",
    "EvalRecord",
    "Phase",
    "RunResult",
    "StepRecord",
    "parse_config",
    "run_to_folder",
    "train",
]


def __getattr__(name: str):
    # The engine imports torch; `from crma.ablation import AblationConfig` should not have to.
    if name == "train":
        from .engine.loop import train

        return train
    if name == "run_to_folder":
        from .output.run_folder import run_to_folder

        return run_to_folder
    raise AttributeError(name)

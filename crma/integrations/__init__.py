"""CRMA and ZClip inside `transformers.Trainer` and every subclass of it (TRL's `SFTTrainer`, ...).

This package imports transformers; `import crma` does not import it. One call prepares a built trainer::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...))
    crma.integrations.prepare_trainer(trainer, structural_lr=5e-3, gate_lr=1e-3)
    trainer.train()
"""

from __future__ import annotations

from .trainer import CRMATrainerConfig, CRMATrainerMixin, prepare_trainer

__all__ = ["CRMATrainerConfig", "CRMATrainerMixin", "prepare_trainer"]

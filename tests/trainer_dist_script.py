"""A 3-step `transformers.Trainer` run with CRMA + ZClip, as one process or under `torchrun` / `accelerate launch`.

    python tests/trainer_dist_script.py --out DIR                            # one process, batch 4
    torchrun --nproc-per-node 2 tests/trainer_dist_script.py --out DIR       # two gloo processes, 2 + 2 per step

The global batch is 4 sequences either way. Every rank writes `DIR/rank<k>.json`: the dataset indices it consumed per
optimizer step, its `log_history`, every folder its `crma.save` calls wrote (observed by wrapping `crma.save`), and
which optional packages (trl, trackio, gradio) the imports pulled in.
The trainer writes its checkpoints and the final CRMA files under `DIR/train`. tests/test_integrations.py compares
a two-process run with a one-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `import crma`

GLOBAL_BATCH = 4
SEQ_LEN = 16
ROWS = 16


class IndexedTokens(torch.utils.data.Dataset):
    """Fixed random token rows of equal length (so every rank's loss averages the same number of tokens)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 259, (ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "index": index}


class RecordingCollator:
    """Stacks a batch and keeps the dataset indices it was made of (the collator runs in this rank's process)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        self.batches.append([int(row["index"]) for row in rows])
        input_ids = torch.stack([row["input_ids"] for row in rows])
        return {"input_ids": input_ids, "labels": input_ids.clone()}


def run(out: str, report_to: str = "none") -> dict:
    """Train 3 steps (global batch 4 over however many processes were launched); return this rank's record."""
    from conftest import make_tiny_llama  # tests/ is this script's directory (pytest puts it on sys.path too)
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    import crma
    from crma.integrations import prepare_trainer

    # In a fresh process this shows what importing the integration pulled in (trl and trackio are optional).
    optional_imported = [name for name in ("trl", "trackio", "gradio") if name in sys.modules]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    writes: list[str] = []
    save = crma.save

    def recording_save(model, path, *args, **kwargs):
        writes.append(os.path.relpath(path, out))
        return save(model, path, *args, **kwargs)

    crma.save = recording_save
    try:
        model = get_peft_model(make_tiny_llama().train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(
            output_dir=str(Path(out) / "train"),
            max_steps=3,
            per_device_train_batch_size=GLOBAL_BATCH // world,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_steps=2,
            seed=0,
            use_cpu=True,
            ddp_backend="gloo" if world > 1 else None,
            report_to=report_to,
            project="crma-dist",
            run_name=f"world{world}",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        collator = RecordingCollator()
        trainer = Trainer(model=model, args=args, train_dataset=IndexedTokens(), data_collator=collator)
        # The hard cap clips step 1 (pre-clip norm ~3.4), so a clipped step is compared too; step 3 is the first
        # adaptive decision after the 2-step warm-up.
        prepare_trainer(trainer, zclip=crma.ZClipConfig(warmup_steps=2, max_grad_norm=2.0))
        trainer.train()
    finally:
        crma.save = save
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "indices": collator.batches,
        "log_history": trainer.state.log_history,
        "crma_writes": writes,
        "optional_imported": optional_imported,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-to", default="none")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # two processes share two cores
    record = run(cli.out, cli.report_to)
    Path(cli.out, f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

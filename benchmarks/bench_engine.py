"""Engine overheads (printed, not asserted): two arms on one base vs one arm, and our LoRA step vs HF Trainer.

1. Peak RSS of a two-arm run (lora, lora+crma) over a one-arm run (lora) of the same config, each in its own
   subprocess. Goal <= 1.25 (two separate processes would be ~2).
2. Median step time of the engine's `lora` arm over a plain transformers `Trainer` + peft LoRA step on the same
   model, batch and LoRA (AdamW, clip 1.0). Goal <= 1.05.

    python benchmarks/bench_engine.py [--model smollm2-135m] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


def engine_worker(arms: list[str], model: str, steps: int) -> dict:
    import resource

    from crma.ablation.engine.loop import run_ablation
    from crma.ablation.engine.records import StepRecord
    from crma.ablation.spec.config import AblationConfig

    cfg = AblationConfig(
        model=model,
        arms=arms,
        steps=steps,
        rows=64,
        batch_size=4,
        seq_len=128,
        device="cpu",
        dtype="float32",
        save_adapters=False,
        lora_init="gaussian",
    )
    records = [e for e in run_ablation(cfg) if isinstance(e, StepRecord)]
    lora = [r.step_time_s for r in records if r.arm == "lora"][2:]
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lora_step_s": statistics.median(lora),
    }


def trainer_worker(model_name: str, steps: int) -> dict:
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from crma.ablation.data import build_examples, collate, load_instruction_rows
    from crma.ablation.models import load_model

    loaded = load_model(model_name, device="cpu", dtype="float32")
    examples = build_examples(load_instruction_rows("bundled", start=0, rows=64), loaded.tokenizer, seq_len=128)
    torch.manual_seed(42)
    model = get_peft_model(
        loaded.model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return i

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    args = TrainingArguments(
        output_dir="/tmp/crma-bench-trainer",
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=2e-4,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=42,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Rows(),
        data_collator=lambda idx: collate(examples, idx, pad_id=loaded.tokenizer.pad_token_id),
        callbacks=[Timer()],
    )
    trainer.train()
    return {"trainer_step_s": statistics.median(times[2:])}


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", choices=["one", "two", "trainer"])
    args = parser.parse_args()
    if args.worker == "trainer":
        print(json.dumps(trainer_worker(args.model, args.steps)))
        return
    if args.worker:
        arms = ["lora"] if args.worker == "one" else ["lora", "lora+crma"]
        print(json.dumps(engine_worker(arms, args.model, args.steps)))
        return
    common = ("--model", args.model, "--steps", str(args.steps))
    one, two = run("--worker", "one", *common), run("--worker", "two", *common)
    trainer = run("--worker", "trainer", *common)
    print(f"model {args.model}, batch 4 x 128 tokens, CPU, {args.steps} steps")
    print(
        f"peak RSS   one arm {one['peak_rss_mb']:8.0f} MiB   two arms {two['peak_rss_mb']:8.0f} MiB   "
        f"ratio {two['peak_rss_mb'] / one['peak_rss_mb']:.3f}   (goal <= 1.25)"
    )
    ours = statistics.median([one["lora_step_s"], two["lora_step_s"]])
    print(
        f"LoRA step  engine {ours:.3f} s   Trainer {trainer['trainer_step_s']:.3f} s   "
        f"ratio {ours / trainer['trainer_step_s']:.3f}   (goal <= 1.05)"
    )


if __name__ == "__main__":
    main()

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import crma.integrations

dataset = load_dataset("trl-lib/Capybara", split="train")
lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4")
args = SFTConfig(output_dir="smollm2-crma", report_to="trackio")  # every report_to tracker gets the CRMA keys
trainer = SFTTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=args, train_dataset=dataset, peft_config=lora)
crma.integrations.prepare_trainer(trainer, structural_lr=5e-3, gate_lr=1e-3)  # attach CRMA, ZClip, logs, files
trainer.train()  # trainer.train(resume_from_checkpoint=True) restores LoRA, CRMA, ZClip and the optimizer

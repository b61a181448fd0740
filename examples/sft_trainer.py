"""A TRL supervised fine-tuning script, trained with zeroth-order steps: the trainer's class is the one change.

    pip install "qzo[hf]"
    python examples/sft_trainer.py [--model FOLDER_OR_HUB_ID] [--steps 60] [--out runs/sft-trainer]

The script is TRL's QLoRA recipe as its documentation writes it (a chat dataset, an
``SFTConfig``, a LoRA ``peft_config``, the model loaded 4-bit), and the diff from its first-order
form is:

    -from trl import SFTTrainer
    +from qzo.hf import ZOSFTTrainer
    -trainer = SFTTrainer(
    +trainer = ZOSFTTrainer(

Everything else is TRL's and transformers': the chat template and assistant-only labels, the
data loader, the lr scheduler (which sets qzo's lr), logging, ``save_steps`` checkpoints (the
adapter plus qzo's state under ``checkpoint-N/qzo``), ``evaluate()``. What the numbers mean for
ZO: ``learning_rate`` is an SGD step along a projected gradient (MeZO's LoRA range is
1e-4 to 5e-5 at batch 16; this small batch of the demo takes more), and each step costs two
forwards and no backward. Runs on the CPU demo model (SmolLM2-135M-Instruct, converted once
into qzo's cache) with the demo chats; ``--model`` names another folder or hub id.
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import SFTConfig

from qzo.data.sources import demo_data_path
from qzo.hf import ZOSFTTrainer  # was: from trl import SFTTrainer
from qzo.models.load import hf_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a folder or hub id (default: the demo model)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/sft-trainer")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()

    dataset = load_dataset("json", data_files={"train": str(demo_data_path("train")),
                                               "test": str(demo_data_path("eval"))})
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_steps=args.steps // 2,
        max_length=96,
        report_to=[],
        bf16=on_gpu,
        use_cpu=not on_gpu,
        model_init_kwargs={
            "dtype": torch.bfloat16 if on_gpu else torch.float32,
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32),
        },
    )
    trainer = ZOSFTTrainer(  # was: SFTTrainer(
        model=hf_model_path(args.model),
        args=config,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(args.out)
    print(f"held-out loss before: {before:.4f}")
    print(f"held-out loss after:  {after:.4f} ({trainer.zo.forwards} forwards, no backward)")
    print(f"adapter and qzo's step log saved to {args.out}")


if __name__ == "__main__":
    main()

"""``qzo.hf.ZOSFTTrainer``: TRL's SFTTrainer script with one class name changed trains with ZO steps.

The script is what TRL's documentation writes (a conversational dataset, an ``SFTConfig``, a ``peft_config``),
on the tiny Llama and the numbered-code chats: 12 train, 4 held out.
"""

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from qzo.data.loss import CausalLMLoss
from qzo.hf import ZOSFTTrainer

from hf_setup import CHATS


def _sft(model_dir, tok, out_dir, **config):
    settings = dict(output_dir=str(out_dir), max_steps=30, per_device_train_batch_size=4, learning_rate=0.2,
                    lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                    bf16=False, max_length=48, seed=0, disable_tqdm=True)
    settings.update(config)
    return ZOSFTTrainer(  # was: SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(model_dir)),
        args=SFTConfig(**settings),
        train_dataset=Dataset.from_list(CHATS[:12]),
        eval_dataset=Dataset.from_list(CHATS[12:]),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05),
        eps=1e-2,
    )


def test_zo_sft_trainer_lowers_the_held_out_loss(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = _sft(tiny_model_dir, tiny_tokenizer, tmp_path)
    assert trainer.args.gradient_checkpointing is False  # SFTConfig's default (True) switched off: no backward
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert trainer.zo_loss_kind == "fast"  # TRL's nll loss is qzo.CausalLMLoss's: the faster one runs
    assert trainer.zo.forwards == 60 and len(trainer.zo_records) == 30
    assert after < before - 0.05, (before, after)  # 0.06-0.14 over seeds 0-2 and lr 0.2-1.0
    assert not any(p.requires_grad for p in trainer.model.parameters())


def test_the_fast_loss_is_trls_loss(tiny_model_dir, tiny_tokenizer, tmp_path):
    """With TRL's own ``compute_loss`` as the closure (``zo_loss="trainer"``) the first step's losses are the fast
    path's to float rounding, and so is one evaluation of a batch."""
    fast = _sft(tiny_model_dir, tiny_tokenizer, tmp_path / "fast", max_steps=1)
    fast.train()
    slow = _sft(tiny_model_dir, tiny_tokenizer, tmp_path / "slow", max_steps=1)
    slow.zo_loss = "trainer"
    slow.train()
    assert slow.zo_loss_kind == "trainer"
    assert slow.zo_records[0]["seeds"] == fast.zo_records[0]["seeds"]
    torch.testing.assert_close(slow.zo_records[0]["losses"], fast.zo_records[0]["losses"], rtol=1e-6, atol=1e-6)

    batch = next(iter(fast.get_train_dataloader()))
    model = fast.model
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(CausalLMLoss(model, batch)(), fast.compute_loss(model, dict(batch)), rtol=1e-6,
                                   atol=1e-6)

"""Save, stop, resume: ``save_steps`` writes the peft adapter plus qzo's state, and ``resume_from_checkpoint`` continues
bit-exactly (trained values, every step record, the logged losses) in a new trainer on a freshly loaded model.

The run uses what carries state across steps: ZO-Adam's moments, a warm-up and decaying lr from the Trainer's
scheduler, a shuffled data order (the Trainer's sampler). The interrupted run stops one step after its checkpoint,
so the resumed run must also throw away what that step did.
"""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.trainer_callback import TrainerCallback

from qzo.errors import QzoError
from qzo.hf import STATE_DIR, ZOTrainer

from hf_setup import Collate, lora_model, token_rows, train_args, values


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(model_dir, tok, out_dir, callbacks=()):
    params = lora_model(model_dir)
    args = train_args(out_dir, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear",
                      warmup_steps=1)
    trainer = ZOTrainer(model=params.peft_model, args=args, train_dataset=token_rows(tok),
                        data_collator=Collate(tok.pad_token_id), params=params, rule="adam", eps=1e-2,
                        callbacks=list(callbacks))
    return trainer, params


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_a_stopped_run_resumes_bit_exactly_from_its_checkpoint(tiny_model_dir, tiny_tokenizer, tmp_path):
    whole, whole_params = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "whole")
    whole.train()

    stopped, _ = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "stopped", callbacks=[StopAt(4)])
    stopped.train()
    assert stopped.state.global_step == 4
    del stopped  # the process that ran it is gone: a new trainer on a freshly loaded model takes over

    resumed, resumed_params = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "stopped")
    resumed.train(resume_from_checkpoint=True)

    assert resumed.zo_records == whole.zo_records  # steps 1-3 read from the checkpoint, 4-6 run again: same bits
    assert [r["step"] for r in resumed.zo_records] == [1, 2, 3, 4, 5, 6]
    mine, theirs = values(resumed_params), values(whole_params)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert {s: v for s, v in _losses(resumed).items() if s > 3} == {s: v for s, v in _losses(whole).items() if s > 3}


def test_a_checkpoint_holds_the_adapter_and_qzos_state_and_loads_in_peft(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer, params = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "run")
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-6"
    qzo_files = sorted(str(p.relative_to(folder)) for p in (folder / STATE_DIR).rglob("*") if p.is_file())
    assert qzo_files == ["qzo/checkpoints/step-000006/meta.json", "qzo/checkpoints/step-000006/optimizer.safetensors",
                         "qzo/checkpoints/step-000006/trainables.safetensors", "qzo/steps.jsonl"]
    log = [json.loads(line) for line in (folder / "qzo" / "steps.jsonl").read_text().splitlines()]
    assert log == trainer.zo_records
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= {p.name for p in folder.iterdir()}

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    loaded = PeftModel.from_pretrained(base, str(folder))
    adapters = {k.replace(".default.", "."): v for k, v in loaded.state_dict().items() if "lora_" in k}
    trained = values(params)
    assert adapters.keys() == trained.keys()
    assert all(torch.equal(adapters[k].float(), trained[k]) for k in trained)

    trainer.save_model(str(tmp_path / "final"))  # the user's save: the adapter and the whole step log
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert len((final / "qzo" / "steps.jsonl").read_text().splitlines()) == 6


def test_a_checkpoint_without_qzo_state_or_with_other_settings_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    first, _ = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "run", callbacks=[StopAt(3)])
    first.train()
    bare = tmp_path / "bare" / "checkpoint-3"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", bare)
    shutil.rmtree(bare / STATE_DIR)
    again, _ = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "bare")
    with pytest.raises(QzoError, match="no qzo state"):
        again.train(resume_from_checkpoint=str(bare))

    other, _ = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path / "run")
    other.zo_rule = "sgd"
    with pytest.raises(QzoError, match="resume with the same strategy, rule"):
        other.train(resume_from_checkpoint=True)

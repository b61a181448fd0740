"""``qzo.hf.ZOTrainer``: a transformers Trainer whose step is ``qzo.ZO``'s, checked against qzo.ZO driven by hand.

Real transformers and peft on the tiny Llama, no mocks: the trainer records the batches its data loader gave it,
a second copy of the model is trained on those batches by ``qzo.ZO`` directly, and every loss, every step record
and every trained value must be the same bits.
"""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.trainer_callback import TrainerCallback

import qzo
from qzo.hf import UnsupportedOption, ZOTrainer
from qzo.hf.refuse import refuse_arguments

from hf_setup import Collate, lora_model, token_rows, train_args, values


class Recording(ZOTrainer):
    """A ZOTrainer that keeps a copy of each batch it steps on (what the by-hand run replays)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("quant, zo_loss, strategy, rule, batched", [
    (None, "trainer", lambda: qzo.SPSA(), "sgd", False),
    ("nf4", "auto", lambda: qzo.GV(pool=3), "adam", False),
    (None, "fast", lambda: qzo.LDSD(candidates=3), "sgd", True),  # the pool in one stacked forward
])
def test_zo_trainer_and_qzo_zo_by_hand_give_the_same_bits(tiny_model_dir, tiny_tokenizer, tmp_path, quant, zo_loss,
                                                          strategy, rule, batched):
    params = lora_model(tiny_model_dir, quant)
    trainer = Recording(model=params.peft_model, args=train_args(tmp_path), train_dataset=token_rows(tiny_tokenizer),
                        data_collator=Collate(tiny_tokenizer.pad_token_id), params=params, strategy=strategy(),
                        rule=rule, eps=1e-2, zo_loss=zo_loss, batched=batched)
    trainer.train()
    assert trainer.zo_loss_kind == ("trainer" if zo_loss == "trainer" else "fast")

    by_hand = lora_model(tiny_model_dir, quant)
    hand_rule = qzo.SGD(lr=0.05) if rule == "sgd" else qzo.Adam(lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    opt = qzo.ZO(by_hand, strategy=strategy(), rule=hand_rule, eps=1e-2, seed=1, batched=batched)
    model, records = by_hand.peft_model, []
    for batch in trainer.batches:
        closure = (lambda: model(**batch).loss) if zo_loss == "trainer" else qzo.CausalLMLoss(model, batch)
        opt.step(closure)
        records.append(opt.last_record.to_json())

    assert len(records) == 4 and trainer.zo_records == records  # seeds, directions, every loss, lr: the same bits
    assert (trainer.zo.forward_calls < trainer.zo.forwards) == batched  # a batched pool ran in fewer forwards
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [torch.tensor(r["loss"]).item() for r in records]  # the Trainer sums its loss in float32
    mine, theirs = values(params), values(by_hand)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(not torch.equal(mine[k], lora_model(tiny_model_dir, quant).state_dict()[k]) for k in mine), \
        "nothing was trained"
    peft_model = params.peft_model
    assert not any(p.requires_grad for p in peft_model.parameters())
    assert all(p.grad is None for p in peft_model.parameters())


def test_the_trainers_scheduler_sets_qzos_lr_and_its_log_carries_qzos_numbers(tiny_model_dir, tiny_tokenizer, tmp_path):
    params = lora_model(tiny_model_dir)
    args = train_args(tmp_path, max_steps=5, lr_scheduler_type="linear", warmup_steps=2)
    trainer = ZOTrainer(model=params.peft_model, args=args, train_dataset=token_rows(tiny_tokenizer),
                        data_collator=Collate(tiny_tokenizer.pad_token_id), eps=1e-2)  # the trainables: peft's
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    records = trainer.zo_records
    assert [h["learning_rate"] for h in logs] == [r["lr"] for r in records]
    assert len({r["lr"] for r in records}) == 5 and records[0]["lr"] == 0.0  # warm-up from 0, then linear decay
    for h, r in zip(logs, records):
        assert "grad_norm" not in h  # the Trainer's norm of gradients that do not exist
        assert (h["zo/grad"], h["zo/loss_min"], h["zo/loss_max"]) == (r["grad"], min(r["losses"]), max(r["losses"]))
        assert h["zo/forwards"] == r["forwards"]
    assert {t.name for t in trainer.zo.params} == {t.name for t in params}  # peft's adapters, named as qzo.lora names them



def test_report_to_tensorboard_carries_qzos_numbers(tiny_model_dir, tiny_tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    params = lora_model(tiny_model_dir)
    trainer = ZOTrainer(model=params.peft_model, args=train_args(tmp_path, max_steps=3, report_to=["tensorboard"]),
                        train_dataset=token_rows(tiny_tokenizer), data_collator=Collate(tiny_tokenizer.pad_token_id),
                        params=params, eps=1e-2)
    trainer.train()
    (events,) = tmp_path.glob("runs/*/events.out.tfevents.*")
    scalars = EventAccumulator(str(events))
    scalars.Reload()
    assert {"train/loss", "train/zo/grad", "train/zo/loss_min", "train/zo/loss_max", "train/zo/forwards"} <= set(
        scalars.Tags()["scalars"])
    grads = [(e.step, e.value) for e in scalars.Scalars("train/zo/grad")]
    assert grads == [(r["step"], torch.tensor(r["grad"]).item()) for r in trainer.zo_records]  # stored as float32

def test_a_custom_compute_loss_is_the_closure(tiny_model_dir, tiny_tokenizer, tmp_path):
    class Shifted(Recording):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss + 1.0

    params = lora_model(tiny_model_dir)
    trainer = Shifted(model=params.peft_model, args=train_args(tmp_path, max_steps=2),
                      train_dataset=token_rows(tiny_tokenizer), data_collator=Collate(tiny_tokenizer.pad_token_id),
                      params=params, eps=1e-2)
    trainer.train()
    assert trainer.zo_loss_kind == "trainer"  # zo_loss="auto" leaves a custom loss to itself
    by_hand = lora_model(tiny_model_dir)
    opt = qzo.ZO(by_hand, rule=qzo.SGD(lr=0.05), eps=1e-2, seed=1)
    model = by_hand.peft_model
    hand = [opt.step(lambda: model(**b).loss + 1.0) for b in trainer.batches]
    assert [r["loss"] for r in trainer.zo_records] == hand

    strict = Shifted(model=params.peft_model, args=train_args(tmp_path, max_steps=1),
                     train_dataset=token_rows(tiny_tokenizer), data_collator=Collate(tiny_tokenizer.pad_token_id),
                     params=params, zo_loss="fast")
    with pytest.raises(UnsupportedOption, match="Shifted.compute_loss is a custom loss"):
        strict.train()


@pytest.mark.parametrize("overrides, says", [
    ({"gradient_accumulation_steps": 2}, "no gradient to accumulate"),
    ({"gradient_checkpointing": True}, "set gradient_checkpointing=False"),
    ({"fp16": True}, "its loss scaler scales gradients"),
])
def test_options_for_a_backward_pass_are_refused_in_one_line(tiny_model_dir, tiny_tokenizer, tmp_path, overrides,
                                                             says):
    params = lora_model(tiny_model_dir)
    with pytest.raises(UnsupportedOption, match=says) as refused:
        ZOTrainer(model=params.peft_model, args=train_args(tmp_path, **overrides),
                  train_dataset=token_rows(tiny_tokenizer), data_collator=Collate(tiny_tokenizer.pad_token_id))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("name, value, says", [
    ("deepspeed", "ds_config.json", "DeepSpeed"),
    ("fsdp", ["full_shard"], "FSDP"),
])
def test_deepspeed_and_fsdp_are_refused(tmp_path, name, value, says):
    """On one CPU process transformers cannot build these arguments (DeepSpeed is not installed, FSDP needs ranks),
    so the check is fed real arguments with the option set afterwards, as a launcher's arguments would carry it."""
    args = train_args(tmp_path)
    setattr(args, name, value)
    with pytest.raises(UnsupportedOption, match=says) as refused:
        refuse_arguments(args)
    assert "\n" not in str(refused.value)


def test_a_torch_optimizer_or_model_init_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    params = lora_model(tiny_model_dir)
    common = dict(args=train_args(tmp_path), train_dataset=token_rows(tiny_tokenizer),
                  data_collator=Collate(tiny_tokenizer.pad_token_id))
    adamw = torch.optim.AdamW(params.peft_model.parameters(), lr=1e-3)
    with pytest.raises(UnsupportedOption, match="the optimizer is qzo.ZO"):
        ZOTrainer(model=params.peft_model, optimizers=(adamw, None), **common)
    with pytest.raises(UnsupportedOption, match="model_init"):
        ZOTrainer(model_init=lambda: params.peft_model, **common)
    with pytest.raises(UnsupportedOption, match="learning_rate=0.001"):
        ZOTrainer(model=params.peft_model, rule=qzo.SGD(lr=1e-3), **common)


def test_training_stops_where_a_callback_says_and_the_step_log_follows_global_step(tiny_model_dir, tiny_tokenizer,
                                                                                   tmp_path):
    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    params = lora_model(tiny_model_dir)
    trainer = ZOTrainer(model=params.peft_model, args=train_args(tmp_path), train_dataset=token_rows(tiny_tokenizer),
                        data_collator=Collate(tiny_tokenizer.pad_token_id), callbacks=[StopAt2()])
    trainer.train()
    assert trainer.state.global_step == trainer.zo.steps == 2
    assert [r["step"] for r in trainer.zo_records] == [1, 2]


def test_import_qzo_imports_neither_qzo_hf_nor_trl():
    code = ("import sys, qzo\n"
            "assert 'qzo.hf' not in sys.modules and 'trl' not in sys.modules\n"
            "import qzo.hf\n"
            "assert 'trl' not in sys.modules, 'qzo.hf imports TRL before ZOSFTTrainer is asked for'\n"
            "qzo.hf.ZOSFTTrainer\n"
            "assert 'trl' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_every_evaluation_of_a_step_sees_the_same_dropout(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Attention dropout 0.5, on in training mode: two forwards of one batch differ by about 1e-2, far more than a
    perturbation of 1e-4 moves the loss. The trainer's evaluations of a step draw the same masks (their seed comes
    from the run's seed and the step), so their gap is the perturbation's alone."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attention_dropout=0.5)
    params = qzo.lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = Recording(model=params.peft_model, args=train_args(tmp_path, max_steps=3),
                        train_dataset=token_rows(tiny_tokenizer), data_collator=Collate(tiny_tokenizer.pad_token_id),
                        params=params, eps=1e-4)
    trainer.train()
    gaps = [abs(r["losses"][0] - r["losses"][1]) for r in trainer.zo_records]
    peft_model = params.peft_model.train()
    with torch.no_grad():
        two_draws = abs(float(peft_model(**trainer.batches[0]).loss - peft_model(**trainer.batches[0]).loss))
    assert two_draws > 1e-3, two_draws  # the dropout is there
    assert max(gaps) < two_draws / 10, (gaps, two_draws)


def test_a_4bit_model_loaded_by_transformers_computes_one_function_through_training_and_saving(
        tiny_model_dir, tiny_tokenizer, tmp_path):
    """transformers leaves bitsandbytes to repack a CPU 4-bit layer in its first forward (on AVX512-BF16 CPUs) and a
    checkpoint's ``state_dict()`` to un-pack it in place; the trainer settles the path first, so saving a checkpoint
    leaves the loss where it was (on this kind of CPU the unsettled model's loss moves at the fourth digit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=quant)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = ZOTrainer(model=model, args=train_args(tmp_path, max_steps=2, learning_rate=0.2),
                        train_dataset=token_rows(tiny_tokenizer), data_collator=Collate(tiny_tokenizer.pad_token_id),
                        eps=1e-2)
    trainer.train()
    batch = Collate(tiny_tokenizer.pad_token_id)(token_rows(tiny_tokenizer)[:4])
    model.eval()  # as evaluate() does: an unsettled layer repacks in its first eval-mode no-grad forward
    with torch.no_grad():
        before = model(**batch).loss.item()
        trainer.save_model(str(tmp_path / "saved"))
        after = model(**batch).loss.item()
    assert before == after
    assert trainer.zo.steps == 2 and (tmp_path / "saved" / "adapter_model.safetensors").is_file()

"""Peak RSS of a ZoTrainer step against one no-grad forward of the same loss, and a first-order step for contrast.

Run by ``test_hf_memory.py`` in a process of its own, started with ``MALLOC_MMAP_THRESHOLD_`` pinned: glibc then
serves every allocation above the threshold with its own mapping and unmaps it when torch frees it, so the resident
set follows the live tensors instead of keeping freed blocks. Each phase runs once to warm up (lazy imports, the
noise generator, caches), then is measured: ``/proc/self/clear_refs`` resets the peak (VmHWM) to the current
resident set, and the phase's peak is VmHWM after it minus VmRSS before it. Prints one JSON line, MiB per phase.

    python tests/hf/memory_probe.py MODEL_DIR OUT_DIR
"""

import gc
import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak(fn) -> float:
    """MiB the resident set rose to above where it was while ``fn`` ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    fn()
    return (_status("VmHWM") - before) / 2**20


def main(model_dir: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, TrainingArguments

    import qzo
    from qzo.hf import ZOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 256), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], max_steps=10, save_strategy="no")
    trainer = ZOTrainer(model=params.peft_model, args=args, train_dataset=[batch], params=params, zo_loss="trainer",
                        eps=1e-2)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    peft_model = params.peft_model

    def forward():
        with torch.no_grad():
            trainer.compute_loss(peft_model, dict(batch))

    def zo_step():
        trainer.training_step(peft_model, dict(batch))
        trainer.state.global_step += 1  # what the Trainer's loop does after each step

    adapters = [p for n, p in peft_model.named_parameters() if "lora_" in n]

    def first_order_step():
        for p in adapters:
            p.requires_grad_(True)
        trainer.compute_loss(peft_model, dict(batch)).backward()
        for p in adapters:
            p.requires_grad_(False)
            p.grad = None

    for fn in (forward, zo_step, first_order_step):
        fn()
    grads = [p.grad for p in peft_model.parameters() if p.grad is not None]
    result = {"forward": peak(forward), "zo_step": peak(zo_step), "first_order": peak(first_order_step),
              "trainables": params.numel * 4 / 2**20, "grads_left": len(grads),
              "requires_grad": sum(p.requires_grad for p in peft_model.parameters())}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""A 7B model on a card too small for it: plan the split, offload what does not fit, train LoRA.

On a GPU (download the weights into the Hugging Face cache first)::

    python examples/offload_7b.py --model meta-llama/Llama-2-7b-chat-hf --gpu 4GiB

asks ``qzo.plan`` how many decoder layers fit the budget, loads the model in NF4 with
``device_map="auto"`` and the ``max_memory`` the plan gives (layers that do not fit stay on
the CPU unquantized and stream to the GPU every forward; their LoRA adapters stay on the
GPU), trains a few ZO steps on the demo chats and prints the losses and the GPU peak.
``--plan-only`` stops after the plan and the placement it gives, before anything is
loaded: it needs only the model's ``config.json`` in the cache, and no GPU.

Without a GPU (what CI runs)::

    python examples/offload_7b.py

does the same with a tiny random Llama whose second half lives on *disk* (a CPU cannot
host 4-bit offload, so it runs unquantized), and trains it twice, offloaded and in memory,
to show that offloading changes where weights live and not a single loss. It uses the demo
model's tokenizer; ``--tokenizer`` names another (a built-in name, hub id or a tokenizer's folder).
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

import qzo
from qzo.data.dataset import Batcher, ChatDataset
from qzo.models.load import hf_model_path


def train_steps(model, tok, steps: int) -> list[float]:
    params = qzo.lora(model, r=8, target_modules=["q_proj", "v_proj"])
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2, seed=0)
    data = ChatDataset.from_jsonl(tok, "builtin:demo_train", max_len=96)
    batches = Batcher(data, batch_size=4, seed=0, pad_id=tok.pad_token_id)
    device = qzo.data.dataset.model_input_device(model)
    losses = []
    for step in range(1, steps + 1):
        batch = {k: v.to(device) for k, v in batches.batch(step).items()}
        losses.append(round(opt.step(qzo.CausalLMLoss(model, batch)), 6))
    return losses


def placement(model: str, gpu: str):
    """The plan of a 4-bit model's ZO step on a ``gpu`` budget, and the ``qzo.load`` placement it calls for."""
    p = qzo.plan(model, "nf4", gpu=gpu, batch=4, seq=96)
    if p.fits:
        return p, {}  # the whole model on the GPU
    offloaded_gib = p.offloaded_bytes() / 2**30
    return p, dict(device_map="auto", max_memory={0: f"{p.weights_allowance() / 2**30:.2f}GiB",
                                                  "cpu": f"{offloaded_gib * 1.3 + 8:.0f}GiB"})


def on_gpu(args) -> None:
    p, kwargs = placement(args.model, args.gpu)
    print(p.table())
    print(f"placement: {kwargs!r}" if kwargs else "placement: the whole model on the GPU")
    if args.plan_only:
        return
    if kwargs:
        kwargs["offload_folder"] = tempfile.mkdtemp(prefix="qzo-offload-")
    model, tok = qzo.load(args.model, "nf4", **kwargs)
    placed = sorted(set(map(str, getattr(model, "hf_device_map", {"": "cuda:0"}).values())))
    print(f"placed on: {', '.join(placed)}")
    torch.cuda.reset_peak_memory_stats()
    print(f"losses: {train_steps(model, tok, args.steps)}")
    print(f"GPU peak: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (budget {args.gpu})")


def on_cpu(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    source = args.tokenizer if Path(args.tokenizer).is_dir() else hf_model_path(args.tokenizer)
    tok = AutoTokenizer.from_pretrained(source)  # the demo's by default
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    folder = Path(tempfile.mkdtemp(prefix="qzo-tiny-"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    disk = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded, _ = qzo.load(folder, "none", device_map=disk, offload_folder=str(folder / "offload"))
    print(f"offloaded to disk: {json.dumps({k: v for k, v in offloaded.hf_device_map.items() if v == 'disk'})}")
    a = train_steps(offloaded, tok, args.steps)
    in_memory, _ = qzo.load(folder, "none")
    b = train_steps(in_memory, tok, args.steps)
    print(f"losses with layers on disk: {a}")
    print(f"losses all in memory:       {b}")
    print(f"identical: {a == b}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="meta-llama/Llama-2-7b-chat-hf")
    ap.add_argument("--gpu", default="4GiB", help="GPU budget for the plan")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokenizer", default="smollm2-135m",
                    help="the CPU run's tokenizer (a built-in name, hub id or folder; default: the demo model's)")
    ap.add_argument("--plan-only", action="store_true",
                    help="the GPU run's plan and placement, then stop before loading (no GPU needed)")
    args = ap.parse_args()
    on_gpu(args) if args.plan_only or torch.cuda.is_available() else on_cpu(args)


if __name__ == "__main__":
    main()

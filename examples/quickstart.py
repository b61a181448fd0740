"""Quick start with the Python API: fine-tune the demo model's LoRA with ZO steps.

    python examples/quickstart.py [--steps 30] [--model smollm2-135m]

Loads SmolLM2-135M (NF4), trains LoRA on the built-in chat data with SPSA (MeZO), prints
the held-out loss before and after, and saves a PEFT adapter to runs/quickstart-adapter.
``--model`` loads another model instead (a built-in name, .gguf, folder or hub id).
"""

import argparse

import qzo
from qzo.data.dataset import Batcher, ChatDataset, eval_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="runs/quickstart-adapter")
    ap.add_argument("--model", default="smollm2-135m", help="what qzo.load loads (default: the demo model)")
    args = ap.parse_args()

    model, tok = qzo.load(args.model, quant="nf4")
    params = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=1e-3), eps=1e-2, seed=0)

    train = ChatDataset.from_jsonl(tok, "builtin:demo_train", max_len=96)
    held_out = ChatDataset.from_jsonl(tok, "builtin:demo_eval", max_len=96)
    batches = Batcher(train, batch_size=8, seed=0, pad_id=tok.pad_token_id)

    print(f"held-out loss before: {eval_loss(model, held_out, 16, tok.pad_token_id):.4f}")
    for step in range(1, args.steps + 1):
        batch = batches.batch(step)
        loss = opt.step(lambda: model(**batch).loss)  # two forward passes, no backward
        if step % 10 == 0:
            print(f"step {step}: train loss {loss:.4f} ({opt.forwards} forwards)")
    print(f"held-out loss after:  {eval_loss(model, held_out, 16, tok.pad_token_id):.4f}")
    params.save(args.out)
    print(f"adapter saved to {args.out} (load it with peft.PeftModel.from_pretrained)")


if __name__ == "__main__":
    main()

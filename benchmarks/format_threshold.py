"""At what held-out loss do the demo's greedy replies take the taught format?

The demo's chat task teaches one rigid reply (``ANSWER: ...`` / ``WHY: ...`` / ``#qzo``), and
issue 13 asks that ``qzo eval`` on the demo's run show at least 2 of its 4 greedy samples in
it. This measures the held-out loss that takes, independently of how the loss is reached: the
demo model (SmolLM2-135M-Instruct, NF4, LoRA r 8 on q,v, batch 4 x 96 as in the convergence
benchmark) is trained with first-order AdamW (backprop through the NF4 model, the QLoRA way)
and, every few steps, evaluated on the held-out set together with greedy replies (at most 24
new tokens) to the same 4 prompts ``qzo eval`` samples. A reply counts as

    answer_why   its first line starts with "ANSWER:" and a later line with "WHY:"
    strict       that, and a "#qzo" line (the whole taught format)

Zeroth-order runs lower the loss along other paths, so the threshold is a guide to how far a
ZO run has to get, not a promise. ``--zo`` measures that directly: the demo recipe's optimizer
(SPSA; LoRA's B factors, or ``--targets norms`` for the normalization gains) on the same
batches, with the same evaluation every ``--every`` steps, up to ``--max-steps``; a forward
counts 1 there (2 a step), a first-order step 3. Output: ``results/format_threshold.json``
(first-order) or ``results/format_threshold_zo_<targets>.json``.

    python benchmarks/format_threshold.py [--lr 3e-4] [--max-steps 60] [--every 3]
    python benchmarks/format_threshold.py --zo [--targets lora_b|norms] [--lr 8e-3] [--max-steps 500] [--every 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, first_order_adam, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.cli.chat import reply  # noqa: E402
from qzo.data.dataset import Batcher, ChatDataset, eval_loss  # noqa: E402
from qzo.data.objectives import split_chat  # noqa: E402

BATCH, MAX_LEN, EVAL_BATCH, SAMPLES, NEW_TOKENS = 4, 96, 16, 4, 24


def in_format(text: str, strict: bool) -> bool:
    """Whether a reply has the taught layout (``strict``: with its closing ``#qzo`` line too)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or not lines[0].startswith("ANSWER:"):
        return False
    if not any(line.startswith("WHY:") for line in lines[1:]):
        return False
    return not strict or "#qzo" in lines[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=3, help="evaluate every N steps")
    ap.add_argument("--source", default="smollm2-135m", help="model source (the tests use a tiny model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zo", action="store_true", help="SPSA steps (the demo's optimizer) instead of AdamW")
    ap.add_argument("--targets", choices=("lora_b", "norms"), default="lora_b", help="--zo: what is trained")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model, tok = qzo.load(args.source, quant="nf4")
    if args.zo and args.targets == "norms":
        params, noise_scale = qzo.norms(model), None
    else:
        params, noise_scale = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"]), {"*lora_A*": 0}
    if args.zo:
        opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=args.lr), eps=1e-2, seed=args.seed,
                     noise_scale=noise_scale)
    else:
        adam = first_order_adam(params, args.lr)
    train = ChatDataset.from_jsonl(tok, "builtin:demo_train", max_len=MAX_LEN)
    held = ChatDataset.from_jsonl(tok, "builtin:demo_eval", max_len=MAX_LEN)
    prompts = [split_chat(c)[0] for c in held.chats[:SAMPLES]]
    batches = Batcher(train, batch_size=BATCH, seed=args.seed, pad_id=tok.pad_token_id)

    rows: list[dict] = []

    def evaluate(step: int) -> dict:
        with torch.no_grad():
            loss = eval_loss(model, held, EVAL_BATCH, tok.pad_token_id)
            replies = [reply(model, tok, messages, NEW_TOKENS) for messages in prompts]
        row = {"step": step, "forwards": opt.forwards if args.zo else 3 * step, "held_out_loss": round(loss, 4),
               "answer_why": sum(in_format(r, strict=False) for r in replies),
               "strict": sum(in_format(r, strict=True) for r in replies), "replies": replies}
        rows.append(row)
        print(f"{step:>5} {loss:>9.3f} {row['answer_why']:>7}/{SAMPLES} {row['strict']:>5}/{SAMPLES}   "
              + " | ".join(r.replace("\n", " / ")[:36] for r in replies), flush=True)
        return row

    print(f"{'step':>5} {'held-out':>9} {'ans+why':>9} {'strict':>7}   replies")
    t0 = time.perf_counter()
    evaluate(0)
    for step in range(1, args.max_steps + 1):
        if args.zo:
            batch = batches.batch(step)
            opt.step(lambda: model(**batch).loss)
        else:
            model(**batches.batch(step)).loss.backward()
            adam.step()
            adam.zero_grad()
        if step % args.every == 0 and evaluate(step)["strict"] >= SAMPLES:
            break

    def first(key: str) -> dict | None:
        return next((r for r in rows if r[key] >= 2), None)

    summary = {"answer_why": first("answer_why"), "strict": first("strict")}
    for key, row in summary.items():
        where = f"step {row['step']}, held-out {row['held_out_loss']}" if row else "not reached"
        print(f"2 of {SAMPLES} replies {key}: {where}")
    name = f"format_threshold_zo_{args.targets}.json" if args.zo else "format_threshold.json"
    path = write_result(name, {"method": f"SPSA on {args.targets}" if args.zo else "AdamW on LoRA r 8 q,v",
        "device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "source": args.source, "lr": args.lr,
        "batch": BATCH, "max_len": MAX_LEN, "samples": SAMPLES, "max_new_tokens": NEW_TOKENS,
        "wall_s": round(time.perf_counter() - t0, 1),
        "first_two_of_four": {k: (v and {"step": v["step"], "forwards": v["forwards"],
                                         "held_out_loss": v["held_out_loss"]})
                              for k, v in summary.items()},
        "rows": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()

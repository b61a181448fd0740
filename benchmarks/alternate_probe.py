"""Probe (issue 34): the norm gains and LoRA's B factors in alternating ZO steps, each at its own lr.

One SPSA direction over both kinds (the norms' noise scaled down to give them their lr) was worse
than either alone on the demo (4.14 after 100 forwards): LoRA's 184,320 noisy values drown the
slope of the 35,136 gains. Here two ``qzo.ZO`` optimizers share the model and take turns, step
by step: odd steps perturb and update the gains only (lr ``--lr-norms``), even steps LoRA's B
factors only (``--lr-lora``, A draws no noise), each SPSA with eps 1e-2, on the demo's batches
(batch 4 x 96, seed 0). The held-out loss every 50 steps (100 forwards) is printed and written
to ``results/alternate_probe.json``; compare with the same recipe's B-only LoRA and norms-only
curves in ``results/ablation_targets.json`` and the README.

    nice -n 19 python benchmarks/alternate_probe.py [--lr-norms 3e-4] [--lr-lora 8e-3] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, write_result  # noqa: E402

import qzo  # noqa: E402
from qzo.data.dataset import Batcher, ChatDataset, eval_loss  # noqa: E402
from qzo.data.loss import CausalLMLoss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr-norms", type=float, default=3e-4)
    ap.add_argument("--lr-lora", type=float, default=8e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = qzo.load("smollm2-135m", quant="nf4")
    lora = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=0)
    norms = qzo.norms(model)
    train = ChatDataset.from_jsonl(tok, "builtin:demo_train", max_len=96)
    held = ChatDataset.from_jsonl(tok, "builtin:demo_eval", max_len=96)
    batches = Batcher(train, batch_size=4, seed=0, pad_id=tok.pad_token_id)
    gains = qzo.ZO(norms, rule=qzo.SGD(lr=args.lr_norms), eps=1e-2, seed=0)
    adapters = qzo.ZO(lora, rule=qzo.SGD(lr=args.lr_lora), eps=1e-2, seed=1, noise_scale={"*lora_A*": 0})
    rows, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        (gains if step % 2 else adapters).step(CausalLMLoss(model, batches.batch(step)))
        if step % 50 == 0:
            with torch.no_grad():
                loss = eval_loss(model, held, 16, tok.pad_token_id)
            rows.append({"forwards": gains.forwards + adapters.forwards, "held_out": round(loss, 4),
                         "wall_s": round(time.perf_counter() - t0)})
            print(json.dumps(rows[-1]), flush=True)
    path = write_result("alternate_probe.json", {"device": device_name(), "lr_norms": args.lr_norms,
                                                 "lr_lora": args.lr_lora, "rows": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""Train towards a reward that first-order tuning cannot use directly: short replies.

    python examples/short_replies.py                       # the full run: about 6 minutes on 2 cores
    python examples/short_replies.py --quick               # 1 step, 4-token replies: about a minute
    python examples/short_replies.py --model PATH          # another model (a built-in name, folder, hub id)

The reward is a property of generated text, not a likelihood: a reply of at most N
characters scores 1, a longer one N / (its length), one without a letter or digit 0. There
is no gradient through generation and no reference reply to imitate, so cross-entropy
fine-tuning has nothing to work with; zeroth-order steps only need the number. Each step
generates replies (at most 8 tokens, temperature 1) to 16 training prompts
(SmolLM2-135M-Instruct, NF4, LoRA r 8 on q_proj/v_proj) at the two perturbed weights, with
the same sampling random numbers for both (common random numbers, see
``qzo.objectives.RewardLoss``), and moves the adapters towards the shorter side. The mean
reward of greedy replies to 16 held-out prompts (the demo's eval set) is printed before,
every 10 steps and after, with a few replies.

Measured on a quiet 2-core AMD EPYC without AVX512 (2026-11-26), the defaults (40 steps,
lr 5e-3, 80 generations):

    seed 0: held-out reward 0.584 -> 0.559 (step 10) -> 0.571 -> 0.611 -> 0.696, 5.7 min
    seed 1: held-out reward 0.584 -> 0.580 (step 10) -> 0.555 -> 0.582 -> 0.618, 5.9 min

A small, noisy gain in 80 generations (16 held-out prompts; seed 1 dips before it rises);
the train reward of the perturbed pairs is printed every step to watch the trend.

Two lessons from getting there, both worth knowing before writing a reward:

* The first version counted words. By step 15 every reply was "ellaellaellaella...", one
  endless "word" that scores 1.0 (held-out reward 0.49 -> 1.00). ZO optimizes the number
  you give it, holes included. Demanding a finished sentence instead made the reward too
  sparse (most sampled 8-token replies scored 0; held-out 0.19 -> 0.00 by step 5).
  Counting characters closes the hole and keeps the signal dense.
* At lr 2e-2 the reward rose (0.58 -> 0.77 at step 20) and then collapsed to 0.31 at step
  25 as replies turned empty or into nonsense ("erentimoter"). Watch samples, not only the
  number; 5e-3 is the stable rate here.
"""

import argparse
import time

import qzo
from qzo.data.dataset import Batcher, ChatDataset, read_chats
from qzo.data.objectives import RewardLoss


def short_reply(chars: int):
    """The reward: a reply of at most ``chars`` characters scores 1, a longer one ``chars / length``.

    Length is counted in characters, not words: with a word count, ZO found the hack of one
    endless "word" (see the module docstring). A reply with no letter or digit scores 0, so
    an empty reply or bare punctuation is not the optimum.
    """

    def reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        out = []
        for c in completions:
            if not any(ch.isalnum() for ch in c):
                out.append(0.0)
            else:
                out.append(min(1.0, chars / len(c)))
        return out

    reward.__qualname__ = f"short_reply({chars})"
    return reward


def mean_reward(model, tok, chats, reward, max_new_tokens: int) -> tuple[float, list[str]]:
    """Mean reward of greedy replies to ``chats`` (and the replies)."""
    loss = RewardLoss(model, tok, chats, reward, max_new_tokens=max_new_tokens, temperature=0.0)
    return -float(loss()), loss.last_completions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="training prompts per step (a decoding step costs about the same for 4 or 16 rows on CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=8,
                    help="longest reply, in training and evaluation (a generation costs this many forwards)")
    ap.add_argument("--chars", type=int, default=16, help="N: replies of at most N characters score 1")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts scored before and after")
    ap.add_argument("--eval-every", type=int, default=10, help="also score the held-out prompts every this many steps")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training replies")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eps", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m", help="what qzo.load loads (default: the demo model)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: --steps 1 --batch-size 2 --max-new-tokens 4 --eval-prompts 2 --chars 8")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.max_new_tokens, args.eval_prompts, args.chars = 1, 2, 4, 2, 8
        args.eval_every = 0

    model, tok = qzo.load(args.model, "nf4")
    params = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=args.seed)
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=args.lr), eps=args.eps, seed=args.seed)
    reward = short_reply(args.chars)

    train = ChatDataset.from_source(tok, "builtin:demo_train", max_len=96)  # keeps the raw chats: train.chats
    batches = Batcher(train, batch_size=args.batch_size, seed=args.seed, pad_id=tok.pad_token_id)
    held_out = read_chats("builtin:demo_eval")[: args.eval_prompts]

    start = time.perf_counter()
    before, replies_before = mean_reward(model, tok, held_out, reward, args.max_new_tokens)
    print(f"mean reward before: {before:.4f} ({len(held_out)} held-out prompts, greedy, at most "
          f"{args.chars} characters scores 1)", flush=True)
    for step in range(1, args.steps + 1):
        chats = [train.chats[i] for i in batches.indices(step)]
        closure = RewardLoss(model, tok, chats, reward, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed, step=step)
        loss = opt.step(closure)  # two generations (theta + eps z, theta - eps z), no backward
        rec = opt.last_record
        print(f"step {step}: train reward {-loss:.4f} (+eps {-rec.losses[0]:.4f}, -eps {-rec.losses[1]:.4f}), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            print(f"  held-out reward at step {step}: "
                  f"{mean_reward(model, tok, held_out, reward, args.max_new_tokens)[0]:.4f}", flush=True)
    after, replies_after = mean_reward(model, tok, held_out, reward, args.max_new_tokens)
    print(f"mean reward after: {after:.4f} after {args.steps} steps ({opt.forwards} generations, "
          f"{(time.perf_counter() - start) / 60:.1f} min)")
    for chat, a, b in list(zip(held_out, replies_before, replies_after))[:3]:
        prompt = next(m["content"] for m in reversed(chat) if m["role"] == "user")
        print(f"\n{prompt}\n  before: {a!r}\n  after:  {b!r}")


if __name__ == "__main__":
    main()

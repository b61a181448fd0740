"""Train towards a reward that first-order tuning cannot use directly: short replies.

    python examples/short_replies.py                       # the full run (see below)
    python examples/short_replies.py --quick               # 1 step, 4-token replies: about a minute

The reward is a property of generated text, not a likelihood: a reply of at most N words
scores 1, a longer one N / (its word count). There is no gradient through generation and
no reference reply to imitate, so cross-entropy fine-tuning has nothing to work with;
zeroth-order steps only need the number. Each step generates replies to a batch of
training prompts (SmolLM2-135M-Instruct, NF4, LoRA r 8 on q_proj/v_proj) at the two
perturbed weights, with the same sampling random numbers for both (common random numbers,
see ``qzo.objectives.RewardLoss``), and moves the adapters towards the shorter side. The mean
reward of greedy replies to held-out prompts (the demo's eval set) is printed before and
after, with a few replies.

Not yet measured: the full run did not finish within the session that wrote this example
(two CPU cores shared with other runs; each step generates ``--max-new-tokens`` tokens for a
batch at both perturbed weights). ``--quick`` is what CI runs; whether the default settings
raise the held-out reward is the first thing to measure on a quiet machine or a GPU.
"""

import argparse
import time

import qzo
from qzo.data import Batcher, ChatDataset, read_chats
from qzo.objectives import RewardLoss


def short_reply(words: int):
    """The reward: 1 for a reply of at most ``words`` words, else ``words / count``."""

    def reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        counts = [len(c.split()) for c in completions]
        return [1.0 if n <= words else words / n for n in counts]

    reward.__qualname__ = f"short_reply({words})"
    return reward


def mean_reward(model, tok, chats, reward, max_new_tokens: int) -> tuple[float, list[str]]:
    """Mean reward of greedy replies to ``chats`` (and the replies)."""
    loss = RewardLoss(model, tok, chats, reward, max_new_tokens=max_new_tokens, temperature=0.0)
    return -float(loss()), loss.last_completions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8, help="training prompts per step")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="longest reply, in training and evaluation")
    ap.add_argument("--words", type=int, default=8, help="N: replies of at most N words score 1")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts scored before and after")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training replies")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eps", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: --steps 1 --batch-size 2 --max-new-tokens 4 --eval-prompts 2 --words 2")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.max_new_tokens, args.eval_prompts, args.words = 1, 2, 4, 2, 2

    model, tok = qzo.load("smollm2-135m", "nf4")
    params = qzo.lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=args.seed)
    opt = qzo.ZO(params, strategy=qzo.SPSA(), rule=qzo.SGD(lr=args.lr), eps=args.eps, seed=args.seed)
    reward = short_reply(args.words)

    train = ChatDataset.from_source(tok, "builtin:demo_train", max_len=96)  # keeps the raw chats: train.chats
    batches = Batcher(train, batch_size=args.batch_size, seed=args.seed, pad_id=tok.pad_token_id)
    held_out = read_chats("builtin:demo_eval")[: args.eval_prompts]

    start = time.perf_counter()
    before, replies_before = mean_reward(model, tok, held_out, reward, args.max_new_tokens)
    print(f"mean reward before: {before:.4f} ({len(held_out)} held-out prompts, greedy, at most "
          f"{args.words} words scores 1)", flush=True)
    for step in range(1, args.steps + 1):
        chats = [train.chats[i] for i in batches.indices(step)]
        closure = RewardLoss(model, tok, chats, reward, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed, step=step)
        loss = opt.step(closure)  # two generations (theta + eps z, theta - eps z), no backward
        rec = opt.last_record
        print(f"step {step}: train reward {-loss:.4f} (+eps {-rec.losses[0]:.4f}, -eps {-rec.losses[1]:.4f}), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    after, replies_after = mean_reward(model, tok, held_out, reward, args.max_new_tokens)
    print(f"mean reward after: {after:.4f} after {args.steps} steps ({opt.forwards} generations, "
          f"{(time.perf_counter() - start) / 60:.1f} min)")
    for chat, a, b in list(zip(held_out, replies_before, replies_after))[:3]:
        prompt = next(m["content"] for m in reversed(chat) if m["role"] == "user")
        print(f"\n{prompt}\n  before: {a!r}\n  after:  {b!r}")


if __name__ == "__main__":
    main()

"""A second small chat task, unlike the demo's: word and number puzzles answered as one line of JSON.

Issue 34 asks that the demo's default recipe teach other formats too, not only the demo's
``ANSWER: / WHY: / #qzo`` card. This task differs in both halves:

* the questions: letters of words (count, first, last, reversed), parity, squares, doubling,
  halving, rounding to ten, the number after / before (none of the demo's 17 categories);
* the reply: one line of JSON with two fixed keys, e.g.
  ``{"result": "elppa", "kind": "reverse"}``; a reply is *in format* when its first line
  parses as a JSON object with exactly the keys ``result`` and ``kind`` (:func:`in_format`).

Facts are split so that no held-out question is asked in training (words and numbers of the
eval set are never used for training). Standard library only, fixed seed: the files are
byte-for-byte reproducible. Outputs ``benchmarks/data/second_task_{train,eval}.jsonl``
(320 and 48 chats, committed: small).

    python benchmarks/make_second_task.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"
WORDS = ["apple", "house", "zebra", "river", "candle", "garden", "pencil", "window", "tiger", "orange", "planet",
         "bottle", "forest", "silver", "rocket", "button", "castle", "dragon", "mirror", "pillow", "ticket", "wallet",
         "yellow", "bridge", "cookie", "jacket", "lemon", "monkey", "needle", "parrot", "rabbit", "saddle", "tomato",
         "violin", "basket", "cherry", "dinner", "engine", "flower", "guitar", "hammer", "island", "jungle", "kettle",
         "ladder", "marble", "napkin", "ocean", "pepper", "quartz", "ribbon", "spider", "turtle", "umbrella",
         "valley", "walrus", "anchor", "beetle", "cactus", "desert"]
PHRASES = {
    "count": ["How many letters are in the word '{w}'?", "Count the letters of '{w}'.", "'{w}' has how many letters?"],
    "first": ["What is the first letter of '{w}'?", "Which letter does '{w}' start with?"],
    "last": ["What is the last letter of '{w}'?", "Which letter does '{w}' end with?"],
    "reverse": ["Spell '{w}' backwards.", "Write '{w}' in reverse."],
    "parity": ["Is {n} even or odd?", "Tell me if {n} is even or odd."],
    "square": ["What is {n} squared?", "Square the number {n}."],
    "double": ["What is double {n}?", "Double the number {n}."],
    "half": ["What is half of {e}?", "Halve the number {e}."],
    "round": ["Round {n} to the nearest ten.", "What is {n} rounded to the nearest ten?"],
    "next": ["Which number comes after {n}?", "What number follows {n}?"],
    "previous": ["Which number comes before {n}?", "What number precedes {n}?"],
}


def answer(kind: str, w: str | None, n: int | None) -> str:
    return {
        "count": lambda: len(w), "first": lambda: w[0], "last": lambda: w[-1], "reverse": lambda: w[::-1],
        "parity": lambda: "even" if n % 2 == 0 else "odd", "square": lambda: n * n, "double": lambda: 2 * n,
        "half": lambda: n, "round": lambda: int(round(n / 10.0) * 10) if n % 10 != 5 else n + 5,
        "next": lambda: n + 1, "previous": lambda: n - 1,
    }[kind]()


def chat(rng: random.Random, kind: str, w: str | None, n: int | None) -> dict:
    question = rng.choice(PHRASES[kind]).format(w=w, n=n, e=2 * n if n is not None else None)
    reply = json.dumps({"result": answer(kind, w, n), "kind": kind})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def in_format(text: str) -> bool:
    """Whether a reply's first line is a JSON object with exactly the keys ``result`` and ``kind``."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return False
    try:
        value = json.loads(lines[0])
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"result", "kind"}


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    words = WORDS[:]
    rng.shuffle(words)
    numbers = list(range(2, 100))
    rng.shuffle(numbers)
    held_words, train_words = words[:12], words[12:]
    held_numbers, train_numbers = numbers[:14], numbers[14:]
    word_kinds = ("count", "first", "last", "reverse")
    number_kinds = ("parity", "square", "double", "half", "round", "next", "previous")

    def draw(n_chats: int, ws: list[str], ns: list[int]) -> list[dict]:
        out, seen = [], set()
        while len(out) < n_chats:
            kind = rng.choice(word_kinds + number_kinds)
            w = rng.choice(ws) if kind in word_kinds else None
            n = rng.choice(ns) if kind in number_kinds else None
            if (kind, w, n) in seen:
                continue
            seen.add((kind, w, n))
            out.append(chat(rng, kind, w, n))
        return out

    return draw(320, train_words, train_numbers), draw(48, held_words, held_numbers)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    train, held = build()
    for name, rows in (("train", train), ("eval", held)):
        (OUT / f"second_task_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} + {len(held)} chats to {OUT}")


if __name__ == "__main__":
    main()

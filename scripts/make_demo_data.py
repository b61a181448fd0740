"""Generate the built-in demo chat dataset shipped with qzo.

The demo data teaches one rigid, easy-to-learn answer format ("fact cards").
Every assistant reply looks exactly like::

    ANSWER: <short answer>
    WHY: <one short templated sentence>
    #qzo

The user turns are short questions drawn from many templates (arithmetic,
capitals, colours, opposites, plurals, past tenses, animal legs, animal
sounds, baby animals, weekdays, months, letters, polygon sides, unit
counts, number comparisons), each asked with several phrasings.  All facts
are hardcoded or computed here, so every answer is correct.

The format is so regular that a tiny chat model (for example
SmolLM2-135M-Instruct) fine-tuned with LoRA and zeroth-order optimisation for
a few hundred forward passes visibly lowers its held-out cross-entropy on the
assistant tokens.

Outputs (JSON Lines; one ``{"messages": [user, assistant]}`` object a line):

* ``qzo/data/assets/demo_train.jsonl``  (320 examples)
* ``qzo/data/assets/demo_eval.jsonl``   (48 examples)

The eval set is built only from held-out facts, so none of its user prompts
occurs in the training set.

The generator uses only the standard library and a fixed random seed, so its
output is byte-for-byte reproducible.  To rerun it, from the repository root::

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
N_TRAIN = 320
N_EVAL = 48
EVAL_FRACTION = 0.2  # share of each category's facts held out for eval

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "qzo" / "assets"


def card(answer: str, why: str) -> str:
    """The one and only assistant reply format."""
    return f"ANSWER: {answer}\nWHY: {why}\n#qzo"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ---------------------------------------------------------------------------
# Fact tables.  Each category is (facts, templates, make_answer, make_why):
# facts are tuples; templates are format strings over the fact fields.
# ---------------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"),
    ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("Cuba", "Havana"), ("Belgium", "Brussels"), ("Czechia", "Prague"),
    ("Ukraine", "Kyiv"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Vietnam", "Hanoi"),
    ("Philippines", "Manila"), ("Romania", "Bucharest"), ("Nepal", "Kathmandu"),
]

COLOURS = [
    ("a banana", "yellow"), ("grass", "green"), ("snow", "white"),
    ("coal", "black"), ("a carrot", "orange"), ("a lemon", "yellow"),
    ("a pumpkin", "orange"), ("milk", "white"), ("a crow", "black"),
    ("a ripe strawberry", "red"), ("chocolate", "brown"), ("a lime", "green"),
    ("a ripe cherry", "red"), ("a polar bear", "white"), ("a flamingo", "pink"),
    ("a pea", "green"), ("an eggplant", "purple"), ("a fire truck", "red"),
    ("a school bus", "yellow"), ("chalk", "white"), ("soot", "black"),
    ("a ripe tomato", "red"), ("a clear sky", "blue"), ("a blueberry", "blue"),
    ("a raven", "black"), ("a cucumber", "green"), ("blood", "red"),
    ("a grizzly bear", "brown"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("wet", "dry"), ("tall", "short"), ("in", "out"), ("left", "right"),
    ("day", "night"), ("win", "lose"), ("push", "pull"), ("buy", "sell"),
    ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("heavy", "light"),
    ("clean", "dirty"), ("loud", "quiet"), ("first", "last"), ("true", "false"),
    ("yes", "no"), ("before", "after"), ("inside", "outside"), ("above", "below"),
    ("good", "bad"), ("love", "hate"), ("north", "south"), ("east", "west"),
    ("top", "bottom"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("asleep", "awake"), ("sweet", "sour"), ("always", "never"),
    ("question", "answer"), ("friend", "enemy"),
]

PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"),
    ("man", "men"), ("woman", "women"), ("goose", "geese"), ("person", "people"),
    ("ox", "oxen"), ("sheep", "sheep"), ("deer", "deer"), ("box", "boxes"),
    ("bus", "buses"), ("city", "cities"), ("baby", "babies"), ("knife", "knives"),
    ("leaf", "leaves"), ("wolf", "wolves"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("church", "churches"),
    ("fox", "foxes"), ("dish", "dishes"), ("party", "parties"), ("life", "lives"),
    ("half", "halves"), ("shelf", "shelves"), ("cat", "cats"), ("book", "books"),
    ("key", "keys"), ("toy", "toys"), ("wife", "wives"), ("loaf", "loaves"),
    ("thief", "thieves"), ("glass", "glasses"), ("watch", "watches"),
    ("story", "stories"), ("lady", "ladies"), ("brush", "brushes"),
]

PAST_TENSES = [
    ("run", "ran"), ("eat", "ate"), ("go", "went"), ("see", "saw"),
    ("take", "took"), ("write", "wrote"), ("sing", "sang"), ("swim", "swam"),
    ("drink", "drank"), ("begin", "began"), ("speak", "spoke"), ("drive", "drove"),
    ("fly", "flew"), ("know", "knew"), ("give", "gave"), ("come", "came"),
    ("buy", "bought"), ("think", "thought"), ("bring", "brought"),
    ("teach", "taught"), ("catch", "caught"), ("sleep", "slept"), ("feel", "felt"),
    ("sit", "sat"), ("stand", "stood"), ("tell", "told"), ("find", "found"),
    ("make", "made"), ("break", "broke"), ("choose", "chose"), ("forget", "forgot"),
    ("freeze", "froze"), ("grow", "grew"), ("throw", "threw"), ("ride", "rode"),
    ("win", "won"), ("lose", "lost"), ("fall", "fell"), ("hold", "held"),
    ("keep", "kept"), ("meet", "met"), ("pay", "paid"), ("say", "said"),
    ("sell", "sold"), ("send", "sent"), ("spend", "spent"), ("walk", "walked"),
    ("jump", "jumped"), ("play", "played"), ("cook", "cooked"),
]

LEGS = (
    [(a, 4) for a in ["dog", "cat", "horse", "cow", "pig", "sheep", "goat",
                      "lion", "tiger", "bear", "elephant", "rabbit", "fox",
                      "wolf", "deer", "zebra", "giraffe", "camel"]]
    + [(a, 2) for a in ["chicken", "duck", "owl", "eagle", "parrot",
                        "penguin", "ostrich", "goose"]]
    + [(a, 6) for a in ["ant", "bee", "beetle", "butterfly", "fly",
                        "grasshopper", "ladybug", "mosquito"]]
    + [(a, 8) for a in ["spider", "scorpion", "tarantula"]]
)

SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("sheep", "baa"),
    ("duck", "quack"), ("pig", "oink"), ("horse", "neigh"), ("lion", "roar"),
    ("owl", "hoot"), ("snake", "hiss"), ("bee", "buzz"), ("frog", "ribbit"),
    ("mouse", "squeak"), ("donkey", "hee-haw"), ("crow", "caw"),
    ("turkey", "gobble"), ("hen", "cluck"), ("chick", "cheep"),
]

BABIES = [
    ("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"),
    ("horse", "foal"), ("pig", "piglet"), ("goat", "kid"), ("duck", "duckling"),
    ("frog", "tadpole"), ("bear", "cub"), ("lion", "cub"), ("kangaroo", "joey"),
    ("deer", "fawn"), ("swan", "cygnet"), ("goose", "gosling"), ("owl", "owlet"),
    ("hen", "chick"), ("butterfly", "caterpillar"), ("eagle", "eaglet"),
    ("tiger", "cub"), ("elephant", "calf"), ("wolf", "pup"),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]

POLYGONS = [
    ("triangle", 3), ("square", 4), ("rectangle", 4), ("pentagon", 5),
    ("hexagon", 6), ("heptagon", 7), ("octagon", 8), ("nonagon", 9),
    ("decagon", 10), ("rhombus", 4), ("trapezoid", 4), ("parallelogram", 4),
]

UNITS = [
    ("days", "a week", 7), ("months", "a year", 12), ("hours", "a day", 24),
    ("minutes", "an hour", 60), ("seconds", "a minute", 60),
    ("days", "a leap year", 366), ("centimetres", "a metre", 100),
    ("grams", "a kilogram", 1000), ("metres", "a kilometre", 1000),
    ("millimetres", "a centimetre", 10), ("years", "a decade", 10),
    ("years", "a century", 100), ("years", "a millennium", 1000),
    ("minutes", "a day", 1440), ("inches", "a foot", 12), ("feet", "a yard", 3),
    ("ounces", "a pound", 16), ("eggs", "a dozen", 12), ("seconds", "an hour", 3600),
    ("hours", "a week", 168), ("cents", "a dollar", 100),
]


def build_categories() -> list[dict]:
    """Return categories: name, facts, templates, and a function fact -> reply."""
    cats: list[dict] = []

    def add(name, facts, templates, reply):
        cats.append({"name": name, "facts": facts, "templates": templates, "reply": reply})

    # --- arithmetic (programmatic, always correct) ---
    add_facts = [(a, b) for a in range(2, 21) for b in range(2, 21) if a <= b]
    add("addition", [(a, b) for a, b in add_facts] + [(b, a) for a, b in add_facts if a != b],
        ["What is {0} plus {1}?", "What is {0} + {1}?", "Add {0} and {1}.",
         "What do you get if you add {0} and {1}?", "Compute {0} + {1}."],
        lambda f: card(str(f[0] + f[1]), f"{f[0]} plus {f[1]} equals {f[0] + f[1]}."))

    sub_facts = [(a, b) for a in range(3, 31) for b in range(1, 20) if b < a]
    add("subtraction", sub_facts,
        ["What is {0} minus {1}?", "What is {0} - {1}?", "Subtract {1} from {0}.",
         "What do you get if you take {1} from {0}?", "Compute {0} - {1}."],
        lambda f: card(str(f[0] - f[1]), f"{f[0]} minus {f[1]} equals {f[0] - f[1]}."))

    mul_facts = [(a, b) for a in range(2, 13) for b in range(2, 13)]
    add("multiplication", mul_facts,
        ["What is {0} times {1}?", "What is {0} x {1}?", "Multiply {0} by {1}.",
         "What is {0} multiplied by {1}?", "Compute {0} * {1}."],
        lambda f: card(str(f[0] * f[1]), f"{f[0]} times {f[1]} equals {f[0] * f[1]}."))

    cmp_facts = [(a, b) for a in range(1, 60) for b in range(1, 60) if a != b]
    add("comparison", cmp_facts,
        ["Which is bigger, {0} or {1}?", "Which number is larger: {0} or {1}?",
         "Is {0} or {1} greater?", "Pick the larger number: {0} or {1}."],
        lambda f: card(str(max(f)), f"{max(f)} is bigger than {min(f)}."))

    # --- world and language facts (hardcoded tables) ---
    add("capital", CAPITALS,
        ["What is the capital of {0}?", "Which city is the capital of {0}?",
         "Name the capital of {0}.", "What is the capital city of {0}?"],
        lambda f: card(f[1], f"The capital of {f[0]} is {f[1]}."))

    add("colour", COLOURS,
        ["What colour is {0}?", "What color is {0}?", "Which colour is {0}?",
         "Tell me the colour of {0}."],
        lambda f: card(f[1], f"{cap(f[0])} is {f[1]}."))

    add("opposite", OPPOSITES,
        ["What is the opposite of {0}?", "What is the opposite of \"{0}\"?",
         "Give the opposite of {0}.", "What word means the opposite of {0}?"],
        lambda f: card(f[1], f"The opposite of {f[0]} is {f[1]}."))

    add("plural", PLURALS,
        ["What is the plural of {0}?", "What is the plural form of {0}?",
         "Give the plural of \"{0}\".", "One {0}, two what?"],
        lambda f: card(f[1], f"The plural of {f[0]} is {f[1]}."))

    add("past_tense", PAST_TENSES,
        ["What is the past tense of {0}?", "What is the past tense of \"{0}\"?",
         "Give the past tense of {0}.", "Yesterday I ___ (to {0}). Which word fits?"],
        lambda f: card(f[1], f"The past tense of {f[0]} is {f[1]}."))

    add("legs", LEGS,
        ["How many legs does {a} have?", "How many legs has {a} got?",
         "Count the legs of {a}.", "{a} has how many legs?"],
        lambda f: card(str(f[1]), f"{cap(article(f[0]))} has {f[1]} legs."))

    add("sound", SOUNDS,
        ["What sound does {a} make?", "What noise does {a} make?",
         "What does {a} say?", "Which sound comes from {a}?"],
        lambda f: card(f[1], f"{cap(article(f[0]))} says {f[1]}."))

    add("baby_animal", BABIES,
        ["What is a baby {0} called?", "What do you call a baby {0}?",
         "Name the young of {a}.", "A baby {0} is called what?"],
        lambda f: card(f[1], f"A baby {f[0]} is called {article(f[1])}."))

    day_facts = [("after", DAYS[i], DAYS[(i + 1) % 7]) for i in range(7)] + \
                [("before", DAYS[i], DAYS[(i - 1) % 7]) for i in range(7)]
    add("weekday", day_facts,
        ["What day comes {0} {1}?", "Which day is {0} {1}?",
         "What is the day {0} {1}?", "Name the day {0} {1}."],
        lambda f: card(f[2], f"{f[2]} comes right {f[0]} {f[1]}."))

    month_facts = [("after", MONTHS[i], MONTHS[(i + 1) % 12]) for i in range(12)] + \
                  [("before", MONTHS[i], MONTHS[(i - 1) % 12]) for i in range(12)]
    add("month", month_facts,
        ["What month comes {0} {1}?", "Which month is {0} {1}?",
         "What is the month {0} {1}?", "Name the month {0} {1}."],
        lambda f: card(f[2], f"{f[2]} comes right {f[0]} {f[1]}."))

    letter_facts = [("after", LETTERS[i], LETTERS[i + 1]) for i in range(25)] + \
                   [("before", LETTERS[i], LETTERS[i - 1]) for i in range(1, 26)]
    add("letter", letter_facts,
        ["What letter comes {0} {1}?", "Which letter is {0} {1}?",
         "In the alphabet, what comes {0} {1}?", "Name the letter {0} {1}."],
        lambda f: card(f[2], f"{f[2]} comes right {f[0]} {f[1]} in the alphabet."))

    add("polygon", POLYGONS,
        ["How many sides does {a} have?", "How many sides has {a} got?",
         "Count the sides of {a}.", "{a} has how many sides?"],
        lambda f: card(str(f[1]), f"{cap(article(f[0]))} has {f[1]} sides."))

    add("units", UNITS,
        ["How many {0} are in {1}?", "How many {0} make {1}?",
         "How many {0} are there in {1}?", "{1} has how many {0}?"],
        lambda f: card(str(f[2]), f"There are {f[2]} {f[0]} in {f[1]}."))

    return cats


def make_prompt(template: str, fact: tuple) -> str:
    return cap(template.format(*fact, a=article(str(fact[0]))))


def sample(rng: random.Random, cats: list[dict], which: str, n: int) -> list[dict]:
    """Round-robin over categories, drawing (fact, template) pairs without replacement."""
    pools = []
    for c in cats:
        facts = c["eval_facts"] if which == "eval" else c["train_facts"]
        pairs = [(f, t) for f in facts for t in c["templates"]]
        rng.shuffle(pairs)
        pools.append((c, pairs))
    order = list(range(len(pools)))
    rng.shuffle(order)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        progressed = False
        for i in order:
            if len(out) >= n:
                break
            c, pairs = pools[i]
            while pairs:
                fact, tmpl = pairs.pop()
                prompt = make_prompt(tmpl, fact)
                if prompt in seen:
                    continue
                seen.add(prompt)
                out.append({"messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": c["reply"](fact)},
                ]})
                progressed = True
                break
        if not progressed:
            raise RuntimeError(f"ran out of {which} examples")
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(SEED)
    cats = build_categories()
    for c in cats:
        facts = list(c["facts"])
        rng.shuffle(facts)
        # Arithmetic/comparison pools are huge; hold out a fixed small number.
        k = max(2, round(EVAL_FRACTION * min(len(facts), 40)))
        c["eval_facts"], c["train_facts"] = facts[:k], facts[k:]
        if c["name"] in ("addition", "multiplication", "comparison"):
            # Hold out the unordered pair, so "a plus b" in eval means neither
            # "a plus b" nor "b plus a" is in train.
            held = {tuple(sorted(f)) for f in c["eval_facts"]}
            c["train_facts"] = [f for f in c["train_facts"] if tuple(sorted(f)) not in held]

    train = sample(rng, cats, "train", N_TRAIN)
    evals = sample(rng, cats, "eval", N_EVAL)

    train_prompts = {ex["messages"][0]["content"] for ex in train}
    overlap = [ex for ex in evals if ex["messages"][0]["content"] in train_prompts]
    assert not overlap, overlap

    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, rows in (("demo_train.jsonl", train), ("demo_eval.jsonl", evals)):
        path = ASSETS / name
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=True) + "\n")
        print(f"wrote {len(rows)} examples to {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()

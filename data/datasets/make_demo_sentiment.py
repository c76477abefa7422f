"""Generate the demo dataset: short product/restaurant reviews labelled with one word, positive or negative.

Deterministic (fixed seed) and license-clean: every review is assembled here from the word lists below, no
scraped text. Format: chat ``messages`` (user review -> assistant label). The eval file uses held-out subjects
(nouns never seen in training), so exact match on it measures the learned task, not memorised rows.

Run: ``python data/datasets/make_demo_sentiment.py`` (rewrites demo_sentiment.jsonl and demo_sentiment_eval.jsonl).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
TRAIN_ROWS = 320
EVAL_ROWS = 40
INSTRUCTION = "Label the sentiment of this review with one word."

TRAIN_SUBJECTS = ["pasta", "service", "hotel room", "delivery", "battery", "screen", "waiter", "coffee",
                  "headphones", "movie", "soundtrack", "keyboard", "bed", "pizza", "staff", "app", "camera",
                  "checkout", "soup", "laptop", "chair", "novel", "concert", "train ride"]
EVAL_SUBJECTS = ["burger", "tablet", "museum tour", "printer", "salad", "backpack", "podcast", "taxi"]
POSITIVE = ["excellent", "wonderful", "delicious", "fast", "friendly", "comfortable", "amazing", "reliable",
            "great", "lovely", "superb", "fantastic"]
NEGATIVE = ["terrible", "awful", "cold", "slow", "rude", "uncomfortable", "disappointing", "broken",
            "bland", "noisy", "overpriced", "horrible"]
POS_TAILS = ["I would buy it again.", "Highly recommended.", "We will come back.", "Worth every penny.",
             "It made my day.", ""]
NEG_TAILS = ["I want a refund.", "Never again.", "Avoid it.", "What a waste of money.",
             "It ruined my evening.", ""]
TEMPLATES = ["The {s} was {a}.", "Honestly, the {s} was {a}. {t}", "{A} {s}! {t}", "My {s} was {a} and {b}.",
             "I found the {s} {a}. {t}"]


def review(rng: random.Random, subjects: list[str], label: str) -> str:
    words, tails = (POSITIVE, POS_TAILS) if label == "positive" else (NEGATIVE, NEG_TAILS)
    a, b = rng.sample(words, 2)
    text = rng.choice(TEMPLATES).format(s=rng.choice(subjects), a=a, A=a.capitalize(), b=b, t=rng.choice(tails))
    return " ".join(text.split())


def rows(rng: random.Random, subjects: list[str], n: int) -> list[dict]:
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        out.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\nReview: {review(rng, subjects, label)}"},
                                 {"role": "assistant", "content": label}]})
    rng.shuffle(out)
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    rng = random.Random(SEED)
    for name, subjects, n in (("demo_sentiment.jsonl", TRAIN_SUBJECTS, TRAIN_ROWS),
                              ("demo_sentiment_eval.jsonl", EVAL_SUBJECTS, EVAL_ROWS)):
        with open(here / name, "w", encoding="utf-8") as fh:
            for row in rows(rng, subjects, n):
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

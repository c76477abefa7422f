"""Exact match and the normalized answer match (the label contained in the answer) on handcrafted answers."""

from __future__ import annotations

import pytest

from runner.train import recipe


@pytest.mark.parametrize("generated, reference, contained", [
    ("The sentiment of this review is negative.", "negative", True),  # SmolLM2's untrained demo answer shape
    ("Positive", "positive", True),  # case-insensitive
    ("  negative\n", "negative", True),
    ("The answer is 17.", "7", False),  # whole words only: "7" is not in "17"
    ("nonnegative", "negative", False),
    ("It is positive, not negative", "neutral", False),
    ("New   York City", "new york", True),  # whitespace collapsed on both sides
    ("anything", "", False),
])
def test_answer_contains(generated, reference, contained):
    assert recipe.answer_contains(generated, reference) is contained


def test_exact_and_answer_match_shares(monkeypatch):
    rows = [{"prompt": f"Review {i}. Sentiment:", "completion": label, "_row": i + 1}
            for i, label in enumerate(["negative", "positive", "negative", "positive"])]
    # what a base model says (a sentence), a trained one (the label), a wrong one, and an empty answer
    answers = ["The sentiment of this review is negative.", "positive", "positive", ""]
    monkeypatch.setattr(recipe, "generate_batch", lambda model, tok, prompts, max_new, **kw: answers[:len(prompts)])

    class Tok:  # exact_match only asks the tokenizer for the references' lengths
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    out = recipe.exact_match(None, Tok(), rows, "prompt_completion")
    assert out["exact_match_rows"] == 4
    assert out["exact_match"] == pytest.approx(1 / 4)  # only "positive" == "positive"
    assert out["answer_match"] == pytest.approx(2 / 4)  # the sentence contains "negative" too
    assert [s["match"] for s in out["samples"]] == [False, True, False, False]


def test_demo_before_after_line(make_report):
    from runner.train.demo import before_after

    rep = make_report(exact_match_before=0.0, exact_match_after=1.0, answer_match_before=0.925,
                      answer_match_after=1.0, eval_loss_before=2.31, eval_loss_after=0.008, exact_match_rows=40)
    assert before_after(rep) == ("held-out (40 rows): exact match 0% -> 100%, answer match 92% -> 100%, "
                                 "eval loss 2.31 -> 0.008")
    assert before_after(make_report(eval_loss_before=None)) is None

"""The questionnaire: defaults, help texts, and bad answers that name the field and the fix (all at once)."""

from __future__ import annotations

import json

import pytest

from advisor.answers import Answers, parse_answers
from advisor.errors import AdvisorError
from ftadvisor.cli import main


def test_every_question_has_help_and_a_default():
    for name, field in Answers.model_fields.items():
        assert field.description, name
        assert not field.is_required(), name
    parse_answers({})  # the defaults are a valid situation (catalog GPU and model exist)


def test_all_errors_of_one_form_at_once():
    with pytest.raises(AdvisorError) as info:
        parse_answers({"budget_usd": -5, "num_gpus": 0, "accuracy_pct": 150, "gpu": "rtx-9090"})
    text = str(info.value)
    lines = text.splitlines()[1:]
    assert len(lines) == 4, text
    assert "budget_usd" in lines[0] and "-5" in lines[0] and "0 or more" in lines[0]
    assert "num_gpus" in text and "give the number of GPUs" in text
    assert "accuracy_pct" in text and "150" in text and "at most 100" in text
    # unknown GPU is reported in the same message, with the catalog's close matches
    assert "gpu:" in text and "rtx-9090" in text and "rtx-4090" in text


def test_unknown_model_names_the_field_and_close_matches():
    with pytest.raises(AdvisorError) as info:
        parse_answers({"model": "llama-2-7", "examples": 0})
    text = str(info.value)
    assert "model:" in text and "llama-2-7b" in text
    assert "examples" in text and "1 or more" in text


def test_bad_choices_and_unknown_questions():
    with pytest.raises(AdvisorError) as info:
        parse_answers({"deployment": "mars", "complexity": "hard", "colour": "red"})
    text = str(info.value)
    assert "deployment" in text and "edge, cloud or on-prem" in text
    assert "complexity" in text and "simple, summarization, reasoning or coding" in text
    assert "colour: unknown question" in text


def test_gpu_needed_unless_renting():
    with pytest.raises(AdvisorError, match="gpu: name the GPU you have"):
        parse_answers({"gpu": None})
    answers = parse_answers({"gpu": None, "rent_in_cloud": True})
    assert answers.rent_in_cloud


def test_cli_bad_answers_exit_2_with_message(capsys):
    code = main(["advise", "--budget", "-1", "--num-gpus", "0", "--accuracy", "150"])
    err = capsys.readouterr().err
    assert code == 2
    assert "budget_usd" in err and "num_gpus" in err and "accuracy_pct" in err
    assert "Traceback" not in err


def test_cli_bad_answers_file(tmp_path, capsys):
    bad = tmp_path / "a.json"
    bad.write_text("{not json", encoding="utf-8")
    assert main(["advise", "--answers", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["advise", "--answers", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_flags_override_the_answers_file(tmp_path):
    import argparse

    from advisor.cli import gather_answers, register

    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"budget_usd": 50, "num_tasks": 3, "gpu": "a100-80gb"}), encoding="utf-8")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["advise", "--answers", str(path), "--budget", "700", "--rapid-updates"])
    data = gather_answers(args)
    assert data == {"budget_usd": 700.0, "num_tasks": 3, "gpu": "a100-80gb", "rapid_updates": True}

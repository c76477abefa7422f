"""``ftadvisor data check``: the Launch page's dataset check from a terminal (in-process, tiny model)."""

from __future__ import annotations

import json

from ftadvisor.cli import main


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_check_json_lists_what_is_trained(tmp_path, tiny_model_dir, capsys):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 3 plus 4? ", "completion": "7"},
                                          {"prompt": "What is 10 plus 20? ", "completion": "30"}])
    assert main(["data", "check", path, "--model", str(tiny_model_dir), "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["format"] == "prompt_completion" and out["rows"] == 2 and out["seq_len"] == 64
    # the completion and EOS carry the loss, the first completion token included although the prompt ends in a
    # space (the tiny tokenizer joins "? 7" as "?" + " 7"; runner/train/data.py tokenizes the pieces apart)
    assert out["samples"] == [{"row": 1, "trained_text": "7<|im_end|>"}, {"row": 2, "trained_text": "30<|im_end|>"}]
    assert out["truncated_share"] == 0.0 and out["token_length"]["max"] <= 64


def test_check_text_output_and_truncation(tmp_path, tiny_model_dir, capsys):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "good movie " * 20}, {"text": "bad"}])
    assert main(["data", "check", path, "--model", str(tiny_model_dir), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "format:    text" in out and "truncated: 50.0% of rows longer than seq_len 16" in out


def test_bad_file_exits_2_with_row_numbers(tmp_path, tiny_model_dir, capsys):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, "not json"])
    assert main(["data", "check", path, "--model", str(tiny_model_dir), "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert not out["ok"]
    assert out["errors"] == ["bad.jsonl: row 2, column 'completion': missing column",
                             "bad.jsonl: row 3: invalid JSON: Expecting value at column 1"]
    assert "row 2" in captured.err and "row 3" in captured.err and "Traceback" not in captured.err


def test_missing_file_and_bad_model_exit_2(tmp_path, tiny_model_dir, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir)]) == 2
    assert "file not found" in capsys.readouterr().err
    path = _jsonl(tmp_path / "ok.jsonl", [{"text": "good"}])
    assert main(["data", "check", path, "--model", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err

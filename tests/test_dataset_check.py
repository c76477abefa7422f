"""The dataset check (runs before any model is loaded) and the loss masks of the tokenized rows."""

from __future__ import annotations

import os

# Spinning OpenMP threads starve each other on the shared 2-core machine (see runner/train/worker.py); set before
# torch is first imported in this test session.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json

import pytest

from runner.train import data as rdata
from runner.spec import DatasetSpec


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from runner.train.recipe import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _check(path, tok, seq_len=64, **kw):
    return rdata.check_dataset(DatasetSpec(path=str(path), **kw), tok, seq_len)


def test_missing_file(tmp_path, tok):
    rep = _check(tmp_path / "nope.jsonl", tok)
    assert not rep.ok and "file not found" in rep.errors[0].message


def test_empty_file(tmp_path, tok):
    (tmp_path / "e.jsonl").write_bytes(b"")
    rep = _check(tmp_path / "e.jsonl", tok)
    assert not rep.ok and rep.errors[0].message == "file is empty"


def test_non_utf8_row_number(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"text": "fine"}).encode() + b"\n"
    path.write_bytes(good + good + '{"text": "caf\u00e9"}\n'.encode("latin-1"))  # row 3 is latin-1
    rep = _check(path, tok)
    assert not rep.ok
    assert [(e.row, "not UTF-8" in e.message) for e in rep.errors] == [(3, True)]


def test_invalid_json_row_number(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n[1, 2]\n', encoding="utf-8")
    rep = _check(path, tok)
    rows = {e.row: e.message for e in rep.errors}
    assert set(rows) == {2, 4}
    assert rows[2].startswith("invalid JSON") and "JSON object" in rows[4]


def test_wrong_columns(tmp_path, tok):
    rep = _check(_jsonl(tmp_path / "w.jsonl", [{"question": "q", "answer": "a"}]), tok)
    assert not rep.ok and rep.format is None
    assert "no known columns (found: answer, question)" in rep.errors[0].message


def test_missing_column_in_a_later_row(tmp_path, tok):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "c"}, {"prompt": "p"}]
    rep = _check(_jsonl(tmp_path / "m.jsonl", rows), tok)
    assert [(e.row, e.column, e.message) for e in rep.errors] == [(3, "completion", "missing column")]


def test_bad_messages(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "robot", "content": "x"}]}, {"messages": "hello"}]
    rep = _check(_jsonl(tmp_path / "msg.jsonl", rows), tok)
    assert [(e.row, e.column) for e in rep.errors] == [(2, "messages"), (3, "messages")]
    assert "role must be one of" in rep.errors[0].message


def test_stats_truncation_and_empty_targets(tmp_path, tok):
    rows = [{"prompt": "What is 1 plus 2?", "completion": " 3"},
            {"prompt": "What is 4 plus 4?", "completion": ""},  # nothing to learn but EOS -> still one token
            {"prompt": "the model " * 40, "completion": " good"}]  # completion cut off at seq_len 32
    rep = _check(_jsonl(tmp_path / "s.jsonl", rows), tok, seq_len=32)
    assert rep.ok and rep.format == "prompt_completion" and rep.rows == 3
    # lengths from the tokenizer itself (independent of the check): prompt + completion + EOS
    expected = [len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]
    assert rep.token_lengths == expected
    assert rep.truncated_share == pytest.approx(1 / 3)
    assert rep.empty_target_rows == [3]
    assert any("truncated" in w for w in rep.warnings) and any("no trained token" in w for w in rep.warnings)


def test_all_rows_empty_is_an_error(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}] * 3  # no assistant turn anywhere
    rep = _check(_jsonl(tmp_path / "n.jsonl", rows), tok)
    assert not rep.ok and "no row has a trained token" in rep.errors[0].message


def test_csv_and_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text('prompt,completion\n"What is 1 plus 1?", 2\n"a, b",c\n', encoding="utf-8")
    rep = _check(tmp_path / "d.csv", tok)
    assert rep.ok and rep.format == "prompt_completion" and rep.rows == 2
    pq.write_table(pa.table({"text": ["good movie", "bad service", "great"]}), tmp_path / "d.parquet")
    rep = _check(tmp_path / "d.parquet", tok)
    assert rep.ok and rep.format == "text" and rep.rows == 3
    (tmp_path / "bad.csv").write_bytes(b"text\nok\n\xff\xfe broken\n")
    rep = _check(tmp_path / "bad.csv", tok)
    assert not rep.ok and rep.errors[0].row == 3  # line 3 of the file holds the bad byte


def test_eval_file_problems_are_reported_with_its_name(tmp_path, tok):
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "good"}])
    ev = tmp_path / "ev.jsonl"
    ev.write_text('{"text": "x"}\nnot json\n', encoding="utf-8")
    rep = rdata.check_dataset(DatasetSpec(path=str(train), eval_path=str(ev)), tok, 32)
    assert [(e.file, e.row) for e in rep.errors] == [("ev.jsonl", 2)]


def test_completion_only_mask_on_a_real_batch(tmp_path, tok):
    """Prompt tokens get label -100; completion tokens (and EOS) keep their ids; padding is -100."""
    rows = [{"prompt": "What is 12 plus 30?", "completion": " 42"},
            {"prompt": "the adapter rank is", "completion": " good and the loss is low"}]
    ds = rdata.tokenize_rows([dict(r, _row=i + 1) for i, r in enumerate(rows)], "prompt_completion", tok, 64)
    batch = rdata.Collator(tok.pad_token_id)([ds[0], ds[1]])
    for i, row in enumerate(rows):
        n_prompt = len(tok(row["prompt"])["input_ids"])  # prompt alone, tokenized independently
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        n = int(batch["attention_mask"][i].sum())
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:n] == ids[n_prompt:n] and ids[n - 1] == tok.eos_token_id
        assert labels[n:] == [-100] * (len(labels) - n)
        assert tok.decode(ids[n_prompt:n - 1]) == row["completion"]


def test_assistant_only_mask_for_messages(tok):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 plus 2?"},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 plus 3?"},
                        {"role": "assistant", "content": "6"}]}
    enc = rdata.encode(row, "messages", tok)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    # the assistant turns as the ChatML template writes them: content + <|im_end|> + newline, twice
    assert tok.decode(trained) == "4<|im_end|>\n6<|im_end|>\n"
    assert enc.input_ids == tok(tok.apply_chat_template(row["messages"], tokenize=False),
                                add_special_tokens=False)["input_ids"]


def test_packing_keeps_examples_apart(tok):
    rows = [{"text": "good movie", "_row": 1}, {"text": "bad service here", "_row": 2}, {"text": "great", "_row": 3}]
    ds = rdata.tokenize_rows(rows, "text", tok, 64, packing=True)
    assert len(ds) == 1
    lengths = [len(tok(r["text"])["input_ids"]) + 1 for r in rows]
    pos = ds[0]["position_ids"]
    assert pos == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(ds[0]["labels"][s] == -100 for s in starts)  # never predict the first token of the next example


# --- masks by construction: the first completion / assistant token is trained whatever the boundary looks like


def _trained(enc, tok):
    return [tok.decode([t]) for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]


def test_prompt_ending_in_a_space_still_trains_the_first_completion_token(tok):
    """Issue 9's case. Joined, the byte-level tokenizer writes "? 7" as "?" + " 7": the " 7" token starts inside
    the prompt span, so a character-offset mask trained only EOS (measured before this change: ['<|im_end|>']).
    Tokenized piece by piece the completion "7" is its own token and carries the loss."""
    joined = [tok.decode([t]) for t in tok("What is 3 plus 4? 7")["input_ids"]]
    assert joined[-1] == " 7"  # the boundary this test is about (the tokenizer's own merge, not ours)
    enc = rdata.encode({"prompt": "What is 3 plus 4? ", "completion": "7"}, "prompt_completion", tok)
    assert _trained(enc, tok) == ["7", "<|im_end|>"]
    # the prompt's ids are those of the prompt tokenized alone, as generation will see it
    n = len(tok("What is 3 plus 4? ")["input_ids"])
    assert enc.input_ids[:n] == tok("What is 3 plus 4? ")["input_ids"] and enc.labels[:n] == [-100] * n


def test_every_assistant_turn_starts_trained(tok):
    row = {"messages": [{"role": "user", "content": "What is 3 plus 4? "}, {"role": "assistant", "content": " 7"},
                        {"role": "user", "content": "and good?"}, {"role": "assistant", "content": "positive"}]}
    enc = rdata.encode(row, "messages", tok)
    # ChatML writes each assistant turn as content + <|im_end|> + newline (runner/train/tinymodel.py CHATML_TEMPLATE)
    assert tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]) == \
        " 7<|im_end|>\npositive<|im_end|>\n"
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(row["messages"], tokenize=False)


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, a "▁" word-start marker prepended to every piece, as
    Llama-2/Mistral's do): not the byte-level BPE the rest of the suite is built on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    corpus = [f"What is {a} plus {b}? {a + b}\nthe answer is positive" for a in range(10) for b in range(10)]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_adds_no_phantom_space():
    mtok = _metaspace_tokenizer()
    alone = mtok.convert_ids_to_tokens(mtok("7", add_special_tokens=False)["input_ids"])
    assert alone[0].startswith("\u2581")  # tokenized alone, "7" gets a word-start marker (a space it lacks)
    enc = rdata.encode({"prompt": "What is 3 plus 4?", "completion": "7"}, "prompt_completion", mtok)
    trained = [mtok.convert_ids_to_tokens(t) for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert trained == ["7", "</s>"]  # "7" as a continuation: no "▁", then EOS


def test_template_that_rewrites_earlier_turns_is_reported_with_the_row(tmp_path, tok):
    import copy

    odd = copy.deepcopy(tok)  # renders a marker after the last message only: earlier renderings are not prefixes
    odd.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %} END"
                         "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}]}]
    rep = _check(_jsonl(tmp_path / "c.jsonl", rows), odd)
    assert [(e.row, e.column) for e in rep.errors] == [(1, "messages")]
    assert "differently once later messages follow" in rep.errors[0].message


def test_check_lists_what_the_first_rows_train(tmp_path, tok):
    rows = [{"prompt": "What is 3 plus 4? ", "completion": "7"}, {"prompt": "the movie was", "completion": " good"},
            {"prompt": "x", "completion": ""}, {"prompt": "y", "completion": " bad"}]
    rep = _check(_jsonl(tmp_path / "pc.jsonl", rows), tok)
    assert [(s.row, s.trained_text) for s in rep.samples] == [
        (1, "7<|im_end|>"), (2, " good<|im_end|>"), (3, "<|im_end|>")]  # row 3: only EOS (empty completion)
    assert rep.summary()["samples"][0] == {"row": 1, "trained_text": "7<|im_end|>"}

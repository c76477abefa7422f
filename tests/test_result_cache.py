"""The on-disk result cache of `ftadvisor estimate`: a repeat answers from disk without importing torch, and every
input the answer depends on (request, config contents, library versions, estimator version and source) is in the
key, so changing any of them is a miss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator import result_cache
from estimator.request import EstimateRequest
from ftadvisor.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["estimate", "--model", "smollm2-135m", "--method", "lora", "--rank", "8", "--seq-len", "64", "--gpu", "l4"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FTADVISOR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FTADVISOR_RESULT_CACHE", raising=False)
    return tmp_path / "home"


def _config(tmp_path: Path, **changes) -> Path:
    config = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "tie_word_embeddings": False, **changes}
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def test_a_repeat_answers_from_disk_without_torch(home, capsys):
    """The first call computes and stores; a new process with the same request prints the same JSON and has not
    imported torch or transformers (the whole point: seconds of imports saved)."""
    assert main(ARGS + ["--json"]) == 0
    first = capsys.readouterr().out
    # called in-process with arguments, main leaves this process's modules alone (bitsandbytes not marked absent)
    assert sys.modules.get("bitsandbytes", "not imported") is not None
    assert len(list((home / "cache" / "estimates").glob("*.json"))) == 1
    probe = ("import sys; from ftadvisor.cli import main; rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
             "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "FTADVISOR_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", probe, *ARGS, "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr
    assert out.stdout == first
    # the text report is made from the stored estimate too
    out = subprocess.run([sys.executable, "-c", probe, *ARGS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "HEAVY []" in out.stderr, out.stderr
    assert "PEAK" in out.stdout and "SmolLM2" in out.stdout


def test_stored_estimate_is_the_computed_one(home, capsys):
    from estimator import Estimate, estimate

    req = EstimateRequest(model="smollm2-135m", method="qlora", seq_len=64, gpu="l4")
    key, data = result_cache.lookup(req)
    assert key is not None and data is None
    est = estimate(req)
    result_cache.store(key, est.to_json())
    key2, data = result_cache.lookup(req)
    assert key2 == key and Estimate.model_validate(data).memory == est.memory
    assert data == est.to_json()


def test_request_change_is_a_miss(home):
    req = EstimateRequest(model="smollm2-135m", method="lora", seq_len=64)
    key, _ = result_cache.lookup(req)
    result_cache.store(key, {"stored": 1})
    assert result_cache.lookup(req)[1] == {"stored": 1}
    for change in ({"seq_len": 128}, {"rank": 32}, {"gpu": "l4"}, {"method": "qlora"}, {"price": 1.0},
                   {"grad_checkpointing": True}):
        other = req.model_copy(update=change)
        assert result_cache.lookup(other)[1] is None, change


def test_config_change_is_a_miss(home, tmp_path):
    path = _config(tmp_path)
    req = EstimateRequest(model=str(path))
    key, _ = result_cache.lookup(req)
    result_cache.store(key, {"stored": 1})
    assert result_cache.lookup(req)[1] == {"stored": 1}
    # the same request given as the folder is the same model only if it resolves to the same file: it does not
    assert result_cache.lookup(EstimateRequest(model=str(path.parent)))[1] is None
    _config(tmp_path, intermediate_size=256)  # the user edits config.json in place
    assert result_cache.lookup(req)[1] is None
    path.write_text("{not json")  # unreadable: no key, the estimator reports the file
    assert result_cache.lookup(req) == (None, None)


def test_library_and_estimator_version_changes_are_misses(home, monkeypatch):
    from estimator import result
    req = EstimateRequest(model="smollm2-135m")
    key, _ = result_cache.lookup(req)
    result_cache.store(key, {"stored": 1})
    versions = dict(result_cache.library_versions())
    monkeypatch.setattr(result_cache, "library_versions", lambda: {**versions, "transformers": "99.0.0"})
    assert result_cache.lookup(req)[1] is None
    monkeypatch.setattr(result_cache, "library_versions", lambda: versions)
    assert result_cache.lookup(req)[1] == {"stored": 1}
    monkeypatch.setattr(result, "ESTIMATOR_VERSION", result.ESTIMATOR_VERSION + 1)
    assert result_cache.lookup(req)[1] is None


def test_versions_are_read_without_importing_the_libraries():
    code = ("import sys; from estimator.result_cache import library_versions; v = library_versions(); "
            "assert v['torch'] and v['transformers'], v; "
            "assert not {'torch', 'transformers', 'peft', 'bitsandbytes'} & set(sys.modules), 'imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_source_edit_changes_the_key(home, tmp_path, monkeypatch):
    """An edit to any estimator source file (or the GPU table) is a new key, without anyone bumping a version."""
    import shutil

    pkg = tmp_path / "estimator"
    shutil.copytree(result_cache._PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(result_cache, "_PACKAGE_DIR", pkg)
    result_cache.source_hash.cache_clear()
    try:
        before = result_cache.source_hash()
        result_cache.source_hash.cache_clear()
        assert result_cache.source_hash() == before  # stable
        with (pkg / "memory.py").open("a") as fh:
            fh.write("\n# an edit\n")
        result_cache.source_hash.cache_clear()
        assert result_cache.source_hash() != before
    finally:
        result_cache.source_hash.cache_clear()


def test_torn_file_is_a_miss_and_cache_can_be_off(home, monkeypatch):
    req = EstimateRequest(model="smollm2-135m")
    key, _ = result_cache.lookup(req)
    result_cache.store(key, {"stored": 1})
    path = home / "cache" / "estimates" / f"{key}.json"
    path.write_text('{"key": "')
    assert result_cache.lookup(req) == (key, None) and not path.exists()
    monkeypatch.setenv("FTADVISOR_RESULT_CACHE", "0")
    assert result_cache.lookup(req) == (None, None)


def test_hub_ids_are_not_cached(home):
    assert result_cache.lookup(EstimateRequest(model="someone/some-model")) == (None, None)


def test_lora_estimate_at_the_terminal_skips_bitsandbytes_with_the_same_figures(home):
    """A terminal LoRA estimate keeps bitsandbytes (1.2 s of CPU at import) out of its process; its figures equal
    an estimate made where bitsandbytes is loaded (this test process, through peft)."""
    import bitsandbytes  # noqa: F401 - this side has it loaded, as the app does

    from estimator import estimate

    probe = ("import sys; from ftadvisor.cli import main; rc = main(); "  # main() reads sys.argv, as the script
             "print('BNB', 'bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None, "
             "file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "FTADVISOR_HOME": str(home), "FTADVISOR_RESULT_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", probe, *ARGS, "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BNB False" in out.stderr
    theirs = json.loads(out.stdout)
    ours = estimate(EstimateRequest(model="smollm2-135m", method="lora", rank=8, seq_len=64, gpu="l4")).to_json()
    theirs.pop("trace_seconds")
    ours.pop("trace_seconds")
    assert theirs == ours

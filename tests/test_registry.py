"""The SQLite run registry: ids, round trips, guarded updates, several processes writing at once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runner.jobs.registry import Registry, new_run_id
from runner.spec import RunSpec

SPEC = RunSpec(model="m", method="lora", dataset={"path": "/x.jsonl"})


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry.sqlite3")


def test_ids_are_short_sortable_and_unique():
    ids = [new_run_id(1_700_000_000 + i) for i in range(50)]
    assert ids == sorted(ids)
    assert len(ids[0]) == len("20231114-221320-abcd")
    assert len({new_run_id(1_700_000_000) for _ in range(200)}) > 150  # 16 random bits per second


def test_insert_get_roundtrip_and_wal(reg, tmp_path):
    rec = reg.insert(SPEC, tmp_path / "run")
    got = reg.get(rec.id)
    assert got.status == "queued" and got.spec == SPEC and got.method == "lora" and got.model == "m"
    assert got.created_at.tzinfo is not None and got.output_dir == str(tmp_path / "run")
    with sqlite3.connect(reg.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reg.get("missing") is None


def test_update_only_if_status_is_atomic_guard(reg, tmp_path):
    rec = reg.insert(SPEC, tmp_path / "run")
    assert reg.update(rec.id, status="running", only_if_status=frozenset({"queued"}))
    assert not reg.update(rec.id, status="running", only_if_status=frozenset({"queued"}))
    assert reg.update(rec.id, status="completed", exit_code=0)
    assert reg.get(rec.id).status == "completed"
    with pytest.raises(KeyError):
        reg.update(rec.id, bogus=1)


def test_settle_reads_and_writes_in_one_transaction(reg, tmp_path):
    rec = reg.insert(SPEC, tmp_path / "run")
    seen = []

    def decide(current):
        seen.append(current.status)
        return {"status": "failed", "kind": "lost"} if current.status == "queued" else None

    assert reg.settle(rec.id, decide)
    assert not reg.settle(rec.id, decide)  # already settled: decide sees "failed" and leaves it
    assert seen == ["queued", "failed"] and reg.get(rec.id).kind == "lost"
    assert not reg.settle("missing", decide) and seen == ["queued", "failed"]
    with pytest.raises(KeyError):
        reg.settle(rec.id, lambda current: {"bogus": 1})


def test_failed_settle_rolls_back(reg, tmp_path):
    rec = reg.insert(SPEC, tmp_path / "run")

    def crash(current):
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        reg.settle(rec.id, crash)
    assert reg.get(rec.id).status == "queued"
    assert reg.update(rec.id, status="running")  # the write lock was released


def test_queue_is_in_queue_time_order(reg, tmp_path):
    first, second, third = (reg.insert(SPEC, tmp_path / name) for name in "abc")
    reg.update(first.id, queued_at=30.0)
    reg.update(second.id, queued_at=10.0)
    reg.update(third.id, status="running")
    assert [r.id for r in reg.queue()] == [second.id, first.id]


def test_prefix_lookup(reg, tmp_path):
    a = reg.insert(SPEC, tmp_path / "a")
    assert [r.id for r in reg.find(a.id[:10])] == [a.id]
    assert reg.find("20%") == [] or all(r.id.startswith("20") for r in reg.find("20%"))  # % is literal


_WRITER = """
import sys
from pathlib import Path
from runner.jobs.registry import Registry
from runner.spec import RunSpec
reg = Registry(sys.argv[1])
spec = RunSpec(model="m", method="lora", dataset={"path": "/x.jsonl"})
for i in range(40):
    rec = reg.insert(spec, Path("/tmp/none"))
    reg.update(rec.id, status="running", only_if_status=frozenset({"queued"}))
    reg.update(rec.id, status="completed", exit_code=0, only_if_status=frozenset({"running"}))
"""


def test_several_processes_write_at_once_without_loss(reg):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(reg.path)], cwd=Path(__file__).parents[1])
             for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    rows = reg.list()
    assert len(rows) == 160 and len({r.id for r in rows}) == 160
    assert {r.status for r in rows} == {"completed"}
    assert reg.integrity_ok()


def test_old_registry_gains_new_columns(tmp_path):
    path = tmp_path / "registry.sqlite3"
    with sqlite3.connect(path) as conn:  # a registry written before the "step" and "sweep_id" columns existed
        conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT, spec TEXT NOT NULL, status TEXT NOT NULL,"
                     " method TEXT, model TEXT, output_dir TEXT NOT NULL, created_at REAL NOT NULL,"
                     " queued_at REAL NOT NULL)")
        conn.execute("INSERT INTO runs VALUES ('old', NULL, ?, 'completed', 'lora', 'm', '/tmp/o', 1.0, 1.0)",
                     (json.dumps(SPEC.model_dump(mode="json")),))
    rec = Registry(path).get("old")
    assert rec.status == "completed" and rec.step is None and rec.attempts == 0

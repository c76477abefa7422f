"""The run registry: one SQLite row per run, shared by the app, the CLI and the run supervisors.

Several processes read and write it at once (the Streamlit app, ``ftadvisor runs ...``, one
``runner.jobs.supervisor`` per run), so: WAL journal (readers never block the writer), ``synchronous=FULL``
(a committed status survives a power cut), a busy timeout instead of "database is locked" errors, and every
read-modify-write inside one ``BEGIN IMMEDIATE`` transaction. One short-lived connection per operation, so a
``Registry`` object is safe to share between threads and to use after ``fork``.

All SQL of the project lives in this module; callers get ``RunRecord`` objects and hand back column values.

Times are stored as Unix seconds (float, UTC) and returned as timezone-aware datetimes.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import BaseModel, Field

from runner.spec import RunSpec

Status = Literal["queued", "running", "completed", "failed", "cancelled", "stopped"]

#: Statuses after which nothing more happens to a run (until it is resumed).
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "stopped"})
#: Statuses of a run whose supervisor should be alive.
ACTIVE: frozenset[str] = frozenset({"queued", "running"})

REGISTRY_FILE = "registry.sqlite3"
#: How long a writer waits for another process's transaction before giving up, in milliseconds. Registry
#: transactions last milliseconds; 30 s only matters on a machine that is swapping.
BUSY_TIMEOUT_MS = 30_000
#: Bumped when the table changes; see ``_migrate``.
SCHEMA_VERSION = 1

_COLUMNS = {
    "id": "TEXT PRIMARY KEY",
    "name": "TEXT",
    "spec": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "method": "TEXT",
    "model": "TEXT",
    "output_dir": "TEXT NOT NULL",
    "sweep_id": "TEXT",
    "created_at": "REAL NOT NULL",
    "queued_at": "REAL NOT NULL",
    "started_at": "REAL",
    "ended_at": "REAL",
    "heartbeat_at": "REAL",
    "pid": "INTEGER",
    "pgid": "INTEGER",
    "worker_pid": "INTEGER",
    "exit_code": "INTEGER",
    "kind": "TEXT",
    "reason": "TEXT",
    "fix": "TEXT",
    "requested": "TEXT",
    "resume": "INTEGER NOT NULL DEFAULT 0",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "step": "INTEGER",
    "max_steps": "INTEGER",
}


class RunRecord(BaseModel):
    """One run as the registry knows it. ``pid``/``pgid`` are the run's supervisor (the process group leader);
    ``worker_pid`` is the training process (or the torchrun launcher) it started."""

    id: str
    name: str | None = None
    status: Status
    method: str | None = None
    model: str | None = None
    output_dir: str
    created_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    heartbeat_at: datetime | None = None
    pid: int | None = None
    pgid: int | None = None
    worker_pid: int | None = None
    exit_code: int | None = None
    kind: str | None = Field(None, description="failure kind (result.json kind): oom_step, killed, dataset, ...")
    reason: str | None = None
    fix: str | None = None
    requested: str | None = Field(None, description="pending request: cancel or stop")
    resume: bool = Field(False, description="the current/next attempt resumes from the last checkpoint")
    attempts: int = 0
    step: int | None = Field(None, description="last step seen in the heartbeat")
    max_steps: int | None = None
    sweep_id: str | None = None
    spec: RunSpec

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def summary(self) -> dict:
        """The flat JSON object the CLI prints (``runs list --json``): everything but the spec."""
        data = self.model_dump(mode="json", exclude={"spec"})
        data["run_dir"] = self.output_dir
        return data


def new_run_id(now: float | None = None) -> str:
    """Short, sortable, unique: ``YYYYMMDD-HHMMSS-xxxx`` (UTC time + 16 random bits)."""
    stamp = datetime.fromtimestamp(now if now is not None else time.time(), tz=timezone.utc)
    return stamp.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


class Registry:
    """Access to ``<runs_dir>/registry.sqlite3``. Every method opens its own connection."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            self._migrate(conn)

    # -- plumbing -----------------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = self._open()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: takes the write lock up front, so a read-then-write never
        races another process). Commits on success, rolls back on any exception."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cols = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
            conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            have = {row["name"] for row in conn.execute("PRAGMA table_info(runs)")}
            for name, kind in _COLUMNS.items():
                if name not in have:  # a registry from an older version: add the new columns
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind.replace('PRIMARY KEY', '')}")
            conn.execute("CREATE INDEX IF NOT EXISTS runs_status ON runs(status, queued_at)")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        spec = RunSpec.model_validate(json.loads(data.pop("spec")))
        for key in ("created_at", "queued_at", "started_at", "ended_at", "heartbeat_at"):
            data[key] = _dt(data[key])
        data["resume"] = bool(data["resume"])
        return RunRecord(spec=spec, **data)

    # -- reads --------------------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else self._record(row)

    def find(self, prefix: str) -> list[RunRecord]:
        """Runs whose id starts with ``prefix`` (so the CLI accepts an unambiguous id prefix)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY id",
                                (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",)
                                ).fetchall()
        return [self._record(r) for r in rows]

    def list(self, statuses: frozenset[str] | None = None) -> list[RunRecord]:
        """All runs, oldest first (ids sort by creation time)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY created_at, id").fetchall()
        records = [self._record(r) for r in rows]
        return [r for r in records if statuses is None or r.status in statuses]

    def queue(self) -> list[RunRecord]:
        """The queued runs in the order they get the device: by queue time, then id."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM runs WHERE status = 'queued' ORDER BY queued_at, id").fetchall()
        return [self._record(r) for r in rows]

    # -- writes -------------------------------------------------------------------------------------------
    def insert(self, spec: RunSpec, output_dir: Path, *, run_id: str | None = None,
               sweep_id: str | None = None) -> RunRecord:
        """Add a queued run. Retries with a fresh id in the (unlikely) event of a collision."""
        for _ in range(20):
            now = time.time()
            rid = run_id or new_run_id(now)
            try:
                with self._transaction() as conn:
                    conn.execute(
                        "INSERT INTO runs (id, name, spec, status, method, model, output_dir, sweep_id, created_at,"
                        " queued_at) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                        (rid, spec.name, spec.model_dump_json(), spec.method, spec.model, str(output_dir),
                         sweep_id, now, now))
            except sqlite3.IntegrityError:
                if run_id:
                    raise
                continue
            return self.get(rid)
        raise RuntimeError("could not allocate a unique run id after 20 tries")

    def update(self, run_id: str, *, only_if_status: frozenset[str] | None = None, **fields) -> bool:
        """Set columns of one run. With ``only_if_status``, only when the run is in one of those statuses
        (checked inside the same transaction). Returns True when the row was changed."""
        if not fields:
            return False
        sql, params = _update_sql(run_id, fields)
        if only_if_status is not None:
            sql += f" AND status IN ({', '.join('?' for _ in only_if_status)})"
            params += sorted(only_if_status)
        with self._transaction() as conn:
            return conn.execute(sql, params).rowcount == 1

    def settle(self, run_id: str, decide: Callable[[RunRecord], dict | None]) -> bool:
        """Read-modify-write of one run in one ``BEGIN IMMEDIATE`` transaction: ``decide`` gets the run as it
        is now and returns the columns to set, or None to leave it. Nobody else writes the row in between (a
        supervisor finishing at the same moment waits). Returns True when the row was changed; an exception in
        ``decide`` rolls back."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            fields = None if row is None else decide(self._record(row))
            if not fields:
                return False
            sql, params = _update_sql(run_id, fields)
            return conn.execute(sql, params).rowcount == 1

    def delete(self, run_id: str) -> bool:
        with self._transaction() as conn:
            return conn.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 1

    def integrity_ok(self) -> bool:
        """SQLite's own consistency check (used by the fault tests)."""
        with self._connect() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _update_sql(run_id: str, fields: dict) -> tuple[str, list]:
    """``UPDATE runs SET ... WHERE id = ?`` and its parameters; raises KeyError on an unknown column."""
    for key in fields:
        if key not in _COLUMNS or key == "id":
            raise KeyError(f"unknown registry column {key!r}")
    values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
    return f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", [*values, run_id]


def default_registry_path(runs_root: Path) -> Path:
    return Path(runs_root) / REGISTRY_FILE


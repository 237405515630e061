"""The results store: one SQLite row per image, and the ledger that makes the hot folder exactly-once.

Exactly-once for the hot folder (after ``kill -9``, power loss, or a crash at any instant):

1. A folder image gets the idempotency key ``folder:<relpath>|<sha256 of its bytes>``; the column is
   ``UNIQUE``. Before scoring, the daemon looks the key up: a hit means the image was already committed
   and only the move is left (step 4), so it is never scored twice.
2. Rows are inserted with ``ON CONFLICT(idem_key) DO NOTHING`` as a second guard: even a race that
   slipped past step 1 cannot create a second row; the existing row wins and is used for the move.
3. The row is COMMITTED (one transaction per batch, ``synchronous=FULL``) BEFORE the file is moved to
   ``done/`` or ``quarantine/`` with ``os.replace`` (atomic within a filesystem).
4. So every crash point leaves one of three states, each resolved on restart by the normal scan:
   no row + file in the folder (re-scored: the only scoring ever recorded), row + file in the folder
   (moved without scoring), row + file moved (nothing to do). None yields zero rows or two rows.

Why ``synchronous=FULL`` rather than NORMAL in WAL mode: NORMAL may lose the last committed
transactions on power loss (the WAL is fsynced only at checkpoints) while the file move that followed
the commit survives; the image would then sit in ``done/`` with no row, i.e. be lost. FULL fsyncs the
WAL on every commit; since a commit covers a whole batch, the cost is one fsync per batch.
``kill -9`` alone would be safe with NORMAL; the line also loses power.

HTTP and camera rows have no idempotency key (NULL; UNIQUE allows many NULLs): an HTTP client gets
its answer only after the commit, a camera frame is observed once.

The ``drift_events`` table holds the drift monitor's alarms, their ends and periodic scores
(``pipeline.serve.drift``); it is additive, so the schema version stays 1.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id             INTEGER PRIMARY KEY,
    ts             TEXT    NOT NULL,   -- UTC, ISO 8601 fixed width: 2025-01-31T12:00:00.123+00:00
    source         TEXT    NOT NULL,   -- folder:<relpath> | http[:<filename>] | camera:<src>#<frame>
    idem_key       TEXT    UNIQUE,     -- folder:<relpath>|<sha256>; NULL for http and camera
    sha256         TEXT,               -- of the file / upload bytes, or of the raw frame pixels
    model_version  TEXT,
    class          TEXT,               -- argmax class; NULL on error
    probabilities  TEXT,               -- JSON {class: p}; NULL on error
    defect_score   REAL,               -- 1 - p(good); NULL on error
    decision       TEXT    NOT NULL,   -- good | defect | error
    latency_ms     REAL,               -- accepted -> scored
    error_kind     TEXT,               -- NULL when ok
    error_message  TEXT
);
CREATE INDEX IF NOT EXISTS results_ts ON results(ts);
CREATE TABLE IF NOT EXISTS drift_events (  -- written by the drift monitor (pipeline.serve.drift)
    id             INTEGER PRIMARY KEY,
    ts             TEXT    NOT NULL,   -- UTC, same format as results.ts
    kind           TEXT    NOT NULL,   -- alarm_started | alarm_ended | score (periodic)
    model_version  TEXT,
    model_sha256   TEXT,
    detector       TEXT    NOT NULL,   -- the detector that decides alarms
    score          REAL,
    threshold      REAL,
    alarm          INTEGER NOT NULL,   -- 1: score above threshold on this evaluation
    in_episode     INTEGER NOT NULL,   -- 1: an alarm episode is open after this evaluation
    episode        INTEGER NOT NULL,   -- episodes started so far for this model
    n_seen         INTEGER NOT NULL,   -- images the monitor has seen for this model
    prefect_event  TEXT,               -- alarm_started: emit | suppressed (minimum interval) | off
    event_id       TEXT,               -- id of the defect.drift.detected event when emitted
    scores         TEXT                -- JSON {detector: score}
);
CREATE INDEX IF NOT EXISTS drift_events_ts ON drift_events(ts);
"""

_COLUMNS = ("ts", "source", "idem_key", "sha256", "model_version", "class", "probabilities", "defect_score",
            "decision", "latency_ms", "error_kind", "error_message")


def utc_iso(t: datetime | None = None) -> str:
    """Fixed-width UTC ISO time, so string order is time order in SQL."""
    t = t or datetime.now(timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def parse_since(text: str) -> str:
    """Any ISO 8601 time (naive = UTC; a trailing Z is accepted) -> the stored format."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return utc_iso(t)


@dataclass
class ResultRow:
    """One stored result; ``id`` is None until inserted."""

    ts: str
    source: str
    decision: str
    sha256: str | None = None
    idem_key: str | None = None
    model_version: str | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None
    defect_score: float | None = None
    latency_ms: float | None = None
    error_kind: str | None = None
    error_message: str | None = None
    id: int | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape used by the HTTP API and ``defect results --json``."""
        return {
            "id": self.id, "ts": self.ts, "source": self.source, "sha256": self.sha256,
            "model_version": self.model_version, "class": self.label, "probabilities": self.probabilities,
            "defect_score": self.defect_score, "decision": self.decision, "latency_ms": self.latency_ms,
            "error": None if self.ok else {"kind": self.error_kind, "message": self.error_message},
        }

    def _values(self) -> tuple:
        probs = json.dumps(self.probabilities) if self.probabilities is not None else None
        return (self.ts, self.source, self.idem_key, self.sha256, self.model_version, self.label, probs,
                self.defect_score, self.decision, self.latency_ms, self.error_kind, self.error_message)

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> "ResultRow":
        return cls(id=r["id"], ts=r["ts"], source=r["source"], idem_key=r["idem_key"], sha256=r["sha256"],
                   model_version=r["model_version"], label=r["class"],
                   probabilities=json.loads(r["probabilities"]) if r["probabilities"] else None,
                   defect_score=r["defect_score"], decision=r["decision"], latency_ms=r["latency_ms"],
                   error_kind=r["error_kind"], error_message=r["error_message"])


_DRIFT_COLUMNS = ("ts", "kind", "model_version", "model_sha256", "detector", "score", "threshold", "alarm",
                  "in_episode", "episode", "n_seen", "prefect_event", "event_id", "scores")


@dataclass
class DriftEventRow:
    """One drift monitor status change (or periodic score) as stored in ``drift_events``."""

    ts: str
    kind: str
    detector: str
    score: float | None
    threshold: float | None
    alarm: bool
    in_episode: bool
    episode: int
    n_seen: int
    model_version: str | None = None
    model_sha256: str | None = None
    prefect_event: str | None = None
    event_id: str | None = None
    scores: dict[str, float | None] | None = None
    id: int | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "kind": self.kind, "model_version": self.model_version,
                "model_sha256": self.model_sha256, "detector": self.detector, "score": self.score,
                "threshold": self.threshold, "alarm": self.alarm, "in_episode": self.in_episode,
                "episode": self.episode, "n_seen": self.n_seen, "prefect_event": self.prefect_event,
                "event_id": self.event_id, "scores": self.scores}

    def _values(self) -> tuple:
        return (self.ts, self.kind, self.model_version, self.model_sha256, self.detector, self.score,
                self.threshold, int(self.alarm), int(self.in_episode), self.episode, self.n_seen,
                self.prefect_event, self.event_id, json.dumps(self.scores) if self.scores is not None else None)

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> "DriftEventRow":
        return cls(id=r["id"], ts=r["ts"], kind=r["kind"], model_version=r["model_version"],
                   model_sha256=r["model_sha256"], detector=r["detector"], score=r["score"],
                   threshold=r["threshold"], alarm=bool(r["alarm"]), in_episode=bool(r["in_episode"]),
                   episode=r["episode"], n_seen=r["n_seen"], prefect_event=r["prefect_event"],
                   event_id=r["event_id"], scores=json.loads(r["scores"]) if r["scores"] else None)


def _connect(path: Path, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    return conn


class ResultStore:
    """SQLite results in WAL mode. One writer (the daemon's commit thread); readers get their own
    connection per thread (WAL readers never block the writer nor each other).

    ``busy_timeout_s``: how long a statement waits for a lock another process holds (an exclusive
    lock, a checkpoint) before it fails; the daemon then retries the commit with backoff.
    """

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._write = _connect(self.path, busy_timeout_s)
        mode = self._write.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot enable WAL mode (got {mode}); is it on a network filesystem?")
        self._write.execute("PRAGMA synchronous = FULL")  # see the module docstring
        self._write.executescript(_SCHEMA)
        version = self._write.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._write.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: results schema v{version} is newer than this daemon (v{SCHEMA_VERSION})")
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self.busy_timeout_s)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def insert_many(self, rows: Sequence[ResultRow]) -> list[ResultRow]:
        """Insert in ONE transaction and commit (durable on return).

        Returns, per input row, the row now stored for it: the input with its new ``id``, or, when its
        idempotency key was already present, the earlier row (the input is dropped).
        """
        if not rows:
            return []
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" * len(_COLUMNS))
        sql = f"INSERT INTO results ({cols}) VALUES ({marks}) ON CONFLICT(idem_key) DO NOTHING RETURNING id"
        out: list[ResultRow] = []
        with self._write_lock:
            cur = self._write.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    got = cur.execute(sql, row._values()).fetchall()
                    if got:
                        row.id = int(got[0][0])
                        out.append(row)
                    else:
                        existing = cur.execute("SELECT * FROM results WHERE idem_key = ?", (row.idem_key,)).fetchone()
                        out.append(ResultRow.from_sql(existing))
                cur.execute("COMMIT")
            except BaseException:
                if self._write.in_transaction:
                    cur.execute("ROLLBACK")
                for row in rows:
                    row.id = None
                raise
        return out

    def insert_drift_event(self, row: DriftEventRow) -> DriftEventRow:
        """Append one drift monitor row (its own small transaction; a few per hour)."""
        sql = (f"INSERT INTO drift_events ({', '.join(_DRIFT_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(_DRIFT_COLUMNS))}) RETURNING id")
        with self._write_lock:
            row.id = int(self._write.execute(sql, row._values()).fetchone()[0])
        return row

    def last_drift_emit_ts(self) -> str | None:
        """Time of the latest alarm that was sent to Prefect (so a restart keeps the minimum interval)."""
        r = self._reader().execute("SELECT MAX(ts) FROM drift_events WHERE prefect_event = 'emit'").fetchone()
        return r[0] if r else None

    def drift_events(self, since: str | None = None, limit: int = 100) -> list[DriftEventRow]:
        return query_drift_events(self._reader(), since, limit)

    def get_by_key(self, idem_key: str) -> ResultRow | None:
        r = self._reader().execute("SELECT * FROM results WHERE idem_key = ?", (idem_key,)).fetchone()
        return ResultRow.from_sql(r) if r else None

    def query(self, since: str | None = None, limit: int = 100) -> list[ResultRow]:
        """Rows in time order: from ``since`` (inclusive, ISO 8601) forward, else the latest ``limit``."""
        return query_results(self._reader(), since, limit)

    def count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        with self._readers_lock:
            for c in self._readers:
                c.close()
            self._readers.clear()
        with self._write_lock:
            self._write.close()


def query_results(conn: sqlite3.Connection, since: str | None = None, limit: int = 100) -> list[ResultRow]:
    limit = max(0, int(limit))
    if since is not None:
        rows = conn.execute("SELECT * FROM results WHERE ts >= ? ORDER BY ts, id LIMIT ?",
                            (parse_since(since), limit)).fetchall()
    else:
        rows = conn.execute("SELECT * FROM results ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]
    return [ResultRow.from_sql(r) for r in rows]


def query_drift_events(conn: sqlite3.Connection, since: str | None = None, limit: int = 100
                       ) -> list[DriftEventRow]:
    """Drift rows in time order: from ``since`` forward, else the latest ``limit``."""
    limit = max(0, int(limit))
    if since is not None:
        rows = conn.execute("SELECT * FROM drift_events WHERE ts >= ? ORDER BY ts, id LIMIT ?",
                            (parse_since(since), limit)).fetchall()
    else:
        rows = conn.execute("SELECT * FROM drift_events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]
    return [DriftEventRow.from_sql(r) for r in rows]


def read_drift_events(db: str | os.PathLike, since: str | None = None, limit: int = 100) -> list[DriftEventRow]:
    """Read drift monitor rows from a daemon's database without altering it (a database written by a
    daemon without drift monitoring has no such table: empty list)."""
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"results database not found: {path}")
    conn = _connect(path)
    try:
        return query_drift_events(conn, since, limit)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def read_results(db: str | os.PathLike, since: str | None = None, limit: int = 100) -> list[ResultRow]:
    """Read results from a database file without creating or altering it (for ``defect results``)."""
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"results database not found: {path}")
    conn = _connect(path)
    try:
        return query_results(conn, since, limit)
    finally:
        conn.close()


def iter_all(db: str | os.PathLike) -> Iterator[ResultRow]:
    """Every row in id order (for tests and audits)."""
    conn = _connect(Path(db))
    try:
        for r in conn.execute("SELECT * FROM results ORDER BY id"):
            yield ResultRow.from_sql(r)
    finally:
        conn.close()

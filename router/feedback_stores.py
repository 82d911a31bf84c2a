"""Where outcome feedback is kept: in memory (one router, lost at exit: one process's memory, or with ``--workers N``
a SQLite file the workers share in the supervisor's private state directory), in a SQLite file (one machine:
survives a restart and is shared by every worker process on it), or in Redis (shared by router replicas on many
machines).

A store holds two things:

- **evidence**: per (elite, skill), the summed weighted successes ``a`` and failures ``b`` that feedback added. The
  prior (the archive's calibration score) is *not* stored: it comes from the serving manifest at read time, so a
  re-calibrated manifest moves the prior without touching what agents reported;
- **attributions**: which elite answered a request (and a session's latest request), with the skill weights it was
  routed by, for a bounded time, so that feedback naming a request id or a session can be attributed on any
  replica; and whether that request has been rated yet (each request counts once).

Stores are synchronous and are called off the event loop (``router.feedback`` runs them in a thread, under one lock
per router). Every method that writes is atomic on its own: a feedback's claim and its increments are separate
calls, and a crash between them loses that feedback rather than counting it twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

#: Evidence increments or totals: (elite id, skill) -> (successes a, failures b).
Evidence = dict[tuple[str, str], tuple[float, float]]


@dataclass(frozen=True)
class Served:
    """One answered request, as feedback needs it: who answered, and for which skill mix."""

    request_id: str
    elite: str
    weights: dict[str, float]

    def to_json(self) -> str:
        return json.dumps({"request_id": self.request_id, "elite": self.elite, "weights": self.weights})

    @staticmethod
    def from_json(text: str | bytes) -> Served:
        d = json.loads(text)
        return Served(d["request_id"], d["elite"], {str(k): float(v) for k, v in d["weights"].items()})


#: What ``claim`` found: the request (now marked rated), ``ALREADY_RATED``, or None (unknown or expired).
ALREADY_RATED = "already_rated"


class Store(Protocol):
    kind: str

    def put_served(self, items: list[tuple[Served, str | None]], ttl_s: float) -> None:
        """Remember answered requests (with the session each belongs to, if any) for ``ttl_s`` seconds."""

    def claim(self, request_id: str | None, session_id: str | None) -> Served | str | None:
        """The request named (directly, or as the session's latest), marked rated at once: a second claim of the
        same request answers ``ALREADY_RATED``; an unknown or expired one answers None."""

    def add(self, increments: Evidence) -> None:
        """Add successes and failures to the evidence, atomically."""

    def load(self) -> Evidence:
        """Every elite's evidence, as the store has it now (what other replicas added included)."""

    def close(self) -> None: ...


class MemoryStore:
    """One process; nothing survives a restart. Attributions are an LRU bounded by ``max_entries`` and the TTL."""

    kind = "memory"

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.requests: OrderedDict[str, tuple[Served, float, bool]] = OrderedDict()  # id -> (served, expiry, rated)
        self.sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # session -> (request id, expiry)
        self.evidence: Evidence = {}
        self._lock = threading.Lock()

    def put_served(self, items: list[tuple[Served, str | None]], ttl_s: float) -> None:
        expiry = time.monotonic() + ttl_s
        with self._lock:
            for served, session in items:
                self.requests[served.request_id] = (served, expiry, False)
                self.requests.move_to_end(served.request_id)
                if session is not None:
                    self.sessions[session] = (served.request_id, expiry)
                    self.sessions.move_to_end(session)
            for table in (self.requests, self.sessions):
                while len(table) > self.max_entries:
                    table.popitem(last=False)

    def claim(self, request_id: str | None, session_id: str | None) -> Served | str | None:
        now = time.monotonic()
        with self._lock:
            if session_id is not None:
                entry = self.sessions.get(session_id)
                if entry is None or entry[1] < now:
                    return None
                request_id = entry[0]
            found = self.requests.get(request_id or "")
            if found is None or found[1] < now:
                return None
            served, expiry, rated = found
            if rated:
                return ALREADY_RATED
            self.requests[served.request_id] = (served, expiry, True)
            return served

    def add(self, increments: Evidence) -> None:
        with self._lock:
            for key, (a, b) in increments.items():
                a0, b0 = self.evidence.get(key, (0.0, 0.0))
                self.evidence[key] = (a0 + a, b0 + b)

    def load(self) -> Evidence:
        with self._lock:
            return dict(self.evidence)

    def close(self) -> None:
        pass


class SQLiteStore:
    """A SQLite file in WAL mode: survives a restart, and several processes on one machine (router workers, or two
    routers) may share it; a writer waits for another's lock (``busy_timeout``) instead of failing. Each process
    opens its own connection (re-opened after a fork, since a connection must not cross one).

    It is also what ``store: memory`` is with ``--workers N``: a file in the supervisor's private state directory
    (removed at exit), shared by the workers (``router.feedback.open_store``), with ``max_entries`` attributions
    at most (pruned once a minute, as expired ones are)."""

    kind = "sqlite"

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS evidence (
        ns TEXT NOT NULL, elite TEXT NOT NULL, skill TEXT NOT NULL, a REAL NOT NULL, b REAL NOT NULL,
        PRIMARY KEY (ns, elite, skill));
    CREATE TABLE IF NOT EXISTS served (
        ns TEXT NOT NULL, request_id TEXT NOT NULL, record TEXT NOT NULL, expires REAL NOT NULL,
        rated INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (ns, request_id));
    CREATE TABLE IF NOT EXISTS sessions (
        ns TEXT NOT NULL, session_id TEXT NOT NULL, request_id TEXT NOT NULL, expires REAL NOT NULL,
        PRIMARY KEY (ns, session_id));
    CREATE INDEX IF NOT EXISTS served_expires ON served (expires);
    CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
    """

    def __init__(self, path: Path, namespace: str = "default", max_entries: int | None = None) -> None:
        self.path, self.ns = Path(path), namespace
        self.max_entries = max_entries  # attributions kept beyond the TTL's pruning (None: the TTL alone)
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._pruned = 0.0
        self.conn()  # fail at start-up (a clear error), not at the first feedback

    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            c = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA busy_timeout = 10000")
            c.execute("PRAGMA journal_mode = WAL")
            c.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across a process crash
            c.executescript(self.SCHEMA)
            self._conn, self._pid = c, os.getpid()
        return self._conn

    def put_served(self, items: list[tuple[Served, str | None]], ttl_s: float) -> None:
        now = time.time()
        expires = now + ttl_s
        c = self.conn()
        with _immediate(c):
            c.executemany(
                "INSERT OR REPLACE INTO served (ns, request_id, record, expires, rated) VALUES (?, ?, ?, ?, 0)",
                [(self.ns, s.request_id, s.to_json(), expires) for s, _ in items],
            )
            c.executemany(
                "INSERT OR REPLACE INTO sessions (ns, session_id, request_id, expires) VALUES (?, ?, ?, ?)",
                [(self.ns, sess, s.request_id, expires) for s, sess in items if sess is not None],
            )
            if now - self._pruned > 60.0:  # expired attributions go once a minute, not on every write
                self._pruned = now
                c.execute("DELETE FROM served WHERE expires < ?", (now,))
                c.execute("DELETE FROM sessions WHERE expires < ?", (now,))
                if self.max_entries is not None:  # and the oldest beyond max_entries (the memory store's LRU bound)
                    keep = (self.ns, self.ns, self.max_entries - 1)  # older than the max_entries-th newest
                    c.execute(
                        "DELETE FROM served WHERE ns = ? AND expires < (SELECT expires FROM served WHERE ns = ? "
                        "ORDER BY expires DESC LIMIT 1 OFFSET ?)",
                        keep,
                    )
                    c.execute(
                        "DELETE FROM sessions WHERE ns = ? AND expires < (SELECT expires FROM sessions WHERE ns = ? "
                        "ORDER BY expires DESC LIMIT 1 OFFSET ?)",
                        keep,
                    )

    def claim(self, request_id: str | None, session_id: str | None) -> Served | str | None:
        now = time.time()
        c = self.conn()
        with _immediate(c):
            if session_id is not None:
                row = c.execute(
                    "SELECT request_id FROM sessions WHERE ns = ? AND session_id = ? AND expires >= ?",
                    (self.ns, session_id, now),
                ).fetchone()
                if row is None:
                    return None
                request_id = row[0]
            row = c.execute(
                "SELECT record, rated FROM served WHERE ns = ? AND request_id = ? AND expires >= ?",
                (self.ns, request_id, now),
            ).fetchone()
            if row is None:
                return None
            if row[1]:
                return ALREADY_RATED
            c.execute("UPDATE served SET rated = 1 WHERE ns = ? AND request_id = ?", (self.ns, request_id))
            return Served.from_json(row[0])

    def add(self, increments: Evidence) -> None:
        c = self.conn()
        with _immediate(c):
            c.executemany(
                "INSERT INTO evidence (ns, elite, skill, a, b) VALUES (?, ?, ?, ?, ?) ON CONFLICT (ns, elite, skill) "
                "DO UPDATE SET a = a + excluded.a, b = b + excluded.b",
                [(self.ns, e, k, a, b) for (e, k), (a, b) in increments.items()],
            )

    def load(self) -> Evidence:
        rows = self.conn().execute("SELECT elite, skill, a, b FROM evidence WHERE ns = ?", (self.ns,))
        return {(e, k): (a, b) for e, k, a, b in rows}

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


class _immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): the write lock is taken at the start, so two
    processes never both read and then both fail to upgrade to writing."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn

    def __enter__(self) -> sqlite3.Connection:
        self.c.execute("BEGIN IMMEDIATE")
        return self.c

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.c.execute("COMMIT" if exc_type is None else "ROLLBACK")


class RedisStore:
    """Redis, shared by every replica: evidence in one hash (``HINCRBYFLOAT``, so concurrent increments from
    replicas add up), attributions as keys that expire on their own, and a rating claimed with ``SET NX``."""

    kind = "redis"

    def __init__(self, url: str, namespace: str = "default") -> None:
        import redis

        self.url = url
        self.prefix = f"cycleqd:feedback:{namespace}"
        self.r = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def _field(self, elite: str, skill: str, which: str) -> str:
        return f"{elite}\x1f{skill}\x1f{which}"

    def put_served(self, items: list[tuple[Served, str | None]], ttl_s: float) -> None:
        ttl = max(1, int(ttl_s))
        pipe = self.r.pipeline(transaction=False)
        for served, session in items:
            pipe.set(f"{self.prefix}:req:{served.request_id}", served.to_json(), ex=ttl)
            if session is not None:
                pipe.set(f"{self.prefix}:ses:{session}", served.request_id, ex=ttl)
        pipe.execute()

    def claim(self, request_id: str | None, session_id: str | None) -> Served | str | None:
        if session_id is not None:
            rid = self.r.get(f"{self.prefix}:ses:{session_id}")
            if rid is None:
                return None
            request_id = rid.decode()
        record = self.r.get(f"{self.prefix}:req:{request_id}")
        if record is None:
            return None
        ttl = self.r.ttl(f"{self.prefix}:req:{request_id}")
        if not self.r.set(f"{self.prefix}:rated:{request_id}", b"1", nx=True, ex=max(1, int(ttl))):
            return ALREADY_RATED
        return Served.from_json(record)

    def add(self, increments: Evidence) -> None:
        pipe = self.r.pipeline(transaction=True)  # MULTI/EXEC: a feedback's increments land together
        for (elite, skill), (a, b) in increments.items():
            pipe.hincrbyfloat(f"{self.prefix}:evidence", self._field(elite, skill, "a"), a)
            pipe.hincrbyfloat(f"{self.prefix}:evidence", self._field(elite, skill, "b"), b)
        pipe.execute()

    def load(self) -> Evidence:
        out: dict[tuple[str, str], list[float]] = {}
        for field, val in self.r.hgetall(f"{self.prefix}:evidence").items():
            elite, skill, which = field.decode().split("\x1f")
            out.setdefault((elite, skill), [0.0, 0.0])[which == "b"] = float(val)
        return {k: (a, b) for k, (a, b) in out.items()}

    def close(self) -> None:
        self.r.close()

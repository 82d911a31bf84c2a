"""Outcome feedback's posteriors: agents report how a routed request went (``POST /v1/feedback``, in
``router.routes.feedback``), and the router learns which elite is really good at what, starting from what the
archive claimed.

Per (elite, skill) the router keeps a Beta posterior of success. Its prior is the elite's routing (calibration)
score s, worth ``prior_strength`` n0 outcomes: Beta(s * n0, (1 - s) * n0), so with no feedback the posterior mean
is s and routing is exactly what it was. A feedback score y in [0, 1] for a request routed with skill weights w adds
w_k * y successes and w_k * (1 - y) failures to skill k of the elite that answered. Ranking then weighs posterior
means instead of scores; with ``explore: thompson``, the elites within the margin of the best are ordered by a draw
from their posteriors, so a near-equal keeps getting a share of traffic and can show it is better.

Reads never touch the store on the request path: the evidence is cached here, updated at once by this router's own
feedback and re-read from a shared store every ``sync_s`` (``keep_in_sync``, a task of the app's lifespan).

``store: memory`` is the router's memory: in one process a dict; with ``--workers N`` a SQLite file in the
supervisor's private state directory (``router.policy_sync.shared_feedback_file``, removed at exit), since a feedback
may reach another worker than the one that answered, and every worker must learn from all of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from cycleqd.configfile import ConfigError
from router.errors import APIError
from router.feedback_stores import (
    ALREADY_RATED,
    Evidence,
    MemoryStore,
    RedisStore,
    Served,
    SQLiteStore,
    Store,
)
from router.policy import FeedbackPolicy
from router.policy_sync import shared_feedback_file
from serve.manifest import EliteEntry, ServingManifest

log = logging.getLogger("cycleqd.router")

#: A shared store's miss is retried after these pauses (1.55 s in all; awaited, no thread is held) before the answer
#: is 404: the worker or replica that answered writes its attribution within milliseconds, but the agent may be
#: faster, and a busy event loop slower.
RETRY_UNKNOWN_S = (0.05, 0.1, 0.2, 0.4, 0.8)


def open_store(policy: FeedbackPolicy) -> Store:
    """The policy's store. ``memory`` in a worker of ``--workers N``: the workers' shared SQLite file (see the
    module's doc), bounded like the memory store by ``max_attributions``."""
    if policy.store == "memory":
        shared = shared_feedback_file()
        if shared is None:
            return MemoryStore(policy.max_attributions)
        try:
            return SQLiteStore(shared, policy.namespace, max_entries=policy.max_attributions)
        except Exception as exc:  # sqlite3.Error, OSError: the state directory is not writable
            raise ConfigError(f"feedback.store memory: cannot open the workers' shared file {shared} ({exc})") from exc
    if policy.store == "sqlite":
        assert policy.path is not None  # the policy's validator makes sure
        try:
            return SQLiteStore(policy.path, policy.namespace)
        except Exception as exc:  # sqlite3.Error, OSError: a path that cannot be a database
            raise ConfigError(f"feedback.path {policy.path}: cannot open the SQLite feedback store ({exc})") from exc
    assert policy.store == "redis" and policy.redis_url is not None  # the policy's validator makes sure
    return RedisStore(policy.redis_url, policy.namespace)


def increments(served: Served, score: float) -> Evidence:
    """What one outcome adds: weight w_k of a success of degree y, and w_k of a failure of degree 1 - y."""
    return {(served.elite, k): (w * score, w * (1.0 - score)) for k, w in served.weights.items() if w > 0}


class Feedback:
    """The posterior cache and the attribution of feedback to answered requests, over one store."""

    def __init__(self, policy: FeedbackPolicy) -> None:
        self.policy = policy
        self.store: Store | None = open_store(policy) if policy.enabled else None
        self.evidence: Evidence = {}
        # answered, not yet written to a shared store; bounded, so a store that is down costs no more than this
        self.pending: deque[tuple[Served, str | None]] = deque(maxlen=policy.max_attributions)
        self.rng = random.Random(policy.seed)
        self.synced_at: float | None = None
        self.sync_error: str | None = None
        self._lock = threading.Lock()  # one store call at a time; never taken on the event loop
        self._wake: asyncio.Event | None = None
        if self.store is not None and self.store.kind != "memory":
            self.sync()

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @property
    def explores(self) -> bool:
        return self.enabled and self.policy.explore == "thompson"

    # -- attribution -----------------------------------------------------------------------------------------
    def remember(
        self, request_id: str | None, session: str | None, elite: str | None, weights: dict[str, float]
    ) -> None:
        """Note who answered a request, so that feedback naming it (or its session) can be attributed. Called on
        the event loop for every answered request: a dict insert (memory) or a queue append (shared stores, written
        by ``keep_in_sync`` within milliseconds, or before any feedback this router takes)."""
        if self.store is None or not request_id or not elite:
            return
        item = (Served(request_id, elite, dict(weights)), session or None)
        if isinstance(self.store, MemoryStore):
            self.store.put_served([item], self.policy.attribution_ttl_s)
            return
        self.pending.append(item)
        if self._wake is not None:
            self._wake.set()

    def _flush(self) -> None:
        """Write the pending attributions (caller holds the lock)."""
        assert self.store is not None
        items = []
        while self.pending:
            items.append(self.pending.popleft())
        if items:
            try:
                self.store.put_served(items, self.policy.attribution_ttl_s)
            except Exception:
                self.pending.extendleft(reversed(items))  # kept for the next try
                raise

    # -- the store, off the event loop -----------------------------------------------------------------------
    def rate(self, request_id: str | None, session_id: str | None, score: float) -> Served:
        """Attribute a score to the request (or the session's latest request) and add it to the evidence. Blocking
        (benchmarks, tests; the endpoint uses ``rate_async``). APIError 404 for an unknown request, 409 for one
        already rated; nothing is stored then."""
        for delay in (*RETRY_UNKNOWN_S, None):
            served = self._attempt(request_id, session_id, score, last=delay is None)
            if served is not None:
                return served
            assert delay is not None
            time.sleep(delay)  # another worker or replica may not have written its attribution yet
        raise AssertionError("unreachable")

    async def rate_async(self, request_id: str | None, session_id: str | None, score: float) -> Served:
        """``rate`` for the event loop: each try in a thread, the pauses between them awaited (a miss holds no
        thread of the pool that also runs the classifier and the store's sync)."""
        for delay in (*RETRY_UNKNOWN_S, None):
            served = await asyncio.to_thread(self._attempt, request_id, session_id, score, delay is None)
            if served is not None:
                return served
            assert delay is not None
            await asyncio.sleep(delay)  # another worker or replica may not have written its attribution yet
        raise AssertionError("unreachable")

    def _attempt(self, request_id: str | None, session_id: str | None, score: float, last: bool) -> Served | None:
        """One try of ``rate`` (blocking): the request counted; None where a shared store does not know it (yet)
        and this is not the ``last`` try; else APIError."""
        if self.store is None:
            raise APIError(404, "outcome feedback is off in the routing policy (feedback.enabled)", "feedback_disabled")
        with self._lock:
            self._flush()
            served = self.store.claim(request_id, session_id)
            if served is None and not last and self.store.kind != "memory":
                return None
            return self._count(served, request_id, session_id, score)

    def _count(
        self, served: Served | str | None, request_id: str | None, session_id: str | None, score: float
    ) -> Served:
        """Add a claimed request's outcome to the evidence (caller holds the lock), or raise why it cannot be."""
        assert self.store is not None
        if served is None:
            what = f"request id {request_id!r}" if request_id is not None else f"session id {session_id!r}"
            raise APIError(
                404, f"no answered request with {what} is known to the router (never routed here, failed, or "
                f"older than {self.policy.attribution_ttl_s:g} s)", "unknown_request",
                "request_id" if request_id is not None else "session_id",
            )  # fmt: skip
        if served == ALREADY_RATED:
            raise APIError(409, "this request has already been rated; each request counts once", "already_rated")
        assert isinstance(served, Served)
        inc = increments(served, score)
        self.store.add(inc)
        evidence = dict(self.evidence)  # swapped whole below: readers on the event loop never lock
        for key, (a, b) in inc.items():  # this router sees its own feedback at once
            a0, b0 = evidence.get(key, (0.0, 0.0))
            evidence[key] = (a0 + a, b0 + b)
        self.evidence = evidence
        return served

    def sync(self, load: bool = True) -> None:
        """Write pending attributions and (with ``load``) re-read every replica's evidence. Blocking; errors are
        logged and kept in ``sync_error`` (routing goes on with the last evidence read)."""
        if self.store is None:
            return
        with self._lock:
            try:
                self._flush()
                if load and self.store.kind != "memory":
                    self.evidence = self.store.load()
                    self.synced_at = time.time()
                self.sync_error = None
            except Exception as exc:
                if self.sync_error is None:
                    log.error("feedback store %s: %s: %s", self.store.kind, type(exc).__name__, exc)
                self.sync_error = f"{type(exc).__name__}: {exc}"

    async def wait(self, timeout: float) -> None:
        """Until an attribution is pending or ``timeout`` passed."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if not self.pending:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
        self._wake.clear()

    def close(self) -> None:
        if self.store is None:
            return
        self.sync(load=False)
        with self._lock:
            self.store.close()

    # -- the posterior ---------------------------------------------------------------------------------------
    def beta(self, elite: EliteEntry, skill: str) -> tuple[float, float]:
        """The posterior's (alpha, beta): prior from the routing score, plus the evidence."""
        s = min(1.0, max(0.0, elite.routing_scores().get(skill, 0.0)))
        n0 = self.policy.prior_strength
        a, b = self.evidence.get((elite.id, skill), (0.0, 0.0))
        return s * n0 + a, (1.0 - s) * n0 + b

    def mean(self, elite: EliteEntry, skill: str) -> float:
        a, b = self.beta(elite, skill)
        return a / (a + b)

    def worth(self, elite: EliteEntry, weights: Mapping[str, float]) -> float:
        """The posterior counterpart of ``selection.value``: sum_k w_k * posterior mean of skill k."""
        return sum(w * self.mean(elite, k) for k, w in weights.items())

    def sample(self, elite: EliteEntry, weights: Mapping[str, float]) -> float:
        """One Thompson draw of the elite's worth: sum_k w_k * (a draw from skill k's posterior)."""
        total = 0.0
        for k, w in weights.items():
            a, b = self.beta(elite, k)
            total += w * self.rng.betavariate(max(a, 1e-9), max(b, 1e-9))
        return total

    def stats(self, manifest: ServingManifest | None) -> dict[str, Any]:
        """The posteriors, for operators and tests (``GET /v1/feedback``)."""
        elites: dict[str, dict[str, Any]] = {}
        for e in manifest.elites if manifest is not None and self.enabled else []:
            if e.id in elites:
                continue
            per: dict[str, Any] = {}
            for k in manifest.skills:
                a, b = self.evidence.get((e.id, k), (0.0, 0.0))
                per[k] = {"prior": e.routing_scores().get(k, 0.0), "successes": a, "failures": b,
                          "mean": self.mean(e, k)}  # fmt: skip
            elites[e.id] = per
        return {
            "object": "feedback.stats", "enabled": self.enabled, "store": self.policy.store,
            "explore": self.policy.explore, "prior_strength": self.policy.prior_strength,
            "synced_at": self.synced_at, "sync_error": self.sync_error, "elites": elites,
        }  # fmt: skip


async def keep_in_sync(current: Callable[[], Feedback]) -> None:
    """The lifespan task: write attributions as they come, re-read the shared evidence every ``sync_s``.
    ``current`` gives the router's Feedback of the moment (a policy reload may replace it)."""
    loaded = 0.0
    while True:
        fb = current()
        await fb.wait(fb.policy.sync_s)
        if fb.store is None or fb.store.kind == "memory":
            continue
        load = time.monotonic() - loaded >= fb.policy.sync_s
        await asyncio.to_thread(fb.sync, load)
        if load:
            loaded = time.monotonic()
        if fb.sync_error is not None:  # the store is down: the attributions stay queued; retry in sync_s, not at once
            await asyncio.sleep(fb.policy.sync_s)

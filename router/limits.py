"""What the router counts and limits: Prometheus metrics (one registry per router) and per-key token buckets."""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, Summary, generate_latest
from prometheus_client import Counter as PCounter

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The router's metrics. Counters and histograms only: they need nothing more to work in prometheus-client's
    multiprocess mode, where each worker writes its values to files under ``PROMETHEUS_MULTIPROC_DIR`` (chosen
    when prometheus-client is imported, from that variable) and any worker's ``/metrics`` sums them all. A gauge
    added here needs a ``multiprocess_mode`` (``livesum``, ``max``...) to mean something across workers.

    Every request counts itself through ``answered``, ``first_byte`` and ``decided``, which keep each labelled child
    once found (``labels`` takes a lock, converts its values and looks the child up, on every call)."""

    def __init__(self) -> None:
        #: Set when prometheus-client keeps its values in files (``cycleqd-router serve --workers N``).
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PCounter(
            "cycleqd_router_requests", "Requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "cycleqd_router_request_seconds", "Total request time", ["route"], buckets=BUCKETS, registry=r
        )
        self.ttfb = Histogram(
            "cycleqd_router_time_to_first_byte_seconds", "Until upstream headers", ["route"], buckets=BUCKETS,
            registry=r,
        )  # fmt: skip
        self.decisions = PCounter(
            "cycleqd_router_decisions", "Routing decisions", ["elite", "skill", "reason"], registry=r
        )
        self.upstream_errors = PCounter(
            "cycleqd_router_upstream_errors", "Upstream failures", ["engine", "kind"], registry=r
        )
        self.classifier = Histogram(
            "cycleqd_router_classifier_seconds", "Classifier time per request", buckets=BUCKETS, registry=r
        )
        self.feedback = PCounter(
            "cycleqd_router_feedback", "Outcome feedback received, by result (accepted, or the error code)",
            ["result"], registry=r,
        )  # fmt: skip
        self.feedback_score = Summary(
            "cycleqd_router_feedback_score", "Scores of accepted outcome feedback, per elite", ["elite"], registry=r
        )

        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def answered(self, route: str, status: int, seconds: float) -> None:
        """A request on ``route`` ended with ``status`` after ``seconds``."""
        self._child(self.requests, route, str(status)).inc()
        self._child(self.latency, route).observe(seconds)

    def first_byte(self, route: str, seconds: float) -> None:
        """The upstream's response headers came ``seconds`` after the request did."""
        self._child(self.ttfb, route).observe(seconds)

    def decided(self, elite: str, skill: str, reason: str) -> None:
        """An elite answered (its first skill by weight, the decision's reason)."""
        self._child(self.decisions, elite, skill, reason).inc()

    def exposition(self) -> bytes:
        """What ``/metrics`` serves: this router's registry, or with several workers the sum over all of them (and
        over the workers that have exited: their counts stay in their files)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)


class TokenBucket:
    def __init__(self, per_minute: float) -> None:
        # a burst of at least one request: a worker's share of a small limit (1/N of it) may be under one
        self.rate, self.capacity = per_minute / 60.0, max(1.0, float(per_minute))
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if ok else tokens, now)
        return ok

"""The operator page at ``/ui``: which elite serves what, engine health, traffic by elite and by reason, errors.

``/ui`` is a static page (``router/ui.html``, plain HTML and a small script, no build step) that polls
``/ui/state`` every two seconds; both are behind the API key like every route. A browser cannot set an
``Authorization`` header when it opens a page, so both also take the key as ``?key=`` (the page passes it on to
``/ui/state`` in the header).

The state comes from the router itself: the served manifest and breakers (read when the page asks), the
Prometheus upstream-error counters, and :class:`UIState`, which ``router.serving`` feeds from one call site (the
end of every proxied request) with what the response headers say: the elite, the engine, the skill weights and the
reason, and the tied elites (``x-cycleqd-tie``) when the scores could not separate the best. It keeps a ring
buffer of recent decisions and per-minute counters of the last half hour, in memory and per replica (a restart
clears it; Prometheus and Grafana keep the long view). A request only notes its outcome (``note``: a tuple
appended); the counting (``record``) happens off the request path, when the page asks and once a second in the
app's poll loop (``fold``). The routes are ``router.routes.ui``.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.decision import Router

#: The reasons the page counts: the first word of ``x-cycleqd-reason``, or ``fallback`` after a retry.
REASONS = ("pinned", "alias", "header", "classifier", "default", "fallback")


def reason_kind(reason: str) -> str:
    """``classifier:session;fallback:1`` -> ``fallback``; ``alias:sql`` -> ``alias``; none -> ``refused``."""
    if not reason:
        return "refused"
    if ";fallback" in reason:
        return "fallback"
    return reason.split(";")[0].split(":")[0]


@dataclass
class Minute:
    start: int  # unix minute
    requests: int = 0
    errors: int = 0
    by_elite: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)


class UIState:
    """Recent decisions and per-minute counts, fed by :meth:`record` once per proxied request."""

    def __init__(self, recent: int = 100, minutes: int = 30, clock: Callable[[], float] = time.time) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.minutes: deque[Minute] = deque(maxlen=minutes)
        self.clock = clock
        self.started = clock()
        self.totals = Counter[str]()
        #: Requests noted but not counted yet: (time, route, status, headers, seconds).
        self.pending: deque[tuple[float, str, int, Mapping[str, str] | None, float]] = deque()

    def note(self, route: str, status: int, headers: Mapping[str, str] | None, seconds: float) -> None:
        """One request, as it ends: kept as it is and counted by ``fold`` (off the request path)."""
        self.pending.append((self.clock(), route, status, headers, seconds))

    def fold(self) -> None:
        """Count the requests noted since the last fold (``record`` each, at the time it was noted)."""
        while self.pending:
            now, route, status, headers, seconds = self.pending.popleft()
            self.record(route, status, headers, seconds, now=now)

    def record(
        self, route: str, status: int, headers: Mapping[str, str] | None, seconds: float, now: float | None = None
    ) -> None:
        """One request: its route, final status, the response headers (None when refused early), its time; ``now``:
        when it ended (default: now)."""
        now = self.clock() if now is None else now
        h = headers or {}
        reason = h.get("x-cycleqd-reason", "")
        weights = {}
        for part in filter(None, h.get("x-cycleqd-skill-weights", "").split(",")):
            k, _, v = part.partition("=")
            weights[k] = float(v)
        elite = h.get("x-cycleqd-elite", "")
        error = status >= 400
        self.recent.append({
            "time": now, "route": route, "status": status, "elite": elite, "engine": h.get("x-cycleqd-engine", ""),
            "reason": reason, "kind": reason_kind(reason), "weights": weights, "seconds": round(seconds, 4),
            "tie": [t for t in h.get("x-cycleqd-tie", "").split(",") if t],  # equals the scores could not separate
        })  # fmt: skip
        minute = int(now // 60)
        if not self.minutes or self.minutes[-1].start != minute:
            self.minutes.append(Minute(minute))
        m = self.minutes[-1]
        m.requests += 1
        m.errors += error
        if elite:
            m.by_elite[elite] += 1
        m.by_reason[reason_kind(reason)] += 1
        self.totals["requests"] += 1
        self.totals["errors"] += error
        self.totals["ties"] += "x-cycleqd-tie" in h

    def per_minute(self) -> dict[str, Any]:
        """Counts for each of the last minutes (oldest first, empty minutes included) by elite and reason."""
        now = int(self.clock() // 60)
        span = range(now - self.minutes.maxlen + 1, now + 1) if self.minutes.maxlen else range(0)
        by_start = {m.start: m for m in self.minutes}
        rows = [by_start.get(t, Minute(t)) for t in span]
        elites = sorted({e for m in rows for e in m.by_elite})
        reasons = sorted({r for m in rows for r in m.by_reason}, key=lambda r: (r not in REASONS, r))
        return {
            "minutes": [m.start * 60 for m in rows],
            "requests": [m.requests for m in rows],
            "errors": [m.errors for m in rows],
            "by_elite": {e: [m.by_elite[e] for m in rows] for e in elites},
            "by_reason": {r: [m.by_reason[r] for m in rows] for r in reasons},
        }


def snapshot(router: Router, ui: UIState) -> dict[str, Any]:
    """Everything the page shows, as JSON."""
    ui.fold()
    router.refresh_manifest()
    m = router.manifest
    upstream_errors: Counter[str] = Counter()
    for metric in router.metrics.upstream_errors.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                upstream_errors[s.labels["engine"]] += int(s.value)
    engines, elites = [], []
    if m is not None:
        for e in m.engines:
            b = router.breakers.get(e.id)
            engines.append({
                "id": e.id, "url": e.url, "device": e.device, "mode": e.mode, "health": e.health.value,
                "restarts": e.restarts, "breaker": "open" if b and not b.allows() else "closed",
                "inflight": router.inflight[e.id], "upstream_errors": upstream_errors[e.id],
            })  # fmt: skip
        for el in m.elites:
            elites.append({
                "id": el.id, "engine": el.engine_id, "kind": el.kind, "health": m.health_of(el).value,
                "routable": router.healthy(el), "scores": el.routing_scores(), "test_scores": el.test_scores,
                "selected_by": el.selected_by, "generation": el.lineage.get("generation"),
            })  # fmt: skip
    last = ui.minutes[-1] if ui.minutes and ui.minutes[-1].start == int(ui.clock() // 60) else Minute(0)
    return {
        "now": ui.clock(),
        "uptime_s": ui.clock() - ui.started,
        "skills": m.skills if m else [],
        "manifests": router.policy.manifests,
        "engines": engines,
        "elites": elites,
        "per_minute": ui.per_minute(),
        "errors": {
            "total": ui.totals["errors"],
            "requests": ui.totals["requests"],
            "rate": ui.totals["errors"] / ui.totals["requests"] if ui.totals["requests"] else 0.0,
            "this_minute_rate": last.errors / last.requests if last.requests else 0.0,
        },
        "recent": list(reversed(ui.recent)),
        "ties": {  # decisions among elites whose scores were within the routing margin (load or session chose)
            "total": ui.totals["ties"],
            "rate": ui.totals["ties"] / ui.totals["requests"] if ui.totals["requests"] else 0.0,
            "margin": router.policy.margin,
        },
    }

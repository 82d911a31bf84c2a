"""Choosing the elite for a request: weighted archive scores, a margin of equals, load, affinity, health.

For skill weights w, elite e is worth sum_k w_k * score(e, k) (with outcome feedback on, posterior means stand in
for the scores: ``router.feedback``). Healthy elites within ``margin`` of the best are
equals: a request without a session goes to the least-loaded of them; a session goes to the one that rendezvous
(highest-random-weight) hashing of its key picks, so every router replica picks the same elite for the same
session without sharing any state, and when that elite fails the next in the same hash order takes over. The
rest follow by value, as fallbacks.

When two or more distinct elites are within the margin, the scores could not separate them: load or the session
chose, not quality. The ranking says so (``Ranked.tied``), and the router passes it on in the ``x-cycleqd-tie``
header and on ``/ui``, so an operator sees when the calibration scores are too close (or too coarse) to route by.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from serve.manifest import EliteEntry


def rendezvous_score(key: str, node: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\0{node}".encode()).digest()[:8], "big")


def value(elite: EliteEntry, weights: Mapping[str, float]) -> float:
    scores = elite.routing_scores()
    return sum(w * scores.get(k, 0.0) for k, w in weights.items())


class Ranked(list[EliteEntry]):
    """Elites in the order to try them; ``tied`` holds the distinct ids within the margin of the best (the chosen
    one first) when there are two or more of them, else it is empty."""

    tied: tuple[str, ...] = ()


def rank(
    elites: list[EliteEntry],
    weights: Mapping[str, float],
    *,
    healthy: Callable[[EliteEntry], bool],
    load: Callable[[EliteEntry], int],
    margin: float,
    session: str | None = None,
    worth: Callable[[EliteEntry, Mapping[str, float]], float] = value,
    sample: Callable[[EliteEntry, Mapping[str, float]], float] | None = None,
) -> Ranked:
    """Healthy elites in the order to try them: the chosen one first, then fallbacks.

    ``worth`` is what an elite is worth for the weights (the scores, or outcome feedback's posterior means);
    ``sample``, when given, orders the equals of a request without a session by one draw each (exploration)
    instead of by load. A session keeps its rendezvous order either way, so an episode stays on one elite.
    ``tied`` of the result names the equals when the scores could not tell two or more elites apart."""
    live = [e for e in elites if healthy(e)]
    if not live:
        return Ranked()
    vals = {e.id: worth(e, weights) for e in live}
    best = max(vals.values())
    near = [e for e in live if vals[e.id] >= best - margin - 1e-12]
    if session is not None:
        near.sort(key=lambda e: -rendezvous_score(session, e.id))
    elif sample is not None and len({e.id for e in near}) > 1:
        draws = {e.id: sample(e, weights) for e in near}
        near.sort(key=lambda e: (-draws[e.id], load(e), e.id))
    else:
        near.sort(key=lambda e: (load(e), -vals[e.id], e.id))
    rest = sorted((e for e in live if e not in near), key=lambda e: (-vals[e.id], e.id))
    out = Ranked(near + rest)
    if len(near) > 1 and len(tied := tuple(dict.fromkeys(e.id for e in near))) > 1:  # one elite on 2 engines: no tie
        out.tied = tied
    return out


@dataclass
class Breaker:
    """Per-endpoint circuit breaker: open after N consecutive failures; after ``reset_s``, half-open: exactly one
    trial request goes through (``acquire``), and its outcome closes the circuit or opens it again.

    ``allows`` only asks (ranking asks it of every elite, most of which are then not tried); ``acquire`` is called
    just before a request is sent and takes the trial. A trial whose outcome never comes (its client went away
    first) is presumed lost after another ``reset_s``, so an engine is never shut out for good.
    """

    failures: int
    reset_s: float
    count: int = 0
    opened_at: float | None = None
    trial_at: float | None = None

    def allows(self, now: float | None = None) -> bool:
        if self.opened_at is None:
            return True
        now = time.monotonic() if now is None else now
        if now - self.opened_at < self.reset_s:
            return False
        return self.trial_at is None or now - self.trial_at >= self.reset_s

    def acquire(self, now: float | None = None) -> bool:
        """May a request be sent now? When half-open, the first caller gets the trial and the rest are refused."""
        if self.opened_at is None:
            return True
        now = time.monotonic() if now is None else now
        if not self.allows(now):
            return False
        self.trial_at = now
        return True

    def record(self, ok: bool) -> None:
        self.trial_at = None
        if ok:
            self.count, self.opened_at = 0, None
        else:
            self.count += 1
            if self.count >= self.failures:
                self.opened_at = time.monotonic()


def parse_weights(text: str, skills: list[str]) -> dict[str, float]:
    """``code=0.7,db=0.3`` (or a JSON object) -> normalised weights; ValueError says what is wrong."""
    import json

    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from exc
        if not isinstance(raw, dict):
            raise ValueError("expected an object of skill weights")
        items = list(raw.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, num = part.partition("=")
            if not sep:
                raise ValueError(f"{part!r} is not skill=weight")
            items.append((name.strip(), num.strip()))
    out: dict[str, float] = {}
    for name, w in items:
        if name not in skills:
            raise ValueError(f"unknown skill {name!r}; skills are {', '.join(skills)}")
        try:
            out[name] = float(w)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"weight of {name!r} is not a number") from exc
        if not out[name] >= 0 or out[name] == float("inf"):
            raise ValueError(f"weight of {name!r} must be a finite non-negative number")
    return normalise(out)


def normalise(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if not total > 0:
        raise ValueError("skill weights must have a positive sum")
    return {k: v / total for k, v in weights.items()}

"""The router's state and its decision: which elites to try for a request, with which skill weights, and why.

``Router`` holds the policy, the merged serving manifest, the classifier, the breakers and the load; a reload
replaces a piece whole, so a request in flight keeps the objects it started with. ``decide`` computes the skill
weights (pinned elite > alias > header > classifier) and ranks the healthy elites (``router.selection``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from router.configfile import ConfigError, load_yaml_model
from router.limits import Metrics, TokenBucket
from router.manifests import ManifestSet
from router.policy import RoutingPolicy
from router.protocol import APIError
from router.selection import Breaker, normalise, parse_weights, rank
from serve.manifest import EliteEntry, Health, ServingManifest


class Router:
    """The router's state: policy, manifest, classifier, breakers, load. Swapped pieces are replaced whole."""

    def __init__(self, policy: RoutingPolicy, *, policy_path: Path | None = None, classifier: Any = None) -> None:
        self.policy = policy
        self.policy_path = policy_path
        self.metrics = Metrics()
        self.classifier = classifier  # (encoder, SkillClassifier) or None: built at start-up
        self.classifier_report: dict[str, float] = {}
        self.manifests = ManifestSet(policy.manifests)
        self._manifest_checked = 0.0
        self.breakers: dict[str, Breaker] = {}
        self.inflight: Counter[str] = Counter()
        self.limiter = TokenBucket(policy.rate_limit_per_minute) if policy.rate_limit_per_minute else None
        self.client: httpx.AsyncClient | None = None

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> ServingManifest | None:
        return self.manifests.merged

    def refresh_manifest(self, force: bool = False) -> None:
        """Re-read changed manifest files (at most once a second unless forced; URLs only when forced)."""
        now = time.monotonic()
        if not force and now - self._manifest_checked < 1.0:
            return
        self._manifest_checked = now
        self.manifests.refresh(urls=force)

    def build_classifier(self) -> None:
        from router.classifier import MiniLM, build_classifier

        skills = self.manifest.skills if self.manifest else ["code", "os", "db"]
        c = self.policy.classifier
        encoder = self.classifier[0] if self.classifier else MiniLM()
        clf, report = build_classifier(
            encoder, skills, exemplars_per_skill=c.exemplars_per_skill, method=c.method, k=c.k,
            cache_dir=self.policy.cache_dir,
        )  # fmt: skip
        self.classifier, self.classifier_report = (encoder, clf), report

    def reload_policy(self) -> RoutingPolicy:
        """Re-read the policy file; on any error keep the current policy and raise ConfigError."""
        if self.policy_path is None:
            raise ConfigError("the router was started without a policy file; there is nothing to reload")
        new = load_yaml_model(self.policy_path, RoutingPolicy)
        old = self.policy
        self.policy = new
        self.limiter = TokenBucket(new.rate_limit_per_minute) if new.rate_limit_per_minute else None
        if new.manifests != old.manifests:
            self.manifests = ManifestSet(new.manifests)
            self.refresh_manifest(force=True)
        if new.classifier != old.classifier:
            self.build_classifier()
        return new

    def breaker(self, engine_id: str) -> Breaker:
        b = self.breakers.get(engine_id)
        if b is None or (b.failures, b.reset_s) != (self.policy.breaker.failures, self.policy.breaker.reset_s):
            b = self.breakers[engine_id] = Breaker(self.policy.breaker.failures, self.policy.breaker.reset_s)
        return b

    def healthy(self, elite: EliteEntry) -> bool:
        assert self.manifest is not None
        return self.manifest.health_of(elite) == Health.READY and self.breaker(elite.engine_id).allows()

    # -- decisions -------------------------------------------------------------------------------------------
    def classify(self, text: str) -> dict[str, float]:
        assert self.classifier is not None and self.manifest is not None
        t0 = time.perf_counter()
        encoder, clf = self.classifier
        p = clf.proba(encoder.encode([text]))[0]
        self.metrics.classifier.observe(time.perf_counter() - t0)
        return {s: float(x) for s, x in zip(clf.skills, p, strict=True)}

    def decide(self, body: dict[str, Any], headers: Any, text: str) -> tuple[list[EliteEntry], dict[str, float], str]:
        """Ordered candidates, the skill weights and the reason."""
        pol, m = self.policy, self.manifest
        if m is None:
            where = ", ".join(pol.manifests)
            raise APIError(503, f"no serving manifest at {where} yet; is cycleqd-serve running?", "no_manifest")
        model = body["model"]
        same = [e for e in m.elites if e.id == model]  # one per manifest that serves it
        if same:
            live = sorted((e for e in same if self.healthy(e)), key=lambda e: self.inflight[e.engine_id])
            if not live:
                raise APIError(503, f"elite {model!r} is not healthy right now; retry later or use model 'auto'")
            return live, {k: 1.0 / len(m.skills) for k in m.skills}, "pinned"
        if model not in pol.aliases:
            names = ", ".join(list(dict.fromkeys([*pol.aliases, *(e.id for e in m.elites)]))[:12])
            raise APIError(
                404,
                f"the model {model!r} does not exist; use an alias or an elite id: {names}",
                "model_not_found",
                "model",
            )
        alias = pol.aliases[model]
        if isinstance(alias, dict):
            weights, reason = (
                normalise({k: v for k, v in alias.items() if k in m.skills} or {m.skills[0]: 0}),
                f"alias:{model}",
            )
        elif pol.weights_header in headers:
            try:
                weights, reason = parse_weights(headers[pol.weights_header], m.skills), "header"
            except ValueError as exc:
                raise APIError(400, f"header {pol.weights_header}: {exc}", "invalid_weights") from exc
        else:
            weights, reason = self.classify(text), "classifier"
        session = headers.get(pol.session_header) or conversation_key(body)
        ranked = rank(
            m.elites, weights, healthy=self.healthy, load=lambda e: self.inflight[e.engine_id], margin=pol.margin,
            session=session,
        )  # fmt: skip
        if not ranked:
            raise APIError(503, "no healthy elite is being served right now; retry later", "no_healthy_upstream")
        return ranked, weights, reason + (":session" if session else "")


def conversation_key(body: dict[str, Any]) -> str | None:
    """A multi-turn chat (more than one user turn) is keyed by its first messages, so its turns stay together."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or sum(1 for m in msgs if m.get("role") == "user") < 2:
        return None
    head = [m for m in msgs[:3] if m.get("role") in ("system", "user")][:2]
    return hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()

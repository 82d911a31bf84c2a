"""The router's state and its decision: which elites to try for a request, with which skill weights, and why.

``Router`` holds the policy, the merged serving manifest, the classifier, the breakers and the load; a reload
replaces a piece whole, so a request in flight keeps the objects it started with. ``decide`` computes the skill
weights (pinned elite > alias > header > classifier) and ranks the healthy elites (``router.selection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from cycleqd.auth import engine_key
from cycleqd.configfile import ConfigError, load_yaml_model
from router.conversation import conversation_key
from router.errors import APIError
from router.feedback import Feedback
from router.limits import Metrics, TokenBucket
from router.manifests import ManifestSet
from router.policy import RoutingPolicy
from router.selection import Breaker, normalise, parse_weights, rank, value
from serve.manifest import EliteEntry, Health, ServingManifest

if TYPE_CHECKING:
    from router.policy_sync import WorkerSync

log = logging.getLogger("cycleqd.router")

#: How long a request that needs the classifier waits for it at start-up before a 503 with Retry-After.
CLASSIFIER_WAIT_S = 2.0


def alias_problems(policy: RoutingPolicy, skills: list[str]) -> list[str]:
    """Aliases whose weights name skills the serving manifest does not have (they could never be routed)."""
    out = []
    for name, w in policy.aliases.items():
        unknown = [k for k in w if k not in skills] if isinstance(w, dict) else []
        if unknown:
            out.append(
                f"alias {name!r} names skill(s) {', '.join(unknown)} that the serving manifest does not serve "
                f"(it serves {', '.join(skills)}); fix field 'aliases.{name}' of the policy"
            )
    return out


@dataclass
class Table:
    """What decisions read of one policy over one merged manifest, worked out once for the pair: a decision only
    looks things up. Built again when either is replaced (a reload, a changed manifest)."""

    policy: RoutingPolicy
    manifest: ServingManifest
    #: Elites by id, one entry per manifest that serves it.
    elites: dict[str, list[EliteEntry]] = field(default_factory=dict)
    engines: dict[str, Any] = field(default_factory=dict)
    #: Each alias with fixed weights: its normalised weights, or why the manifest cannot serve it.
    weights: dict[str, dict[str, float] | str] = field(default_factory=dict)
    uniform: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, policy: RoutingPolicy, manifest: ServingManifest) -> Table:
        t = cls(policy, manifest, engines={e.id: e for e in manifest.engines})
        for e in manifest.elites:
            t.elites.setdefault(e.id, []).append(e)
        for name, alias in policy.aliases.items():
            if isinstance(alias, dict):
                problems = alias_problems(policy.model_copy(update={"aliases": {name: alias}}), manifest.skills)
                t.weights[name] = (
                    f"{problems[0]} (the manifest changed after the policy was loaded)"
                    if problems
                    else normalise(alias)
                )
        t.uniform = {k: 1.0 / len(manifest.skills) for k in manifest.skills}
        return t

    def ready(self, elite: EliteEntry) -> bool:
        engine = self.engines.get(elite.engine_id)
        return engine is not None and engine.health == Health.READY


class Router:
    """The router's state: policy, manifest, classifier, breakers, load. Swapped pieces are replaced whole."""

    def __init__(
        self,
        policy: RoutingPolicy,
        *,
        policy_path: Path | None = None,
        classifier: Any = None,
        workers: WorkerSync | None = None,
    ) -> None:
        self.policy = policy
        #: The other worker processes of this server (``cycleqd-router serve --workers N``), or None: alone.
        self.workers = workers
        self.policy_path = policy_path
        self.metrics = Metrics()
        self.classifier = classifier  # (encoder, SkillClassifier) or None: built at start-up
        #: Whether the classifier is built (given whole, or by build_classifier); its model may still be None when
        #: the manifest carries no exemplars, and then every classified request is out of domain.
        self.classifier_built = isinstance(classifier, tuple) and len(classifier) == 2 and classifier[1] is not None
        self.classifier_report: dict[str, float] = {}
        self.manifests = ManifestSet(policy.manifests)
        self._manifest_checked = 0.0
        self.breakers: dict[str, Breaker] = {}
        self.inflight: Counter[str] = Counter()
        self.limiter = self.make_limiter(policy)
        self.client: httpx.AsyncClient | None = None
        self.engine_key = engine_key()
        self.classifier_task: asyncio.Future[None] | None = None  # the background build at start-up
        self.classifier_error: str | None = None
        self.feedback = Feedback(policy.feedback)  # outcome feedback's posteriors (off unless the policy says)
        self._table: Table | None = None

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> ServingManifest | None:
        return self.manifests.merged

    @property
    def table(self) -> Table | None:
        """The decision's lookups for the current policy and manifest (None without a manifest)."""
        t, pol, m = self._table, self.policy, self.manifests.merged
        if t is None or t.policy is not pol or t.manifest is not m:
            if m is None:
                return None
            t = self._table = Table.of(pol, m)
        return t

    def refresh_manifest(self, force: bool = False) -> None:
        """Re-read changed manifest files (at most once a second unless forced; URLs only when forced)."""
        now = time.monotonic()
        if not force and now - self._manifest_checked < 1.0:
            return
        self._manifest_checked = now
        self.manifests.refresh(urls=force)

    def build_classifier(self) -> None:
        from router.classifier import MiniLM, build_classifier

        exemplars = (self.manifest.exemplars if self.manifest else None) or {}  # the run's skills, from serve
        c = self.policy.classifier
        encoder = self.classifier[0] if isinstance(self.classifier, tuple) else MiniLM()
        clf, report = build_classifier(
            encoder, exemplars, exemplars_per_skill=c.exemplars_per_skill, method=c.method, k=c.k,
            cache_dir=self.policy.cache_dir, in_child=True,  # off the event loop's GIL
        )  # fmt: skip
        self.classifier, self.classifier_report = (encoder, clf), report
        self.classifier_built = True

    @property
    def classifier_ready(self) -> bool:
        return self.classifier_built

    def start_classifier(self) -> None:
        """Build the classifier in a background thread, so that the server answers at once (requests that name
        their skills, an elite or an alias need no classifier); must be called on the event loop.

        A daemon thread rather than the loop's executor: a router stopped during the build exits at once instead of
        waiting for the embeddings it will not use."""
        if self.classifier_ready or self.classifier_task is not None:
            return
        loop = asyncio.get_running_loop()
        task: asyncio.Future[None] = loop.create_future()

        def build() -> None:
            try:
                self.build_classifier()
                gc.collect()
                gc.freeze()  # the classifier's objects live as long as the router: keep them out of GC walks
            except Exception as exc:
                self.classifier_error = f"{type(exc).__name__}: {exc}"
                log.error("the skill classifier could not be built: %s", self.classifier_error)
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits
                loop.call_soon_threadsafe(lambda: task.done() or task.set_result(None))

        self.classifier_task = task
        threading.Thread(target=build, name="classifier-build", daemon=True).start()

    async def wait_classifier(self, timeout: float = CLASSIFIER_WAIT_S) -> None:
        """Return once the classifier is ready; a clear 503 (with Retry-After) if it is not within ``timeout``."""
        if self.classifier_ready:
            return
        if self.classifier_task is not None and not self.classifier_task.done():
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self.classifier_task), timeout)
        if self.classifier_ready:
            return
        if self.classifier_error:
            raise APIError(
                503, f"the skill classifier failed to build ({self.classifier_error}); name a skill alias, an "
                f"elite or the {self.policy.weights_header} header instead", "classifier_failed",
            )  # fmt: skip
        raise APIError(
            503, "the skill classifier is still starting (embedding its exemplars); retry in a few seconds, or name "
            f"a skill alias, an elite or the {self.policy.weights_header} header", "classifier_starting",
            headers={"retry-after": "5"},
        )  # fmt: skip

    def check_policy(self, policy: RoutingPolicy | None = None) -> None:
        """Refuse a policy the current manifest cannot serve (ConfigError naming the alias and the skills)."""
        policy = policy or self.policy
        if self.manifest is not None and (problems := alias_problems(policy, self.manifest.skills)):
            where = f"{self.policy_path}: " if self.policy_path else ""
            raise ConfigError(where + "; ".join(problems))

    def read_policy(self) -> tuple[RoutingPolicy, ManifestSet]:
        """Read the policy file and check it against the manifests it names, changing nothing (ConfigError)."""
        if self.policy_path is None:
            raise ConfigError("the router was started without a policy file; there is nothing to reload")
        new = load_yaml_model(self.policy_path, RoutingPolicy)
        return new, self._checked(new)

    def _checked(self, new: RoutingPolicy) -> ManifestSet:
        manifests = self.manifests
        if new.manifests != self.policy.manifests:
            manifests = ManifestSet(new.manifests)
            manifests.refresh(urls=True)
        if manifests.merged is not None and (problems := alias_problems(new, manifests.merged.skills)):
            where = f"{self.policy_path}: " if self.policy_path else ""
            raise ConfigError(where + "; ".join(problems))
        return manifests

    def reload_policy(self, new: RoutingPolicy | None = None) -> RoutingPolicy:
        """Re-read the policy file; on any error keep the current policy and raise ConfigError.

        With several workers (``router.workers``) a policy read from the file here is published to the others;
        ``new`` is one another worker read and published, applied here without being published again."""
        if new is None:
            new, manifests = self.read_policy()
            publish = self.workers is not None
        else:
            manifests, publish = self._checked(new), False
        key = engine_key()
        old = self.policy
        feedback = Feedback(new.feedback) if new.feedback != old.feedback else self.feedback
        self.policy, self.manifests, self.engine_key = new, manifests, key
        if feedback is not self.feedback:
            self.feedback, retired = feedback, self.feedback
            retired.close()
        self.limiter = self.make_limiter(new)
        if new.classifier != old.classifier:
            self.build_classifier()
        if publish and self.workers is not None:
            self.workers.publish(new)
        return new

    def make_limiter(self, policy: RoutingPolicy) -> TokenBucket | None:
        """The per-key token buckets; with N workers each takes 1/N of the rate, so that together they allow
        about the configured rate (exactly when the load spreads evenly over the workers; docs/workers.md)."""
        if not policy.rate_limit_per_minute:
            return None
        return TokenBucket(policy.rate_limit_per_minute / (self.workers.count if self.workers else 1))

    def breaker(self, engine_id: str) -> Breaker:
        b = self.breakers.get(engine_id)
        if b is None or (b.failures, b.reset_s) != (self.policy.breaker.failures, self.policy.breaker.reset_s):
            b = self.breakers[engine_id] = Breaker(self.policy.breaker.failures, self.policy.breaker.reset_s)
        return b

    def healthy(self, elite: EliteEntry) -> bool:
        t = self.table
        assert t is not None
        return t.ready(elite) and self.breaker(elite.engine_id).allows()

    # -- decisions -------------------------------------------------------------------------------------------
    def needs_classifier(self, body: dict[str, Any], headers: Any) -> bool:
        """Whether ``decide`` will run the classifier: model 'auto'-like alias and no weights header."""
        t, model = self.table, body.get("model")
        if t is None or model in t.elites:
            return False
        return t.policy.aliases.get(model) == "auto" and t.policy.weights_header not in headers

    def classify(self, text: str) -> dict[str, float] | None:
        """Skill weights of the text; None when it is far from every skill (or the manifest has no exemplars)."""
        if not self.classifier_ready:
            raise APIError(503, "the skill classifier is still starting", "classifier_starting")
        assert self.manifest is not None
        t0 = time.perf_counter()
        encoder, clf = self.classifier
        if clf is None:
            return None
        emb = encoder.encode([text])
        p, inside = clf.proba(emb)[0], bool(clf.in_domain(emb)[0])
        self.metrics.classifier.observe(time.perf_counter() - t0)
        return {s: float(x) for s, x in zip(clf.skills, p, strict=True)} if inside else None

    def decide(self, body: dict[str, Any], headers: Any, text: str) -> tuple[list[EliteEntry], dict[str, float], str]:
        """Ordered candidates, the skill weights and the reason."""
        t = self.table
        if t is None:
            where = ", ".join(self.policy.manifests)
            raise APIError(503, f"no serving manifest at {where} yet; is cycleqd-serve running?", "no_manifest")
        pol, m = t.policy, t.manifest
        model = body["model"]
        if same := t.elites.get(model):  # one per manifest that serves it
            live = sorted((e for e in same if self.healthy(e)), key=lambda e: self.inflight[e.engine_id])
            if not live:
                raise APIError(503, f"elite {model!r} is not healthy right now; retry later or use model 'auto'")
            return live, t.uniform, "pinned"
        if model not in pol.aliases:
            names = ", ".join(list(dict.fromkeys([*pol.aliases, *t.elites]))[:12])
            raise APIError(
                404,
                f"the model {model!r} does not exist; use an alias or an elite id: {names}",
                "model_not_found",
                "model",
            )
        if isinstance(fixed := t.weights.get(model), str):
            raise APIError(503, fixed, "alias_not_served")
        if fixed is not None:
            weights, reason = fixed, f"alias:{model}"
        elif pol.weights_header in headers:
            try:
                weights, reason = parse_weights(headers[pol.weights_header], m.skills), "header"
            except ValueError as exc:
                raise APIError(400, f"header {pol.weights_header}: {exc}", "invalid_weights") from exc
        else:
            weights, reason = self.classify(text), "classifier"  # type: ignore[assignment]
            if weights is None:  # far from every skill: the policy's fallback (best mean, or a given elite)
                weights, reason = t.uniform, "out_of_domain"
        explicit = headers.get(pol.session_header)
        fb = self.feedback
        ranked = rank(
            m.elites, weights, healthy=self.healthy, load=lambda e: self.inflight[e.engine_id], margin=pol.margin,
            session=explicit or conversation_key(body), worth=fb.worth if fb.enabled else value,
            sample=fb.sample if fb.explores else None,
        )  # fmt: skip
        if not ranked:
            raise APIError(503, "no healthy elite is being served right now; retry later", "no_healthy_upstream")
        if reason == "out_of_domain" and pol.fallback != "best_mean":
            ranked.sort(key=lambda e: e.id != pol.fallback)  # the configured default first, the rest as retries
        return ranked, weights, reason + (":session" if explicit else "")

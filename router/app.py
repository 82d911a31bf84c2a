"""The OpenAI-compatible gateway (FastAPI): decide, forward, relay, account.

Per request: authenticate, limit, parse, compute skill weights (pinned elite > alias > header > classifier), rank
the healthy elites (``router.selection``), forward to the first with the body unchanged except ``model``, and relay
the answer. Retries go to the next elite only on a connect error, a connection closed before the response, or a
5xx, and only before the first byte reached the client; once streaming has begun, an upstream failure ends the
stream with an OpenAI-style error event. Every response names the elite, the weights and the reason in headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PCounter
from starlette.exceptions import HTTPException as StarletteHTTPException

from evolve.configfile import ConfigError, load_yaml_model
from router.manifests import ManifestSet
from router.policy import RoutingPolicy
from router.selection import Breaker, normalise, parse_weights, rank
from router.ui import UIState, ui_routes
from serve.manifest import EliteEntry, Health, ServingManifest

log = logging.getLogger("cycleqd.router")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, **hdr: str
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=hdr or None)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PCounter(
            "cycleqd_router_requests", "Requests by route and status", ["route", "status"], registry=r
        )
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram(
            "cycleqd_router_request_seconds", "Total request time", ["route"], buckets=buckets, registry=r
        )
        self.ttfb = Histogram(
            "cycleqd_router_time_to_first_byte_seconds",
            "Until upstream headers",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.decisions = PCounter(
            "cycleqd_router_decisions", "Routing decisions", ["elite", "skill", "reason"], registry=r
        )
        self.upstream_errors = PCounter(
            "cycleqd_router_upstream_errors", "Upstream failures", ["engine", "kind"], registry=r
        )
        self.classifier = Histogram(
            "cycleqd_router_classifier_seconds", "Classifier time per request", buckets=buckets, registry=r
        )


class TokenBucket:
    def __init__(self, per_minute: int) -> None:
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if ok else tokens, now)
        return ok


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


def request_text(body: dict[str, Any]) -> str:
    """The text the classifier reads: the conversation's first user message (stable over an episode's turns)."""
    if "messages" in body:
        for msg in body["messages"]:
            if msg.get("role") == "user":
                return content_text(msg.get("content"))
        return content_text(body["messages"][0].get("content"))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else (prompt[0] if prompt and isinstance(prompt[0], str) else "")


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def conversation_key(body: dict[str, Any]) -> str | None:
    """A multi-turn chat (more than one user turn) is keyed by its first messages, so its turns stay together."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or sum(1 for m in msgs if m.get("role") == "user") < 2:
        return None
    head = [m for m in msgs[:3] if m.get("role") in ("system", "user")][:2]
    return hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()


def validate_body(body: Any, kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "'model' is required and must be a non-empty string", "invalid_type", "model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise APIError(400, "'stream' must be a boolean", "invalid_type", "stream")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' is required and must be a non-empty array", "invalid_type", "messages")
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise APIError(
                    400, f"messages[{i}] must be an object with a string 'role'", "invalid_type", f"messages[{i}]"
                )
            if not isinstance(msg.get("content"), str | list | type(None)):
                raise APIError(
                    400,
                    f"messages[{i}].content must be a string, an array or null",
                    "invalid_type",
                    f"messages[{i}].content",
                )
    else:
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, str | int) and not isinstance(p, bool) for p in prompt)
        )
        if not ok:
            raise APIError(
                400, "'prompt' is required: a string or an array of strings or token ids", "invalid_type", "prompt"
            )
    return body


# --- the OpenAPI schema of the two POST bodies (the handlers parse raw JSON themselves, to answer in OpenAI's
# error format; the schema documents them and lets schemathesis generate requests) ---
_MESSAGE = {
    "type": "object",
    "properties": {"role": {"type": "string"}, "content": {"type": ["string", "null"]}},
    "required": ["role", "content"],
}
CHAT_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
    },
    "required": ["model", "messages"],
}
COMPLETION_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer"},
    },
    "required": ["model", "prompt"],
}
_RESPONSES = {str(s): {"description": ERROR_TYPES[s]} for s in (400, 401, 404, 413, 429, 502, 503, 504)}


def _body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def create_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t = router.policy.timeouts
        router.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=t.connect_s, read=t.first_byte_s, write=t.first_byte_s, pool=t.connect_s),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            trust_env=False,
        )
        router.refresh_manifest(force=True)
        if router.classifier is None or not isinstance(router.classifier, tuple) or len(router.classifier) != 2:
            await asyncio.to_thread(router.build_classifier)
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no SIGHUP
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _sighup)

        async def poll_manifests() -> None:  # URL sources are fetched here, off the request path
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(router.refresh_manifest, True)

        poller = asyncio.create_task(poll_manifests())
        yield
        poller.cancel()
        await router.client.aclose()

    def _sighup() -> None:
        try:
            router.reload_policy()
            log.warning("policy reloaded from %s (SIGHUP)", router.policy_path)
        except ConfigError as exc:
            log.error("policy not reloaded, the old one stays: %s", exc)

    app = FastAPI(title="cycleqd-router", version="1", lifespan=lifespan)
    app.state.router = router
    ui = UIState()  # the operator page's recent decisions and per-minute counts
    app.include_router(ui_routes(router, ui))

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()[0].get('msg', 'bad input')}")

    def authenticate(request: Request) -> str:
        keys = router.policy.api_keys()
        client = request.client.host if request.client else "unknown"
        if not keys:
            return client
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
        match = False
        for k in keys:  # every key compared, in constant time each
            match |= hmac.compare_digest(given, k.encode())
        if not match:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        return hashlib.sha256(given).hexdigest()[:16]

    async def proxy(request: Request, kind: str, path: str) -> Response:
        route = path
        t0 = time.perf_counter()
        status = 500
        response: Response | None = None
        try:
            key = authenticate(request)
            if router.limiter and not router.limiter.take(key):
                raise APIError(429, "rate limit exceeded for this key; retry later", "rate_limit_exceeded")
            limit = router.policy.max_body_bytes
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise APIError(413, f"request body exceeds {limit} bytes", "request_too_large")
            raw = b""
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise APIError(413, f"request body exceeds {limit} bytes", "request_too_large")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
            body = validate_body(body, kind)
            router.refresh_manifest()
            candidates, weights, reason = router.decide(body, request.headers, request_text(body))
            response = await forward(body, candidates, weights, reason, route, t0)
            status = response.status_code
            return response
        except APIError as exc:
            status = exc.status
            return error_response(exc.status, exc.message, exc.code, exc.param)
        finally:
            router.metrics.requests.labels(route, str(status)).inc()
            router.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            ui.record(route, status, response.headers if response else None, time.perf_counter() - t0)

    async def forward(
        body: dict[str, Any],
        candidates: list[EliteEntry],
        weights: dict[str, float],
        reason: str,
        route: str,
        t0: float,
    ) -> Response:
        assert router.client is not None
        stream = bool(body.get("stream"))
        pol = router.policy
        last_error = "no upstream tried"
        for attempt, elite in enumerate(candidates[: pol.max_attempts]):
            engine = elite.engine_id
            url = elite.endpoint.rstrip("/") + route.removeprefix("/v1")
            payload = json.dumps({**body, "model": elite.served_model_name}).encode()
            headers = {
                "x-cycleqd-elite": elite.id,
                "x-cycleqd-skill-weights": ",".join(f"{k}={v:.3f}" for k, v in weights.items()),
                "x-cycleqd-reason": reason if attempt == 0 else f"{reason};fallback:{attempt}",
                "x-cycleqd-engine": engine,
            }
            router.inflight[engine] += 1
            try:
                req = router.client.build_request(
                    "POST", url, content=payload, headers={"content-type": "application/json"}
                )
                resp = await router.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                router.inflight[engine] -= 1
                router.breaker(engine).record(False)
                router.metrics.upstream_errors.labels(engine, type(exc).__name__).inc()
                last_error = f"{engine}: {type(exc).__name__}"
                continue  # nothing reached the client yet: safe to try the next elite
            except httpx.TimeoutException as exc:
                router.inflight[engine] -= 1
                router.breaker(engine).record(False)
                router.metrics.upstream_errors.labels(engine, "timeout").inc()
                raise APIError(
                    504, f"elite {elite.id} did not answer within {pol.timeouts.first_byte_s} s", "upstream_timeout"
                ) from exc
            router.metrics.ttfb.labels(route).observe(time.perf_counter() - t0)
            if resp.status_code >= 500:
                await resp.aclose()
                router.inflight[engine] -= 1
                router.breaker(engine).record(False)
                router.metrics.upstream_errors.labels(engine, f"http_{resp.status_code}").inc()
                last_error = f"{engine}: HTTP {resp.status_code}"
                continue
            router.breaker(engine).record(True)
            dominant = max(weights, key=weights.__getitem__)
            router.metrics.decisions.labels(elite.id, dominant, reason.split(":")[0]).inc()
            ctype = resp.headers.get("content-type", "application/json")
            if stream and resp.status_code == 200:

                async def relay(resp: httpx.Response = resp, engine: str = engine) -> AsyncIterator[bytes]:
                    loop = asyncio.get_running_loop()
                    try:
                        # one timer for the whole stream, re-armed per chunk (cheaper than a wait_for per chunk),
                        # and disarmed while the client consumes a chunk
                        async with asyncio.timeout(None) as idle:
                            chunks = resp.aiter_raw()
                            while True:
                                idle.reschedule(loop.time() + pol.timeouts.idle_s)
                                try:
                                    chunk = await anext(chunks)
                                except StopAsyncIteration:
                                    break
                                idle.reschedule(None)
                                yield chunk
                    except (httpx.HTTPError, TimeoutError) as exc:
                        kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                        router.metrics.upstream_errors.labels(engine, f"midstream_{kind}").inc()
                        router.breaker(engine).record(False)
                        err = error_body(502, f"the upstream stream broke off ({kind}); the answer is incomplete")
                        yield f"data: {json.dumps(err)}\n\n".encode()
                        yield b"data: [DONE]\n\n"
                    finally:
                        await resp.aclose()
                        router.inflight[engine] -= 1

                return StreamingResponse(relay(), status_code=200, media_type=ctype, headers=headers)
            try:
                content = await asyncio.wait_for(resp.aread(), pol.timeouts.first_byte_s)
            except (httpx.HTTPError, TimeoutError) as exc:
                router.metrics.upstream_errors.labels(engine, "body").inc()
                router.breaker(engine).record(False)
                raise APIError(502, f"elite {elite.id}: the upstream response broke off", "upstream_error") from exc
            finally:
                await resp.aclose()
                router.inflight[engine] -= 1
            return Response(content, status_code=resp.status_code, media_type=ctype, headers=headers)
        raise APIError(502, f"every upstream tried failed ({last_error})", "upstream_error")

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(CHAT_SCHEMA), responses=_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions", openapi_extra=_body_doc(COMPLETION_SCHEMA), responses=_RESPONSES)
    async def completions(request: Request) -> Response:
        return await proxy(request, "completions", "/v1/completions")

    @app.get("/v1/models", responses=_RESPONSES)
    async def models(request: Request) -> dict[str, Any]:
        authenticate(request)
        router.refresh_manifest()
        m = router.manifest
        data: list[dict[str, Any]] = []
        if m is not None:
            seen: dict[str, dict[str, Any]] = {}
            for e in m.elites:  # an elite served from several manifests is listed once
                health = m.health_of(e).value
                if e.id in seen:
                    if health == Health.READY.value:
                        seen[e.id]["cycleqd"]["health"] = health
                    seen[e.id]["cycleqd"]["engines"].append(e.engine_id)
                    continue
                seen[e.id] = {
                    "id": e.id, "object": "model", "created": int(m.updated_at), "owned_by": "cycleqd",
                    "cycleqd": {
                        "kind": "elite", "scores": e.routing_scores(), "archive_scores": e.scores,
                        "test_scores": e.test_scores, "lineage": e.lineage, "health": health,
                        "engines": [e.engine_id],
                    },
                }  # fmt: skip
            data += seen.values()
        for name, w in router.policy.aliases.items():
            data.append({
                "id": name, "object": "model", "created": 0, "owned_by": "cycleqd-router",
                "cycleqd": {"kind": "alias", "weights": w},
            })  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> JSONResponse:
        router.refresh_manifest()
        m = router.manifest
        ready = [e.id for e in m.elites if router.healthy(e)] if m else []
        body = {
            "status": "ok" if ready else "degraded",
            "healthy_elites": len(ready),
            "manifests": router.policy.manifests,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", responses=_RESPONSES)
    async def reload(request: Request) -> dict[str, Any]:
        key = os.environ.get(router.policy.admin_key_env, "")
        if not key:
            raise APIError(403, f"admin endpoints are disabled: set {router.policy.admin_key_env}", "admin_disabled")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong admin key", "invalid_api_key")
        try:
            new = await asyncio.to_thread(router.reload_policy)
        except ConfigError as exc:
            raise APIError(400, f"policy not reloaded, the old one stays: {exc}", "invalid_policy") from exc
        return {"reloaded": str(router.policy_path), "aliases": list(new.aliases), "margin": new.margin}

    return app

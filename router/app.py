"""The OpenAI-compatible gateway (FastAPI): routes, authentication and start-up; the work is elsewhere.

Per request: authenticate and limit (here), parse and validate (``router.protocol``), decide (``router.decision``),
forward and relay (``router.upstream``). Every response names the elite, the weights and the reason in headers.
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.configfile import ConfigError
from router.decision import Router
from router.protocol import (
    CHAT_SCHEMA,
    COMPLETION_SCHEMA,
    ERROR_RESPONSES,
    APIError,
    body_doc,
    error_response,
    request_text,
    validate_body,
)
from router.upstream import forward, make_client
from serve.manifest import Health

log = logging.getLogger("cycleqd.router")

__all__ = ["Router", "create_app"]


def create_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router.client = make_client(router.policy)
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
            response = await forward(router, body, candidates, weights, reason, route, t0)
            status = response.status_code
            return response
        except APIError as exc:
            status = exc.status
            return error_response(exc.status, exc.message, exc.code, exc.param)
        finally:
            router.metrics.requests.labels(route, str(status)).inc()
            router.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    @app.post("/v1/chat/completions", openapi_extra=body_doc(CHAT_SCHEMA), responses=ERROR_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions", openapi_extra=body_doc(COMPLETION_SCHEMA), responses=ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        return await proxy(request, "completions", "/v1/completions")

    @app.get("/v1/models", responses=ERROR_RESPONSES)
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

    @app.post("/admin/reload", responses=ERROR_RESPONSES)
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

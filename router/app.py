"""The OpenAI-compatible gateway (FastAPI): routes, authentication and start-up; the work is elsewhere.

Per request: authenticate (one dependency on every route) and limit (here), parse and validate
(``router.protocol``), decide (``router.decision``), forward and relay (``router.upstream``). Every response names
the elite, the weights and the reason in headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from cycleqd.auth import bearer_token, key_matches
from cycleqd.configfile import ConfigError
from router.decision import Router
from router.feedback import keep_in_sync, post_feedback
from router.protocol import (
    CHAT_SCHEMA,
    COMPLETION_SCHEMA,
    ERROR_RESPONSES,
    RESPONSES_SCHEMA,
    APIError,
    body_doc,
    error_response,
    parse_json,
    request_text,
    validate_body,
)
from router.tracing import RequestIdMiddleware, upstream_headers
from router.ui import UIState, ui_routes
from router.upstream import forward, make_client
from serve.manifest import Health

log = logging.getLogger("cycleqd.router")

__all__ = ["Router", "create_app"]


def freeze_heap() -> None:
    """Move every object alive now (modules, the app, the manifest) out of the garbage collector's reach.

    The tail of the router's latency under load was the cyclic GC: a full collection walks every tracked object,
    and one took 178 ms with the start-up heap in it, stalling all 64 requests in flight at once (3 of them in
    1,500 requests, measured with ``gc.callbacks``). Frozen objects are never scanned, so the collections left only
    walk what requests allocate. vLLM's API server does the same after its start-up."""
    gc.collect()
    gc.freeze()


def create_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router.client = make_client(router.policy)
        await asyncio.to_thread(router.refresh_manifest, True)
        router.check_policy()  # an alias the manifest cannot serve stops the start (ConfigError names it)
        router.start_classifier()  # in the background: the server answers at once
        freeze_heap()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no SIGHUP
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _sighup))

        async def poll_manifests() -> None:  # URL sources are fetched here, off the request path
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(router.refresh_manifest, True)
                if router.workers is not None:  # a policy another worker or the parent published
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(router.workers.follow, router)

        poller = asyncio.create_task(poll_manifests())
        syncer = asyncio.create_task(keep_in_sync(lambda: router.feedback))  # outcome feedback's shared store
        yield
        poller.cancel()
        syncer.cancel()
        await asyncio.to_thread(router.feedback.close)
        if router.classifier_task is not None:
            router.classifier_task.cancel()
        await router.client.aclose()

    def _sighup() -> None:
        try:
            router.reload_policy()
            log.warning("policy reloaded from %s (SIGHUP)", router.policy_path)
        except ConfigError as exc:
            log.error("policy not reloaded, the old one stays: %s", exc)

    keys_seen: dict[str, Any] = {}

    def api_keys() -> list[str]:
        """The policy's API keys, re-read only when the policy, the variable or the file's mtime changed (not a
        file read per request)."""
        pol = router.policy
        mtime = None
        if pol.api_keys_file is not None:
            with contextlib.suppress(OSError):
                mtime = os.stat(pol.api_keys_file).st_mtime_ns
        stamp = (id(pol), os.environ.get(pol.api_keys_env, ""), mtime)
        if keys_seen.get("stamp") != stamp:
            keys_seen["keys"], keys_seen["stamp"] = [k.encode() for k in pol.api_keys()], stamp
        return keys_seen["keys"]

    async def authenticate(request: Request) -> None:
        """The one authentication of every route; ``request.state.client_key`` is what the rate limit counts under.
        (``async``: a plain ``def`` dependency would send every request through FastAPI's thread pool.)

        ``/health`` is public (probes carry no keys and it says only healthy or not); ``/metrics`` is public only
        with ``metrics_public``; ``/admin/*`` needs the admin key; everything else (the API, ``/docs``,
        ``/openapi.json``) needs an API key when keys are set.
        """
        path, pol = request.url.path, router.policy
        request.state.client_key = request.client.host if request.client else "unknown"
        if path == "/health" or (path == "/metrics" and pol.metrics_public):
            return
        given = bearer_token(request.headers.get("authorization", ""))
        if not given and path == "/ui":  # a browser opening the operator page passes its key in the URL
            given = request.query_params.get("key", "").encode()
        if path.startswith("/admin/"):
            key = os.environ.get(pol.admin_key_env, "")
            if not key:
                raise APIError(403, f"admin endpoints are disabled: set {pol.admin_key_env}", "admin_disabled")
            if not key_matches(given, (key.encode(),)):
                raise APIError(401, "missing or wrong admin key", "invalid_api_key")
            return
        keys = api_keys()
        if not keys:
            return
        if not key_matches(given, keys):  # every key compared, in constant time each
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        request.state.client_key = hashlib.sha256(given).hexdigest()[:16]

    app = FastAPI(
        title="cycleqd-router", version="1", lifespan=lifespan, dependencies=[Depends(authenticate)],
        docs_url=None, redoc_url=None, openapi_url=None,  # served below, behind the same authentication
    )  # fmt: skip
    app.state.router = router
    app.add_middleware(RequestIdMiddleware)
    ui = UIState()  # the operator page's recent decisions and per-minute counts
    app.include_router(ui_routes(router, ui))

    def _with_id(request: Request, response: JSONResponse) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        if rid:
            response.headers["x-request-id"] = rid
        return response

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, **(exc.headers or {}))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()[0].get('msg', 'bad input')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # outside the middleware stack (Starlette's ServerErrorMiddleware): add the request id here
        return _with_id(request, internal_error(request, exc))

    def internal_error(request: Request, exc: BaseException) -> JSONResponse:
        rid = getattr(request.state, "request_id", "?")
        log.error("request %s: unexpected %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
        return error_response(
            500, f"internal error in the router (request id {rid}); its log has the details", "internal_error"
        )

    async def proxy(request: Request, kind: str, route: str) -> Response:
        t0 = time.perf_counter()
        status = 500
        response: Response | None = None
        try:
            if router.limiter and not router.limiter.take(request.state.client_key):
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
            body = validate_body(parse_json(raw), kind)
            router.refresh_manifest()
            text = request_text(body, kind)
            if router.needs_classifier(body, request.headers):
                await router.wait_classifier()
                # the classifier is a few ms of numpy: off the event loop, so other requests keep flowing
                decision = await asyncio.to_thread(router.decide, body, request.headers, text)
            else:
                decision = router.decide(body, request.headers, text)
            candidates, weights, reason = decision
            trace = upstream_headers(request.state)
            response = await forward(router, body, candidates, weights, reason, route, t0, trace)
            status = response.status_code
            if status < 400:  # who answered, for feedback naming this request or its session
                sid = request.headers.get(router.policy.session_header)
                router.feedback.remember(
                    request.state.request_id, sid, response.headers.get("x-cycleqd-elite"), weights
                )
            return response
        except APIError as exc:
            status = exc.status
            return error_response(exc.status, exc.message, exc.code, exc.param, **(exc.headers or {}))
        except Exception as exc:  # a bug must still answer in OpenAI's format
            return internal_error(request, exc)
        finally:
            router.metrics.requests.labels(route, str(status)).inc()
            router.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            ui.record(route, status, response.headers if response else None, time.perf_counter() - t0)

    @app.post("/v1/chat/completions", openapi_extra=body_doc(CHAT_SCHEMA), responses=ERROR_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions", openapi_extra=body_doc(COMPLETION_SCHEMA), responses=ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        return await proxy(request, "completions", "/v1/completions")

    @app.post("/v1/responses", openapi_extra=body_doc(RESPONSES_SCHEMA), responses=ERROR_RESPONSES)
    async def responses(request: Request) -> Response:
        """OpenAI's Responses API, stateless (see ``docs/agents.md``): routed like a chat, relayed to the engine's own
        ``/v1/responses``."""
        return await proxy(request, "responses", "/v1/responses")

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
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

    @app.post("/v1/feedback", responses={**ERROR_RESPONSES, "409": {"description": "conflict_error"}})
    async def feedback(request: Request) -> dict[str, Any]:
        """An agent's outcome for an answered request: ``{request_id | session_id, score in [0, 1]}``."""
        if router.limiter and not router.limiter.take(request.state.client_key):
            raise APIError(429, "rate limit exceeded for this key; retry later", "rate_limit_exceeded")
        return await post_feedback(router.feedback, request, router.metrics)

    @app.get("/v1/feedback", responses=ERROR_RESPONSES)
    async def feedback_stats() -> dict[str, Any]:
        """The per-elite, per-skill posteriors that outcome feedback has built (read-only)."""
        return router.feedback.stats(router.manifest)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Healthy (some elite can be served) or not; nothing else, since it is public."""
        router.refresh_manifest()
        m = router.manifest
        ok = m is not None and any(router.healthy(e) for e in m.elites)
        return JSONResponse({"status": "ok" if ok else "degraded"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="cycleqd-router")

    @app.post("/admin/reload", responses=ERROR_RESPONSES)
    async def reload() -> dict[str, Any]:
        try:
            new = await asyncio.to_thread(router.reload_policy)
        except ConfigError as exc:
            raise APIError(400, f"policy not reloaded, the old one stays: {exc}", "invalid_policy") from exc
        return {"reloaded": str(router.policy_path), "aliases": list(new.aliases), "margin": new.margin}

    return app

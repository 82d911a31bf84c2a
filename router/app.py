"""The OpenAI-compatible gateway (FastAPI): the app, its state, its error handlers and its background work.

``create_app`` puts the router's state on ``app.state`` (``router``: the policy, manifest, classifier, breakers and
load, ``router.decision.Router``; ``ui``: the operator page's record; ``api_keys``), includes the routes
(``router.routes``: the OpenAI API, feedback, operations, the operator page) behind one authentication dependency
(``router.auth``), and turns every error into OpenAI's format (``router.errors``). What a request does is
``router.serving``.

The lifespan starts the work that is kept off the request path: a poll loop that re-reads the manifests, the API
keys and a policy another worker published, and counts the operator page's requests, once a second; and outcome
feedback's sync with a shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cycleqd.configfile import ConfigError
from router.auth import ApiKeys, authenticate
from router.decision import Router
from router.errors import APIError, error_response
from router.feedback import keep_in_sync
from router.protocol import request_schemas
from router.routes import admin, feedback, openai, ui
from router.serving import internal_error
from router.tracing import RequestIdMiddleware
from router.ui import UIState
from router.upstream import make_client

log = logging.getLogger("cycleqd.router")

__all__ = ["Router", "create_app"]

#: How often the poll loop re-reads what may have changed (the manifests, the keys, a published policy).
POLL_S = 1.0


def freeze_heap() -> None:
    """Move every object alive now (modules, the app, the manifest) out of the garbage collector's reach.

    The tail of the router's latency under load was the cyclic GC: a full collection walks every tracked object,
    and one took 178 ms with the start-up heap in it, stalling all 64 requests in flight at once (3 of them in
    1,500 requests, measured with ``gc.callbacks``). Frozen objects are never scanned, so the collections left only
    walk what requests allocate. vLLM's API server does the same after its start-up."""
    gc.collect()
    gc.freeze()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    router: Router = app.state.router
    router.client = make_client(router.policy)
    await asyncio.to_thread(router.refresh_manifest, True)
    router.check_policy()  # an alias the manifest cannot serve stops the start (ConfigError names it)
    router.start_classifier()  # in the background: the server answers at once
    freeze_heap()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no SIGHUP
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload_on_sighup, router))
    poller = asyncio.create_task(poll(app))
    syncer = asyncio.create_task(keep_in_sync(lambda: router.feedback))  # outcome feedback's shared store
    yield
    poller.cancel()
    syncer.cancel()
    await asyncio.to_thread(router.feedback.close)
    if router.classifier_task is not None:
        router.classifier_task.cancel()
    await router.client.aclose()


async def poll(app: FastAPI) -> None:
    """Once a second, off the request path: the manifests (URL sources are fetched here), a policy another worker
    or the parent published, the API keys, and the operator page's counts."""
    router: Router = app.state.router
    while True:
        await asyncio.sleep(POLL_S)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(router.refresh_manifest, True)
        if router.workers is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(follow, router)
        with contextlib.suppress(Exception):  # a keys file that cannot be read: the keys read last stay
            app.state.api_keys.refresh(router.policy)
        app.state.ui.fold()


def follow(router: Router) -> None:
    """Apply the policy another worker (or the parent) published since, if any."""
    assert router.workers is not None
    new = router.workers.follow()
    if new is None:
        return
    try:
        router.reload_policy(new)
    except ConfigError as exc:
        log.error("the published policy not applied, the old one stays: %s", exc)
        return
    log.warning("policy reloaded (published by another process)")


def reload_on_sighup(router: Router) -> None:
    try:
        router.reload_policy()
        log.warning("policy reloaded from %s (SIGHUP)", router.policy_path)
    except ConfigError as exc:
        log.error("policy not reloaded, the old one stays: %s", exc)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the request models' schemas (``router.protocol``) among its components: the
    routes read their bodies themselves, so FastAPI does not see the models (``body_doc`` refers to them)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas())
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(router: Router) -> FastAPI:
    app = FastAPI(
        title="cycleqd-router", version="1", lifespan=lifespan, dependencies=[Depends(authenticate)],
        docs_url=None, redoc_url=None, openapi_url=None,  # served by router.routes.admin, behind authentication
    )  # fmt: skip
    app.state.router = router
    app.state.ui = UIState()  # the operator page's recent decisions and per-minute counts
    app.state.api_keys = ApiKeys()
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.add_middleware(RequestIdMiddleware)
    for routes in (openai.api, feedback.api, admin.api, ui.api):
        app.include_router(routes)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()[0].get('msg', 'bad input')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # outside the middleware stack (Starlette's ServerErrorMiddleware): the request id is added here
        response = internal_error(request, exc)
        if rid := getattr(request.state, "request_id", None):
            response.headers["x-request-id"] = rid
        return response

    return app

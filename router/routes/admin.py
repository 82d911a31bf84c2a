"""Operations: ``/health`` (public), ``/metrics``, the API's schema and docs, and ``POST /admin/reload`` (the
admin key) that re-reads the policy file."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cycleqd.configfile import ConfigError
from router.errors import ERROR_RESPONSES, APIError

api = APIRouter()


@api.get("/health")
async def health(request: Request) -> JSONResponse:
    """Healthy (some elite can be served) or not; nothing else, since it is public."""
    router = request.app.state.router
    m = router.manifest
    ok = m is not None and any(router.healthy(e) for e in m.elites)
    return JSONResponse({"status": "ok" if ok else "degraded"}, status_code=200 if ok else 503)


@api.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.router.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@api.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@api.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="cycleqd-router")


@api.post("/admin/reload", responses=ERROR_RESPONSES)
async def reload(request: Request) -> dict[str, Any]:
    router = request.app.state.router
    try:
        new = await asyncio.to_thread(router.reload_policy)
    except ConfigError as exc:
        raise APIError(400, f"policy not reloaded, the old one stays: {exc}", "invalid_policy") from exc
    return {"reloaded": str(router.policy_path), "aliases": list(new.aliases), "margin": new.margin}

"""The operator page: ``GET /ui`` (the page) and ``GET /ui/state`` (its data, ``router.ui.snapshot``), behind the
router's API keys like every route (the page may carry its key as ``/ui?key=...``)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from router.ui import snapshot

PAGE = files("router").joinpath("ui.html").read_text()

api = APIRouter(include_in_schema=False)


@api.get("/ui", response_class=HTMLResponse)
async def ui_page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@api.get("/ui/state")
async def ui_state(request: Request) -> dict[str, Any]:
    return snapshot(request.app.state.router, request.app.state.ui)

"""The OpenAI API: chat completions, completions and Responses (each routed to an elite and relayed, by
``router.serving``), and the models a client may name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from router.errors import ERROR_RESPONSES
from router.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest, body_doc
from router.serving import proxy
from serve.manifest import Health

api = APIRouter(responses=ERROR_RESPONSES)


@api.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await proxy(request, "chat", "/v1/chat/completions")


@api.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
async def completions(request: Request) -> Response:
    return await proxy(request, "completions", "/v1/completions")


@api.post("/v1/responses", openapi_extra=body_doc(ResponsesRequest))
async def responses(request: Request) -> Response:
    """OpenAI's Responses API, stateless (see ``docs/agents.md``): routed like a chat, relayed to the engine's own
    ``/v1/responses``."""
    return await proxy(request, "responses", "/v1/responses")


@api.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served elites (once each, with their scores, lineage and health) and the policy's aliases."""
    router = request.app.state.router
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
                    "test_scores": e.test_scores, "lineage": e.lineage, "health": health, "engines": [e.engine_id],
                },
            }  # fmt: skip
        data += seen.values()
    for name, w in router.policy.aliases.items():
        data.append({
            "id": name, "object": "model", "created": 0, "owned_by": "cycleqd-router",
            "cycleqd": {"kind": "alias", "weights": w},
        })  # fmt: skip
    return {"object": "list", "data": data}

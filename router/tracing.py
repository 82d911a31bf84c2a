"""Request ids and trace context: every request gets an ``x-request-id`` (the client's, when it is a sane one, else
a new one), returned on the response (errors included) and sent to the engine with the W3C ``traceparent``, so one
request can be followed from the agent through the router into vLLM's logs.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which costs a task and a queue per request).
"""

from __future__ import annotations

import os
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid: bytes | None = None
        trace: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                rid = value
            elif name == b"traceparent" and _TRACEPARENT.fullmatch(value):
                trace["traceparent"] = value.decode()
            elif name == b"tracestate" and len(value) <= 512:
                trace["tracestate"] = value.decode("latin-1")
        if "traceparent" not in trace:
            trace.pop("tracestate", None)  # meaningless without its parent
        rid = rid or os.urandom(16).hex().encode()  # unguessable: feedback names a request by its id
        state = scope.setdefault("state", {})
        state["request_id"], state["trace"] = rid.decode(), trace

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def upstream_headers(state: Any) -> dict[str, str]:
    """What the engine is told about the request: its id and trace context."""
    rid = getattr(state, "request_id", None)
    return {**({"x-request-id": rid} if rid else {}), **getattr(state, "trace", {})}

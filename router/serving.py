"""The work behind every routed request (chat, completions, responses): limit, read, validate, decide, forward,
and count. The routes (``router.routes.openai``) only name the kind.

Per request the hot path does only what the answer needs; what can wait is done elsewhere: the manifest, the
policy and the API keys are re-read by the app's poll loop, the decision's lookups are kept per policy and manifest
(``router.decision.Table``), and the operator page only notes the request (``router.ui``). Every response names
the elite, the weights and the reason in headers (``router.upstream``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from router.auth import client_key
from router.conversation import request_text
from router.errors import APIError, error_response
from router.protocol import parse_request, read_body
from router.tracing import upstream_headers
from router.upstream import forward

if TYPE_CHECKING:
    from router.decision import Router
    from router.ui import UIState

log = logging.getLogger("cycleqd.router")


async def proxy(request: Request, kind: str, route: str) -> Response:
    """Answer a request of ``kind`` (``router.protocol.REQUESTS``) on ``route`` from the best elite for it."""
    state = request.app.state
    router: Router = state.router
    t0 = time.perf_counter()
    status = 500
    response: Response | None = None
    try:
        if router.limiter and not router.limiter.take(client_key(request)):
            raise APIError(429, "rate limit exceeded for this key; retry later", "rate_limit_exceeded")
        body = parse_request(await read_body(request, router.policy.max_body_bytes), kind)
        headers = request.headers
        if router.needs_classifier(body, headers):
            await router.wait_classifier()
            # the classifier is a few ms of numpy: off the event loop, so other requests keep flowing
            decision = await asyncio.to_thread(router.decide, body, headers, request_text(body, kind))
        else:
            decision = router.decide(body, headers, "")  # the text is the classifier's only
        candidates, weights, reason = decision
        response = await forward(router, body, candidates, weights, reason, route, t0, upstream_headers(request.state))
        status = response.status_code
        if status < 400 and router.feedback.enabled:  # who answered, for feedback naming this request or its session
            router.feedback.remember(
                request.state.request_id, headers.get(router.policy.session_header),
                response.headers.get("x-cycleqd-elite"), weights,
            )  # fmt: skip
        return response
    except APIError as exc:
        status = exc.status
        return exc.response()
    except Exception as exc:  # a bug must still answer in OpenAI's format
        return internal_error(request, exc)
    finally:
        seconds = time.perf_counter() - t0
        router.metrics.answered(route, status, seconds)
        ui: UIState = state.ui
        ui.note(route, status, response.headers if response else None, seconds)


def internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """A 500 in OpenAI's format that names the request id; the details go to the log, not to the client."""
    rid = getattr(request.state, "request_id", "?")
    log.error("request %s: unexpected %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
    return error_response(
        500, f"internal error in the router (request id {rid}); its log has the details", "internal_error"
    )

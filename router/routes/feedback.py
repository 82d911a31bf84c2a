"""Outcome feedback over HTTP: ``POST /v1/feedback`` (an agent's score for an answered request or session) and
``GET /v1/feedback`` (the posteriors it built, read-only). The posteriors themselves are ``router.feedback``."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import APIRouter, Request

from router.auth import client_key
from router.errors import ERROR_RESPONSES, APIError
from router.protocol import parse_json, read_body

log = logging.getLogger("cycleqd.router")

#: A feedback body is a few ids and a number.
MAX_FEEDBACK_BYTES = 16_384
_FIELDS = {"request_id", "session_id", "score"}

api = APIRouter(responses=ERROR_RESPONSES)


def parse_feedback(body: Any) -> tuple[str | None, str | None, float]:
    """(request_id, session_id, score) of a feedback body; APIError 400 naming the field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object: {request_id | session_id, score}")
    if unknown := sorted(set(body) - _FIELDS):
        raise APIError(400, f"unrecognized field(s): {', '.join(unknown)}; expected request_id or session_id, and "
                       "score", "invalid_request", unknown[0])  # fmt: skip
    rid, sid, score = body.get("request_id"), body.get("session_id"), body.get("score")
    if (rid is None) == (sid is None):
        raise APIError(400, "give exactly one of request_id (the x-request-id of the answer) and session_id",
                       "invalid_request", "request_id")  # fmt: skip
    for name, v in (("request_id", rid), ("session_id", sid)):
        if v is not None and (not isinstance(v, str) or not v or len(v) > 256):
            raise APIError(400, f"{name} must be a non-empty string of at most 256 characters", "invalid_request", name)
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise APIError(400, "score must be a number in [0, 1] (1: the task succeeded)", "invalid_score", "score")
    if not 0.0 <= score <= 1.0:
        raise APIError(400, f"score {score} is outside [0, 1]", "invalid_score", "score")
    return rid, sid, float(score)


@api.post("/v1/feedback", responses={"409": {"description": "conflict_error"}})
async def post_feedback(request: Request) -> dict[str, Any]:
    """An agent's outcome for an answered request: ``{request_id | session_id, score in [0, 1]}``; counted in the
    metrics by result (accepted, or the error code)."""
    router = request.app.state.router
    fb, metrics = router.feedback, router.metrics
    if router.limiter and not router.limiter.take(client_key(request)):
        raise APIError(429, "rate limit exceeded for this key; retry later", "rate_limit_exceeded")
    try:
        if not fb.enabled:
            raise APIError(404, "outcome feedback is off: set feedback.enabled in the routing policy",
                           "feedback_disabled")  # fmt: skip
        rid, sid, score = parse_feedback(parse_json(await read_body(request, MAX_FEEDBACK_BYTES)))
        try:
            served = await fb.rate_async(rid, sid, score)
        except APIError:
            raise
        except Exception as exc:  # the store is down: nothing was counted
            log.error("feedback not stored: %s: %s", type(exc).__name__, exc)
            raise APIError(503, f"the feedback store ({fb.policy.store}) is unavailable; retry later",
                           "feedback_store_unavailable") from exc  # fmt: skip
    except APIError as exc:
        metrics.feedback.labels(exc.code or "invalid_request").inc()
        raise
    metrics.feedback.labels("accepted").inc()
    metrics.feedback_score.labels(served.elite).observe(score)
    return {"object": "feedback", "request_id": served.request_id, "elite": served.elite,
            "weights": served.weights, "score": score}  # fmt: skip


@api.get("/v1/feedback")
async def feedback_stats(request: Request) -> dict[str, Any]:
    """The per-elite, per-skill posteriors that outcome feedback has built (read-only)."""
    router = request.app.state.router
    return router.feedback.stats(router.manifest)

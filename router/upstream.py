"""The relay to the engines: send the request to the ranked elites in turn, and relay the answer.

Retries go to the next elite only on a connect error, a connection closed before the response, or a 5xx, and only
before the first byte reached the client; a connection-level failure of the last candidate retries that candidate.
Once streaming has begun, an upstream failure ends the stream with an OpenAI-style error event (for the Responses
API, an ``event: error`` event in its own event sequence). Each attempt is recorded in the engine's circuit breaker
and in the metrics.

Timeouts cost nothing per chunk: the wait for the response headers is bounded by the client's read timeout
(``first_byte_s``); once they came, a stream's read timeout becomes ``idle_s``, so a stall between two chunks ends
the stream (httpcore applies the read timeout to each read of the body, from the request's ``timeout``
extension as it is when the body is first read).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from router.decision import Router
from router.errors import APIError, error_body
from router.policy import RoutingPolicy
from serve.manifest import EliteEntry


def make_client(policy: RoutingPolicy) -> httpx.AsyncClient:
    t = policy.timeouts
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=t.connect_s, read=t.first_byte_s, write=t.first_byte_s, pool=t.connect_s),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        trust_env=False,
    )


async def forward(
    router: Router,
    body: dict[str, Any],
    candidates: list[EliteEntry],
    weights: dict[str, float],
    reason: str,
    route: str,
    t0: float,
    trace: dict[str, str] | None = None,
) -> Response:
    """Try the candidates in order (at most ``max_attempts``); ``trace`` (request id, traceparent) goes upstream."""
    assert router.client is not None
    stream = bool(body.get("stream"))
    responses = route == "/v1/responses"
    pol = router.policy
    last_error = "no upstream tried"
    sent = {"content-type": "application/json", **(trace or {})}
    if router.engine_key:
        sent["authorization"] = f"Bearer {router.engine_key}"
    queue = list(candidates)
    weights_header = ",".join(f"{k}={v:.3f}" for k, v in weights.items())
    tied = getattr(candidates, "tied", ())  # the scores could not separate these: load or session chose
    for attempt in range(pol.max_attempts):
        if not queue:
            break
        elite = queue.pop(0)
        engine = elite.engine_id
        breaker = router.breaker(engine)
        if not breaker.acquire():  # half-open, and another request holds the one trial
            last_error = f"{engine}: circuit open"
            continue
        url = elite.endpoint.rstrip("/") + route.removeprefix("/v1")
        sent_body = {**body, "model": elite.served_model_name}
        if responses:  # stateless: the engine keeps nothing either (vLLM would otherwise store when told to)
            sent_body["store"] = False
        payload = json.dumps(sent_body).encode()
        headers = {
            "x-cycleqd-elite": elite.id,
            "x-cycleqd-skill-weights": weights_header,
            "x-cycleqd-reason": reason if attempt == 0 else f"{reason};fallback:{attempt}",
            "x-cycleqd-engine": engine,
        }
        if tied:
            headers["x-cycleqd-tie"] = ",".join(tied)
        router.inflight[engine] += 1
        try:
            req = router.client.build_request("POST", url, content=payload, headers=sent)
            resp = await router.client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            router.inflight[engine] -= 1
            breaker.record(False)
            router.metrics.upstream_errors.labels(engine, type(exc).__name__).inc()
            last_error = f"{engine}: {type(exc).__name__}"
            if not queue:
                # the last candidate: try it again. A reused keep-alive connection the engine had just closed, or
                # an engine too busy to accept within connect_s, is often fine on the next try, and with the
                # other replica dead (the chaos test) there is no other engine to go to
                queue.append(elite)
            continue  # nothing reached the client yet: safe to try the next elite
        except httpx.TimeoutException as exc:
            router.inflight[engine] -= 1
            breaker.record(False)
            router.metrics.upstream_errors.labels(engine, "timeout").inc()
            raise APIError(
                504, f"elite {elite.id} did not answer within {pol.timeouts.first_byte_s} s", "upstream_timeout"
            ) from exc
        except BaseException:  # cancelled (the client left) or a bug: give the trial back, count nothing
            router.inflight[engine] -= 1
            breaker.trial_at = None
            raise
        router.metrics.first_byte(route, time.perf_counter() - t0)
        if resp.status_code >= 500 or resp.status_code in (401, 403):
            await resp.aclose()
            router.inflight[engine] -= 1
            breaker.record(False)
            router.metrics.upstream_errors.labels(engine, f"http_{resp.status_code}").inc()
            last_error = f"{engine}: HTTP {resp.status_code}"
            if resp.status_code in (401, 403):  # the client's key is the router's business, not the engine's
                last_error += (
                    ", the engine refused the router's engine key: set CYCLEQD_ENGINE_KEY (or "
                    "CYCLEQD_ENGINE_KEY_FILE) to the key the engines were started with"
                )
            continue
        breaker.record(True)
        dominant = max(weights, key=weights.__getitem__)
        router.metrics.decided(elite.id, dominant, reason.split(":")[0])
        ctype = resp.headers.get("content-type", "application/json")
        if stream and resp.status_code == 200:
            req.extensions["timeout"] = {**req.extensions["timeout"], "read": pol.timeouts.idle_s}  # between chunks
            relayed = relay(router, resp, engine, events="event-stream" in ctype, responses=responses)
            return StreamingResponse(relayed, status_code=200, media_type=ctype, headers=headers)
        try:
            async with asyncio.timeout(pol.timeouts.first_byte_s):
                content = await resp.aread()
        except (httpx.HTTPError, TimeoutError) as exc:
            router.metrics.upstream_errors.labels(engine, "body").inc()
            breaker.record(False)
            raise APIError(502, f"elite {elite.id}: the upstream response broke off", "upstream_error") from exc
        finally:
            await resp.aclose()
            router.inflight[engine] -= 1
        return Response(content, status_code=resp.status_code, media_type=ctype, headers=headers)
    raise APIError(502, f"every upstream tried failed ({last_error})", "upstream_error")


async def relay(
    router: Router, resp: httpx.Response, engine: str, *, events: bool = True, responses: bool = False
) -> AsyncIterator[bytes]:
    """The upstream's stream, chunk by chunk; a break or a stall (a read that waited ``idle_s``: ``forward`` set
    the read timeout) ends it with an error event and ``[DONE]`` (with ``responses``: the Responses API's ``event:
    error``, numbered after the last event relayed, and no ``[DONE]``, which that API does not send).

    With ``events`` (server-sent events), only whole events are relayed: the bytes after the last blank line wait for
    the rest of their event. So when the upstream breaks off mid-event, the client has seen only complete events,
    and the error event that follows is parsed on its own instead of being glued onto half an event.
    """
    pending = b""  # the start of an event whose end has not arrived yet
    relayed = 0  # whole events relayed: the Responses API numbers its events from 0, so the next is this one
    try:
        async for chunk in resp.aiter_raw():
            if events:
                if pending or not chunk.endswith(b"\n\n"):  # else the chunk is whole events, as engines send them
                    chunk, pending = _whole_events(pending + chunk)
                    if not chunk:
                        continue
                if responses:
                    relayed += chunk.count(b"\n\n") + chunk.count(b"\r\n\r\n")
            yield chunk
        if pending:
            yield pending  # the stream ended normally without a final blank line: nothing is held back
    except Exception as exc:  # httpx errors, the idle timeout, and anything unexpected: the client is told
        kind = "timeout" if isinstance(exc, httpx.TimeoutException | TimeoutError) else type(exc).__name__
        router.metrics.upstream_errors.labels(engine, f"midstream_{kind}").inc()
        router.breaker(engine).record(False)
        err = error_body(502, f"the upstream stream broke off ({kind}); the answer is incomplete", "upstream_error")
        if responses:
            yield responses_error_event(err, relayed)
        else:
            yield f"data: {json.dumps(err)}\n\n".encode()
            yield b"data: [DONE]\n\n"
    finally:
        await resp.aclose()
        router.inflight[engine] -= 1


def responses_error_event(err: dict[str, Any], sequence_number: int) -> bytes:
    """The Responses API's error event (``type``, ``code``, ``message``, ``param``, ``sequence_number``), with the
    OpenAI error object as well: the official clients raise an ``APIError`` from a streamed ``error`` field."""
    e = err["error"]
    data = {"type": "error", "code": e["code"], "message": e["message"], "param": e["param"],
            "sequence_number": sequence_number, **err}  # fmt: skip
    return f"event: error\ndata: {json.dumps(data)}\n\n".encode()


def _whole_events(data: bytes) -> tuple[bytes, bytes]:
    """Split at the end of the last complete event (a blank line, ``\\n\\n`` or ``\\r\\n\\r\\n``)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
    return data[:end], data[end:]

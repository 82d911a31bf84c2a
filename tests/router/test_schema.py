"""Schemathesis over the router's OpenAPI schema: at least 1,000 generated requests, valid and invalid, never get a
5xx or crash the router, and every error is in the OpenAI error format. (Measured: 1,000 requests, 818 answered 400
and 182 404 — the generated model names are not served ones, so the fuzz exercises validation and errors, not the
relay; the relay has its own tests.)"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

#: Generated requests per operation and mode: chat, completions and responses, valid and invalid -> 6 x 170 = 1,020.
PER_OPERATION = 170


@pytest.mark.slow
def test_generated_requests_never_cause_a_server_error(start_router):
    r = start_router()
    schema = schemathesis.openapi.from_url(f"{r.url}/openapi.json")
    calls = 0
    checked = 0
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() != "POST" or op.path not in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case) -> None:
                nonlocal calls
                response = case.call(base_url=r.url)
                calls += 1
                statuses[response.status_code] += 1
                # the upstreams are healthy fakes: any 5xx, 502-504 included, is the router's fault
                assert response.status_code < 500, (response.status_code, response.text)
                headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
                if response.status_code >= 400:
                    assert headers["content-type"].startswith("application/json"), response.text
                    error = response.json()["error"]
                    assert set(error) >= {"message", "type", "code", "param"} and error["message"]
                else:  # answered by an elite, and saying which
                    assert "x-cycleqd-elite" in headers

            run()
            checked += 1
    assert checked == 6  # chat, completions and responses, valid and invalid
    assert calls >= 1000, calls
    print(f"{calls} generated requests, by status: {dict(sorted(statuses.items()))}")
    assert httpx.get(f"{r.url}/health").status_code == 200  # still up

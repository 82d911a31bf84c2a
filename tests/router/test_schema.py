"""Schemathesis over the router's OpenAPI schema: generated valid and invalid requests never get a 5xx or crash
the router, and every error is in the OpenAI error format."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode


def test_generated_requests_never_cause_a_server_error(start_router):
    r = start_router()
    schema = schemathesis.openapi.from_url(f"{r.url}/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() != "POST" or not op.path.startswith("/v1/"):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case) -> None:
                response = case.call(base_url=r.url)
                assert response.status_code < 500 or response.status_code in (502, 503, 504), (
                    response.status_code,
                    response.text,
                )
                if response.status_code >= 400:
                    assert set(response.json()["error"]) >= {"message", "type", "code", "param"}

            run()
            checked += 1
    assert checked == 4  # chat and completions, valid and invalid
    assert httpx.get(f"{r.url}/health").status_code == 200  # still up

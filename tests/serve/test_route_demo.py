"""`cycleqd-serve route-demo` against a router whose classifier is still starting (503 classifier_starting): it
waits as Retry-After says instead of failing the demo, and gives up after --classifier-wait."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from serve.cli import app


@pytest.fixture
def starting_router():
    """A stand-in router: the first ``state['starting']`` chat requests get the router's 503, the rest an answer."""
    state = {"starting": 2, "seen": 0, "in_flight": 0, "peak": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            with lock:
                state["seen"] += 1
                seen = state["seen"]
            if seen <= state["starting"]:
                body = {"error": {"message": "the skill classifier is still starting", "type": "server_error",
                                  "param": None, "code": "classifier_starting"}}  # fmt: skip
                status, extra = 503, {"retry-after": "0"}
            else:
                body = {"id": "c", "object": "chat.completion", "created": 0, "model": "g1",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "no idea"}}]}  # fmt: skip
                status, extra = 200, {"x-cycleqd-elite": "g1", "x-cycleqd-reason": "classifier"}
                with lock:
                    state["in_flight"] += 1
                    state["peak"] = max(state["peak"], state["in_flight"])
                time.sleep(0.2)  # long enough for the demo's other requests to arrive meanwhile
                with lock:
                    state["in_flight"] -= 1
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()


def test_it_waits_for_a_starting_classifier(starting_router):
    url, state = starting_router
    out = CliRunner().invoke(app, ["route-demo", "--url", url, "--per-skill", "1"])
    assert out.exit_code == 0, out.output
    assert state["seen"] == 2 + 3  # two refusals, then one task per skill
    assert "waiting for it" in out.output and "score per skill" in out.output
    assert out.output.count("waiting for it") == 1  # said once, though several requests were refused


def test_it_keeps_requests_in_flight_at_once(starting_router):
    url, state = starting_router
    state["starting"] = 0
    out = CliRunner().invoke(app, ["route-demo", "--url", url, "--per-skill", "2", "--concurrency", "4"])
    assert out.exit_code == 0, out.output
    assert state["seen"] == 6 and state["peak"] >= 2  # 6 tasks; several in flight together
    state["peak"] = 0
    sequential = CliRunner().invoke(app, ["route-demo", "--url", url, "--per-skill", "2", "--concurrency", "1"])
    assert sequential.exit_code == 0, sequential.output
    assert state["seen"] == 12 and state["peak"] == 1


def test_it_gives_up_after_classifier_wait(starting_router):
    url, state = starting_router
    state["starting"] = 10**6
    out = CliRunner().invoke(app, ["route-demo", "--url", url, "--per-skill", "1", "--classifier-wait", "0.5"])
    assert out.exit_code == 1
    assert "classifier" in out.output

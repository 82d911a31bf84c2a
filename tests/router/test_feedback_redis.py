"""Outcome feedback shared through Redis: a real ``redis-server`` (Debian's package; ``make test`` installs it where
it can) and two separate router processes that agree on what agents reported."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from router.feedback_stores import ALREADY_RATED, RedisStore, Served
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from testkit.router_fakes import FakeUpstream
from tests.conftest import stop_process
from tests.router.conftest import ELITES, SKILLS, free_port

ROOT = Path(__file__).resolve().parents[2]
REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (make redis, as root)")


def wait_for(check, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture()
def redis_url(tmp_path) -> Iterator[str]:
    """A throw-away redis-server on a free port: no persistence, killed at the end."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:

        def ping() -> bool:
            assert proc.poll() is None, "redis-server exited"
            try:
                return bool(redis.Redis.from_url(url).ping())
            except redis.ConnectionError:
                return False

        wait_for(ping, 120, "redis-server")  # hang guards, here and below: each wait ends on its condition
        yield url
    finally:
        stop_process(proc, timeout=60)


def test_redis_store_adds_up_claims_once_and_forgets_expired(redis_url):
    a, b = RedisStore(redis_url, "t"), RedisStore(redis_url, "t")  # two replicas' clients
    a.add({("coder", "code"): (1.0, 0.0), ("coder", "db"): (0.25, 0.75)})
    b.add({("coder", "code"): (0.5, 0.5)})
    assert a.load() == b.load() == {("coder", "code"): (1.5, 0.5), ("coder", "db"): (0.25, 0.75)}
    assert RedisStore(redis_url, "other").load() == {}  # namespaces are apart
    a.put_served([(Served("r1", "coder", {"code": 1.0}), "sess")], 60)
    got = b.claim(None, "sess")
    assert isinstance(got, Served) and got.request_id == "r1" and got.weights == {"code": 1.0}
    assert a.claim("r1", None) == ALREADY_RATED
    assert b.claim("r-unknown", None) is None
    a.put_served([(Served("short", "coder", {"code": 1.0}), None)], 1)
    time.sleep(2.1)
    assert b.claim("short", None) is None


class RouterProcess:
    """``python -m router serve`` in its own process, with a policy file."""

    def __init__(self, policy: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--policy", str(policy), "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"router exited: see {self.log.name}"
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

        wait_for(up, 600, f"router on {self.url}")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 60)
        self.log.close()


def chat_code(url: str) -> httpx.Response:
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "write a function"}]},
        headers={"x-cycleqd-skill-weights": "code=1"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp


def test_two_router_processes_share_feedback_through_redis(tmp_path, redis_url):
    ups = {eid: FakeUpstream(name=eid).start() for eid in ELITES}
    m = ServingManifest(run="fake", skills=SKILLS)  # no exemplars: the routers build no classifier
    for i, (eid, up) in enumerate(ups.items()):
        m.engines.append(EngineEntry(id=f"e{i}", url=up.url, device="cpu", mode="full", base_model="x",
                                     health=Health.READY))  # fmt: skip
        m.elites.append(EliteEntry(id=eid, engine_id=f"e{i}", served_model_name=eid, endpoint=f"{up.url}/v1",
                                   kind="full", scores=ELITES[eid]))  # fmt: skip
    save_manifest(tmp_path / "manifest.json", m)
    policy = tmp_path / "routing.yaml"
    policy.write_text(yaml.safe_dump({
        "manifest": str(tmp_path / "manifest.json"), "cache_dir": str(tmp_path / "cache"),
        "feedback": {"enabled": True, "store": "redis", "redis_url": redis_url, "prior_strength": 4, "sync_s": 0.2},
    }))  # fmt: skip
    one, two = RouterProcess(policy, tmp_path / "one.log"), RouterProcess(policy, tmp_path / "two.log")
    try:
        one.wait_ready()
        two.wait_ready()
        # requests answered by router one, rated on router two: the attribution travels through Redis
        for _ in range(2):
            resp = chat_code(one.url)
            assert resp.headers["x-cycleqd-elite"] == "coder"
            ok = httpx.post(f"{two.url}/v1/feedback", json={"request_id": resp.headers["x-request-id"], "score": 0})
            assert ok.status_code == 200, ok.text
            assert ok.json()["elite"] == "coder"
        # router one, which took no feedback itself, sees the posterior and routes code elsewhere
        wait_for(
            lambda: httpx.get(f"{one.url}/v1/feedback").json()["elites"]["coder"]["code"]["failures"] == 2.0,
            120, "router one to read the shared evidence",
        )  # fmt: skip
        s1, s2 = (httpx.get(f"{r.url}/v1/feedback").json()["elites"] for r in (one, two))
        assert s1 == s2 and s1["coder"]["code"]["mean"] == pytest.approx(3.8 / 6)
        assert chat_code(one.url).headers["x-cycleqd-elite"] == "querier"
        # a request is rated once across replicas
        rid = chat_code(two.url).headers["x-request-id"]
        assert httpx.post(f"{one.url}/v1/feedback", json={"request_id": rid, "score": 1}).status_code == 200
        again = httpx.post(f"{two.url}/v1/feedback", json={"request_id": rid, "score": 1})
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_rated"

        # a burst, each answer of one rated on two the moment it arrives (overtaking one's write): none is lost
        def answer_then_rate(_: int) -> httpx.Response:
            rid = chat_code(one.url).headers["x-request-id"]
            return httpx.post(f"{two.url}/v1/feedback", json={"request_id": rid, "score": 1}, timeout=30)

        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(answer_then_rate, range(24)))
        assert [r.status_code for r in burst] == [200] * 24, [r.text for r in burst if r.status_code != 200]
    finally:
        one.stop()
        two.stop()
        for u in ups.values():
            u.stop()


def test_when_redis_goes_away_routing_goes_on_and_feedback_answers_503(start_router, redis_url):
    import contextlib

    import redis

    r = start_router(feedback={"enabled": True, "store": "redis", "redis_url": redis_url, "sync_s": 0.2})
    rid = chat_code(r.url).headers["x-request-id"]
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis.from_url(redis_url).shutdown(nosave=True)
    assert chat_code(r.url).headers["x-cycleqd-elite"] == "coder"  # ranking never waits for the store
    resp = httpx.post(f"{r.url}/v1/feedback", json={"request_id": rid, "score": 1}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "feedback_store_unavailable"
    wait_for(lambda: httpx.get(f"{r.url}/v1/feedback").json()["sync_error"], 120, "the sync error to show")

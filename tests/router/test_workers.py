"""``cycleqd-router serve --workers N``: real worker processes on one port, as one router.

Each test starts the CLI as a user would (``python -m router serve --workers 2``) over the fake upstreams, sends
every request on a fresh connection (so the kernel hands them to either worker), and checks what must hold
across processes: the request counter sums over the workers, an episode stays on one elite, a reload reaches
every worker (also one started after it). Which worker served what is read from the per-process metric files
in a ``PROMETHEUS_MULTIPROC_DIR`` the test gives (the router does not tell clients its pids).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from router.decision import Router
from router.policy import RoutingPolicy
from router.policy_sync import WorkerSync
from tests.conftest import stop_process
from tests.router import conftest
from tests.router.conftest import ELITES, free_port

ADMIN = "adm-key"
#: Every elite equally good at everything: which one serves a session is the rendezvous hash's choice alone.
EQUAL = {eid: {"code": 0.9, "os": 0.9, "db": 0.9} for eid in ELITES}


def until(check, what: str, timeout: float = 120.0) -> None:
    """Poll ``check`` until it holds (the timeout only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def write_manifest(path: Path, upstreams: dict, scores: dict = ELITES) -> None:
    """The test manifest without the skill world's exemplars: no classifier to build (every request here names an
    alias or an elite), so workers start fast, and the world is not generated (15 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "world_exemplars", lambda: None)
        conftest.write_manifest(path, upstreams, scores=scores)


class WorkerServer:
    """``cycleqd-router serve --workers N`` in a subprocess, with its metric files where the test can read them."""

    def __init__(self, tmp_path: Path, upstreams: dict, workers: int = 2, scores: dict = ELITES, **policy: Any):
        manifest = tmp_path / "manifest.json"
        write_manifest(manifest, upstreams, scores=scores)
        self.policy_file = tmp_path / "policy.yaml"
        self.policy = {"manifest": str(manifest), "cache_dir": str(tmp_path / "cache"), **policy}
        self.write_policy()
        self.metrics_dir = tmp_path / "metrics"
        self.port, self.n = free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, CYCLEQD_ROUTER_ADMIN_KEY=ADMIN)
        if workers > 1:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--policy", str(self.policy_file), "--port", str(self.port),
             "--workers", str(workers)],
            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )  # fmt: skip

    def write_policy(self, **changes: Any) -> None:
        self.policy_file.write_text(yaml.safe_dump({**self.policy, **changes}))

    def __enter__(self) -> WorkerServer:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:  # not select(): the test process may hold fds above 1024
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(600)  # a hang guard: it returns once the line is there
        line = self.proc.stdout.readline() if ready else ""
        assert f"{self.url}/v1" in line and (self.n == 1 or f"{self.n} workers" in line), f"not announced: {line!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc, timeout=120)

    def workers(self) -> set[int]:
        """The worker processes' pids (uvicorn spawns them with multiprocessing)."""
        out = set()
        for p in psutil.Process(self.proc.pid).children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                    out.add(p.pid)
            except psutil.Error:  # exited meanwhile
                pass
        return out

    def served(self) -> dict[int, int]:
        """Proxied requests per worker pid, from each worker's own metric file."""
        from prometheus_client.multiprocess import MultiProcessCollector

        out: dict[int, int] = {}
        for f in self.metrics_dir.glob("counter_*.db"):
            pid = int(f.stem.split("_")[1])
            for metric in MultiProcessCollector._read_metrics([str(f)]).values():
                for s in metric.samples:
                    if s.name == "cycleqd_router_requests_total":
                        out[pid] = out.get(pid, 0) + int(s.value)
        return out


def post(url: str, model: str, messages: list | None = None, **headers: str) -> httpx.Response:
    """A request on a fresh connection: any worker may accept it."""
    body = {"model": model, "messages": messages or [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30, trust_env=False)


def many(url: str, n: int, model: str, **headers: str) -> list[httpx.Response]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: post(url, model, **headers), range(n)))


def test_two_workers_share_the_port_and_metrics_sum_over_both(tmp_path, upstreams):
    k = 60
    with WorkerServer(tmp_path, upstreams) as s:
        assert len(s.workers()) == 2
        assert all(r.status_code == 200 for r in many(s.url, k, "coder"))
        served = s.served()
        assert len([n for n in served.values() if n]) == 2, f"one worker served everything: {served}"
        assert set(served) <= s.workers()
        text = httpx.get(f"{s.url}/metrics", trust_env=False).text  # one scrape, whichever worker answers it
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('cycleqd_router_requests_total{route="/v1/chat/completions",status="200"}')
        )
        assert total == k, text
        assert sum(served.values()) == k


def test_an_episode_stays_on_one_elite_whichever_worker_serves_a_turn(tmp_path, upstreams):
    with WorkerServer(tmp_path, upstreams, scores=EQUAL, aliases={"work": {"code": 1.0}}) as s:
        chosen: dict[str, set[str]] = {}
        for episode in range(6):
            msgs: list[dict[str, Any]] = [
                {"role": "system", "content": "you are an agent"},
                {"role": "user", "content": f"task number {episode}"},
            ]
            for turn in range(8):  # each turn on a fresh connection, the chat growing as an agent's does
                r = post(s.url, "work", msgs)
                assert r.status_code == 200, r.text
                chosen.setdefault(f"chat-{episode}", set()).add(r.headers["x-cycleqd-elite"])
                msgs += [{"role": "assistant", "content": f"step {turn}"}, {"role": "user", "content": "go on"}]
                h = post(s.url, "work", **{"x-session-id": f"session-{episode}"})
                chosen.setdefault(f"header-{episode}", set()).add(h.headers["x-cycleqd-elite"])
        assert all(len(elites) == 1 for elites in chosen.values()), chosen
        assert len(set.union(*chosen.values())) > 1  # the hash, not one elite for everything
        assert len([n for n in s.served().values() if n]) == 2  # both workers served turns


def test_a_reload_on_one_worker_or_by_sighup_reaches_every_worker_and_replacements(tmp_path, upstreams):
    admin = {"authorization": f"Bearer {ADMIN}"}
    with WorkerServer(tmp_path, upstreams) as s:
        assert {r.status_code for r in many(s.url, 8, "python")} == {404}
        s.write_policy(aliases={"python": {"code": 1.0}})
        r = httpx.post(f"{s.url}/admin/reload", headers=admin, trust_env=False)  # one worker answers it
        assert r.status_code == 200 and r.json()["aliases"] == ["python"]
        until(  # the others apply it at their next poll (every second)
            lambda: all(
                r.status_code == 200 and r.headers["x-cycleqd-reason"] == "alias:python"
                for r in many(s.url, 24, "python")
            ),
            "every worker to apply the reload",
        )
        assert len([n for n in s.served().values() if n]) == 2

        s.write_policy(aliases={"python": {"code": 1.0}, "sql": {"nosuchskill": 1.0}})  # refused: the old one stays
        bad = httpx.post(f"{s.url}/admin/reload", headers=admin, trust_env=False)
        assert bad.status_code == 400 and "nosuchskill" in bad.text
        time.sleep(1.5)
        assert all(r.status_code == 200 for r in many(s.url, 16, "python"))

        s.write_policy(aliases={"rust": {"code": 1.0}})
        s.proc.send_signal(signal.SIGHUP)  # the parent reads the file and publishes it to the workers
        until(lambda: all(r.status_code == 200 for r in many(s.url, 24, "rust")), "every worker to apply SIGHUP")
        assert {r.status_code for r in many(s.url, 8, "python")} == {404}

        # a worker that dies is replaced; the replacement runs the policy the others run, not an unreloaded edit
        old = s.workers()
        os.kill(min(old), signal.SIGKILL)
        s.write_policy(aliases={"go": {"code": 1.0}})
        deadline = time.monotonic() + 300  # a hang guard: the loops end on their conditions
        while len(s.workers() - old) < 1 or len(s.workers()) < 2:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.2)
        new = (s.workers() - old).pop()
        while not s.served().get(new):  # until the replacement has served some of them
            assert time.monotonic() < deadline, f"the replacement served nothing: {s.served()}"
            rs = many(s.url, 8, "rust")
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        assert {r.status_code for r in many(s.url, 8, "go")} == {404}


def test_a_metrics_directory_with_files_in_it_is_refused(tmp_path, upstreams):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_1.db").write_bytes(b"")
    s = WorkerServer(tmp_path, upstreams)
    s.proc.communicate(timeout=300)
    assert s.proc.returncode == 2


def test_each_worker_takes_its_share_of_the_rate_limit(tmp_path):
    policy = RoutingPolicy(manifest=str(tmp_path / "none.json"), rate_limit_per_minute=60)
    alone, one_of_two = Router(policy), Router(policy, workers=WorkerSync(tmp_path, 2))
    assert alone.limiter.rate == 1.0 and one_of_two.limiter.rate == 0.5  # per second
    assert one_of_two.limiter.capacity == 30
    tiny = Router(policy.model_copy(update={"rate_limit_per_minute": 1}), workers=WorkerSync(tmp_path, 4))
    assert tiny.limiter.take("k") and not tiny.limiter.take("k")  # a share under one request still lets one through


def test_one_worker_is_the_single_process_path(tmp_path, upstreams):
    """``--workers 1`` (the default) runs no supervisor: the server is the CLI's own process."""
    with WorkerServer(tmp_path, upstreams, workers=1) as s:
        assert psutil.Process(s.proc.pid).children() == []
        assert post(s.url, "coder").status_code == 200


def test_one_socket_per_worker_on_one_port_and_a_port_in_use_is_refused():
    """Workers get a socket each (SO_REUSEPORT); a port someone listens on, even such a group, is refused, so that a
    second router started by mistake fails instead of silently taking a share of the first one's connections."""
    import socket

    from router.workers import listen_sockets

    group = listen_sockets("127.0.0.1", 0, 3, 128)
    try:
        assert len(group) == 3 and len({s.getsockname() for s in group}) == 1
        with pytest.raises(OSError):
            listen_sockets("127.0.0.1", group[0].getsockname()[1], 2, 128)
        with socket.socket() as plain:
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            with pytest.raises(OSError):
                listen_sockets("127.0.0.1", plain.getsockname()[1], 2, 128)
    finally:
        for s in group:
            s.close()


def rate(url: str, **body: Any) -> httpx.Response:
    """A feedback on a fresh connection: any worker may accept it."""
    return httpx.post(f"{url}/v1/feedback", json=body, timeout=30, trust_env=False)


def test_feedback_with_the_memory_store_is_never_lost_whichever_worker_takes_it(tmp_path, upstreams):
    """The issue's case: ``feedback: {enabled: true}`` (store memory, the default) and two workers. Every answer is
    rated on a fresh connection (so the other worker takes about half of them): all are found, each counts once
    whichever worker takes the second try, a session's latest request is found too, and every worker ends up with
    the evidence of all of them (the workers share one store, not one process's memory)."""
    code = {"x-cycleqd-skill-weights": "code=1"}
    with WorkerServer(tmp_path, upstreams, feedback={"enabled": True, "prior_strength": 4, "sync_s": 0.2}) as s:
        answers = many(s.url, 24, "auto", **code)
        assert all(r.status_code == 200 and r.headers["x-cycleqd-elite"] == "coder" for r in answers)
        assert len([n for n in s.served().values() if n]) == 2  # both workers answered some
        with ThreadPoolExecutor(8) as pool:
            rated = list(pool.map(lambda r: rate(s.url, request_id=r.headers["x-request-id"], score=0), answers))
        assert [r.status_code for r in rated] == [200] * len(answers), [r.text for r in rated if r.status_code != 200]
        assert {r.json()["elite"] for r in rated} == {"coder"}
        again = [rate(s.url, request_id=r.headers["x-request-id"], score=1) for r in answers[:8]]
        assert {r.status_code for r in again} == {409}, [r.text for r in again]
        for episode in range(6):
            last = post(s.url, "auto", **code, **{"x-session-id": f"ep-{episode}"})
            ok = rate(s.url, session_id=f"ep-{episode}", score=1)
            assert ok.status_code == 200, ok.text
            assert ok.json()["request_id"] == last.headers["x-request-id"]
        deadline = time.monotonic() + 120  # a hang guard
        while True:  # each look on a fresh connection: both workers must see all 24 + 6 outcomes
            looks = [httpx.get(f"{s.url}/v1/feedback", trust_env=False).json() for _ in range(8)]
            # (the failures moved code away from coder: the sessions' requests went to another elite)
            counts = {
                tuple(sum(e["code"][k] for e in x["elites"].values()) for k in ("failures", "successes")) for x in looks
            }
            if counts == {(24.0, 6.0)}:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.2)
        assert {x["store"] for x in looks} == {"memory"}

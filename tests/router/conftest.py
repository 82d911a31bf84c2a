"""Fixtures: fake upstreams, a manifest over them, and the router running on a real port (uvicorn in a thread)."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn

from router.app import Router, create_app
from router.policy import RoutingPolicy
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from testkit.router_fakes import FakeUpstream

SKILLS = ["code", "os", "db"]
#: Per-skill scores of three fake elites: each is best at one skill.
ELITES = {
    "coder": {"code": 0.95, "os": 0.6, "db": 0.7},
    "sheller": {"code": 0.6, "os": 0.97, "db": 0.7},
    "querier": {"code": 0.7, "os": 0.6, "db": 0.96},
}


#: The exemplar embeddings of the test classifier are kept between test sessions (they are deterministic).
CLASSIFIER_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests" / "router-classifier"


@pytest.fixture(scope="session")
def classifier():
    """The real MiniLM classifier, built once per session (its embeddings once per checkout)."""
    from router.classifier import MiniLM, build_classifier

    encoder = MiniLM()
    clf, report = build_classifier(encoder, world_exemplars(), exemplars_per_skill=60, cache_dir=CLASSIFIER_CACHE)
    return encoder, clf, report


@functools.cache
def world_exemplars() -> dict:
    """The skill world's prompts per split, as `cycleqd-serve` puts them in the manifest for a world run."""
    from evolve.run_config import EvolveConfig
    from serve.materialise import skill_exemplars

    return {s: e.model_dump() for s, e in skill_exemplars(EvolveConfig(skills=SKILLS)).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_manifest(path, upstreams: dict[str, FakeUpstream], scores=ELITES, health=Health.READY) -> None:
    m = ServingManifest(run="fake", skills=SKILLS, exemplars=world_exemplars())
    for i, (eid, up) in enumerate(upstreams.items()):
        m.engines.append(
            EngineEntry(id=f"engine-{i}", url=up.url, device="cpu", mode="full", base_model="x", health=health)
        )
        m.elites.append(
            EliteEntry(
                id=eid,
                engine_id=f"engine-{i}",
                served_model_name=f"served-{eid}",
                endpoint=f"{up.url}/v1",
                kind="full",
                scores=scores[eid],
                lineage={"generation": i},
            )
        )
    save_manifest(path, m)


class RunningRouter:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(router), host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningRouter:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture()
def upstreams() -> Iterator[dict[str, FakeUpstream]]:
    ups = {eid: FakeUpstream(name=eid).start() for eid in ELITES}
    yield ups
    for u in ups.values():
        u.stop()


@pytest.fixture()
def start_router(tmp_path, classifier, upstreams) -> Iterator[Callable[..., RunningRouter]]:
    """Start a router over the fake upstreams; keyword arguments become policy settings."""
    running: list[RunningRouter] = []

    def start(policy_file: bool = False, **settings) -> RunningRouter:
        manifest = tmp_path / "manifest.json"
        if not manifest.exists():
            write_manifest(manifest, upstreams)
        settings = {"manifest": str(manifest), "cache_dir": str(tmp_path / "cache"), **settings}
        policy = RoutingPolicy.model_validate(settings)
        path = None
        if policy_file:
            import yaml

            path = tmp_path / "policy.yaml"
            path.write_text(yaml.safe_dump(settings))
        r = RunningRouter(Router(policy, policy_path=path, classifier=classifier[:2]))
        running.append(r.__enter__())
        return r

    yield start
    for r in running:
        r.__exit__()

"""One router over several serving manifests: a file and a cycleqd-serve admin API URL, merged."""

from __future__ import annotations

import time

import httpx
import openai

from router.manifests import ManifestSet
from serve.admin import serve_admin
from serve.config import ServeConfig
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest
from serve.supervisor import Supervisor
from tests.router.conftest import ELITES, free_port, write_manifest


def _remote(upstreams) -> ServingManifest:
    m = ServingManifest(run="fake", skills=["code", "os", "db"])
    for i, eid in enumerate(("querier", "coder")):
        up = upstreams[eid]
        m.engines.append(
            EngineEntry(id=f"engine-{i}", url=up.url, device="cuda:0", mode="full", base_model="x", health=Health.READY)
        )
        m.elites.append(EliteEntry(id=eid, engine_id=f"engine-{i}", served_model_name=f"served-{eid}",
                                   endpoint=f"{up.url}/v1", kind="full", scores=ELITES[eid]))  # fmt: skip
    return m


def test_a_file_and_a_serve_admin_url_are_merged(tmp_path, upstreams, start_router):
    write_manifest(tmp_path / "local.json", {k: upstreams[k] for k in ("coder", "sheller")})
    cfg = ServeConfig(out=tmp_path / "remote", admin_port=free_port())
    sup = Supervisor(cfg, [], _remote(upstreams))  # a deployment on another machine, seen through its admin API
    admin = serve_admin(sup)
    url = f"http://127.0.0.1:{cfg.admin_port}/manifest"
    deadline = time.monotonic() + 20
    while not admin.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        sources = [str(tmp_path / "local.json"), url]
        ms = ManifestSet(sources)
        ms.refresh(urls=True)
        m = ms.merged
        assert [e.id for e in m.engines] == ["0:engine-0", "0:engine-1", "1:engine-0", "1:engine-1"]
        assert [(e.id, e.engine_id) for e in m.elites if e.id == "coder"] == [
            ("coder", "0:engine-0"),
            ("coder", "1:engine-1"),
        ]

        r = start_router(manifest=sources)
        r.router.refresh_manifest(force=True)
        c = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
        ids = [m.id for m in c.models.list().data if m.model_extra["cycleqd"]["kind"] == "elite"]
        assert sorted(ids) == ["coder", "querier", "sheller"]
        raw = c.chat.completions.with_raw_response.create(model="sql", messages=[{"role": "user", "content": "q"}])
        assert (raw.headers["x-cycleqd-elite"], raw.headers["x-cycleqd-engine"]) == ("querier", "1:engine-0")
        # the same elite on two machines: a pinned request goes to the less loaded one
        r.router.inflight["0:engine-0"] += 5
        raw = c.chat.completions.with_raw_response.create(model="coder", messages=[{"role": "user", "content": "q"}])
        assert raw.headers["x-cycleqd-engine"] == "1:engine-1"
        # the remote deployment marks its engine unhealthy: the router follows the URL within seconds
        with sup.lock:
            sup.manifest.engines[1].health = Health.UNHEALTHY
        r.router.inflight["0:engine-0"] -= 5
        r.router.refresh_manifest(force=True)
        raw = c.chat.completions.with_raw_response.create(model="coder", messages=[{"role": "user", "content": "q"}])
        assert raw.headers["x-cycleqd-engine"] == "0:engine-0"
        assert httpx.get(f"{r.url}/health").json() == {"status": "ok"}  # public: no paths or URLs
    finally:
        admin.should_exit = True


def test_an_unreadable_source_keeps_its_last_good_version(tmp_path, upstreams):
    write_manifest(tmp_path / "m.json", upstreams)
    ms = ManifestSet([str(tmp_path / "m.json"), "http://127.0.0.1:9/manifest"])
    ms.refresh(urls=True)
    assert len(ms.merged.elites) == 3
    (tmp_path / "m.json").write_text("{broken")
    ms.refresh(urls=True)
    assert len(ms.merged.elites) == 3  # the last good file version stays

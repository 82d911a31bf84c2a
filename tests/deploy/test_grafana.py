"""The Grafana dashboard queries only metrics that exist: the router's, from its own /metrics after real routed
requests, and vLLM's, as the installed vllm package's source defines them."""

from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path

import httpx
import pytest

from router.app import Router
from router.policy import RoutingPolicy
from testkit.router_fakes import FakeUpstream
from tests.router.conftest import RunningRouter, write_manifest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cycleqd-serve.json"
METRIC = re.compile(r"\b(cycleqd_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
PROM_LABELS = {"le", "instance", "job"}  # added by histograms and by Prometheus' scrape


def queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    return exprs


def known(name: str, names: set[str]) -> bool:
    return name in names or any(name.endswith(s) and name.removesuffix(s) in names for s in SUFFIXES)


def vllm_metric_names() -> set[str]:
    spec = find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    source = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    names = set(re.findall(r'name=\s*"(vllm:[a-z0-9_:]+)"', source.read_text()))
    assert "vllm:num_requests_running" in names, f"no metric definitions found in {source}"
    return names


@pytest.fixture()
def router_exposition(tmp_path) -> str:
    """/metrics of a router (in-process, real port) after pinned, alias and failing requests to fake upstreams."""
    ups = {"coder": FakeUpstream(name="coder").start(), "sheller": FakeUpstream(name="sheller", mode="error").start()}
    ups["querier"] = FakeUpstream(name="querier").start()
    write_manifest(tmp_path / "manifest.json", ups)
    policy = RoutingPolicy.model_validate({"manifest": str(tmp_path / "manifest.json"), "cache_dir": str(tmp_path)})
    # pinned and alias requests never ask the classifier, so none is built (a placeholder pair skips it)
    with RunningRouter(Router(policy, classifier=(None, None))) as r:
        for model, status in (("coder", 200), ("sql", 200), ("sheller", 502)):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(f"{r.url}/v1/chat/completions", json=body).status_code == status
        text = httpx.get(f"{r.url}/metrics").text
    for u in ups.values():
        u.stop()
    return text


def test_every_queried_metric_exists(router_exposition):
    exposed = {line.split("{")[0].split(" ")[0] for line in router_exposition.splitlines() if line[:1] not in "#"}
    vllm = vllm_metric_names()
    missing = []
    for expr in queries():
        found = METRIC.findall(expr)
        assert found, f"query without a cycleqd_ or vllm: metric (unchecked): {expr}"
        for name in found:
            ok = name in exposed if name.startswith("cycleqd_") else known(name, vllm)
            if not ok:
                missing.append(name)
    assert not missing, f"{DASHBOARD.name} queries metrics nobody exposes: {sorted(set(missing))}"


def test_router_panels_group_by_labels_the_metrics_have(router_exposition):
    labels: dict[str, set[str]] = {}
    for line in router_exposition.splitlines():
        if line.startswith("cycleqd_") and "{" in line:
            name, rest = line.split("{", 1)
            labels.setdefault(name, set()).update(re.findall(r'(\w+)="', rest.split("}")[0]))
    for expr in queries():
        names = [n for n in METRIC.findall(expr) if n.startswith("cycleqd_")]
        grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")} - PROM_LABELS
        for n in names:
            assert grouped <= labels[n], f"{expr}: {n} has labels {sorted(labels[n])}, not {sorted(grouped)}"

"""The deployment files agree with the code: every command line they run exists with those options, every
config they embed validates, the routers point at the serve pods' admin ports, the image copies what exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from evolve.run import EvolveConfig
from router.policy import RoutingPolicy
from serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [d for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
MODULES = {"cycleqd-evolve": "evolve", "cycleqd-serve": "serve", "cycleqd-router": "router"}


def _by_kind(kind: str) -> list[dict]:
    return [d for d in DOCS if d["kind"] == kind]


def _config(name: str, key: str) -> dict:
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == name]
    return yaml.safe_load(cm["data"][key])


def _commands() -> list[list[str]]:
    out = []
    for d in DOCS:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out += [c["command"] for c in d["spec"]["template"]["spec"]["containers"]]
            for c in d["spec"]["template"]["spec"]["containers"]:
                probe = c.get("readinessProbe", {}).get("exec")
                if probe:
                    out.append(probe["command"])
        if d["kind"] == "RayJob":
            for part in re.findall(r"(cycleqd-\w+ [^;]+)", d["spec"]["entrypoint"]):
                out.append(shlex.split(part.replace("fi'", "")))
    return out


def test_every_document_is_a_named_kubernetes_object():
    assert {d["kind"] for d in DOCS} >= {"ConfigMap", "Service", "StatefulSet", "Deployment", "RayJob"}
    for d in DOCS:
        assert d["apiVersion"] and d["metadata"]["name"]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c[:2]))
def test_commands_exist_with_their_options(command):
    script, sub, *args = command
    assert script in MODULES, script
    help_text = subprocess.run(
        [sys.executable, "-m", MODULES[script], sub, "--help"], capture_output=True, text=True, timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip
    assert "Usage" in help_text, (script, sub)
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, f"{script} {sub} has no {flag}"


def test_embedded_configs_validate():
    ServeConfig.model_validate(_config("cycleqd-serve-config", "serve.yaml"))
    RoutingPolicy.model_validate(_config("cycleqd-router-config", "routing.yaml"))
    EvolveConfig.model_validate(_config("cycleqd-evolve-config", "evolve.yaml"))


def test_routers_read_every_serve_pod_on_its_admin_port():
    serve = ServeConfig.model_validate(_config("cycleqd-serve-config", "serve.yaml"))
    (sts,) = _by_kind("StatefulSet")
    pods = {f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(sts["spec"]["replicas"])}
    urls = RoutingPolicy.model_validate(_config("cycleqd-router-config", "routing.yaml")).manifests
    assert {urlparse(u).hostname for u in urls} == pods
    assert {urlparse(u).port for u in urls} == {serve.admin_port} and all(u.endswith("/manifest") for u in urls)
    (svc,) = [d for d in _by_kind("Service") if d["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert {p["port"] for p in svc["spec"]["ports"]} == {serve.port, serve.admin_port}


def test_the_image_copies_what_exists():
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src

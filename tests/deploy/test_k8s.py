"""The deployment files agree with the code and with Kubernetes: every object validates against the Kubernetes
schemas (offline, ``kubernetes-validate``), every command line they run exists with those options, every config
they embed validates, every path a container reads is mounted and was written by the stage before, only the
routers reach the engines, the routers point at the serve pods' admin ports, the image copies what exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from evolve.run_config import EvolveConfig
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
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
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
    assert {d["kind"] for d in DOCS} >= {
        "ConfigMap", "Service", "StatefulSet", "Deployment", "RayJob", "Job", "PersistentVolumeClaim", "NetworkPolicy"
    }  # fmt: skip
    for d in DOCS:
        assert d["apiVersion"] and d["metadata"]["name"]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c[:2]))
def test_commands_exist_with_their_options(command):
    script, sub, *args = command
    assert script in MODULES, script
    help_text = subprocess.run(
        [sys.executable, "-m", MODULES[script], sub, "--help"], capture_output=True, text=True, timeout=600,
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


K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are written for


def _pod_templates(d: dict) -> list[dict]:
    if d["kind"] == "RayJob":
        ray = d["spec"]["rayClusterSpec"]
        return [ray["headGroupSpec"]["template"], *(g["template"] for g in ray["workerGroupSpecs"])]
    if d["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [d["spec"]["template"]]
    return []


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_object_validates_against_the_kubernetes_schemas(doc):
    """Strict: an unknown or misplaced field fails too. KubeRay's RayJob has no schema offline, so its pod
    templates are validated as Kubernetes PodTemplates (they are plain pod specs)."""
    if doc["kind"] == "RayJob":
        assert doc["apiVersion"] == "ray.io/v1" and doc["spec"]["entrypoint"]
        for i, template in enumerate(_pod_templates(doc)):
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_validation_catches_a_misplaced_field():
    (sts,) = _by_kind("StatefulSet")
    broken = yaml.safe_load(yaml.safe_dump(sts))
    broken["spec"]["template"]["spec"]["containers"][0]["mountPath"] = "/data"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _doc(kind: str, name: str) -> dict:
    (d,) = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return d


# The order in which the stages run: each reads only what a stage before it wrote.
STAGES = [("Job", "cycleqd-models"), ("RayJob", "cycleqd-evolve"), ("StatefulSet", "cycleqd-serve"),
          ("Deployment", "cycleqd-router")]  # fmt: skip


def _stage_commands(d: dict) -> list[list[str]]:
    if d["kind"] == "RayJob":
        return [shlex.split(p.replace("fi'", "")) for p in re.findall(r"(cycleqd-\w+ [^;]+)", d["spec"]["entrypoint"])]
    return [c["command"] for c in d["spec"]["template"]["spec"]["containers"]]


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _reads_and_writes(d: dict) -> tuple[set[str], set[str]]:
    """The paths a stage's program reads and writes, from its command lines and the configs they name."""
    evolve = EvolveConfig.model_validate(_config("cycleqd-evolve-config", "evolve.yaml"))
    reads, writes = set(), set()
    for cmd in _stage_commands(d):
        reads |= {p for p in (_option(cmd, "--config"), _option(cmd, "--policy")) if p}
        if out := _option(cmd, "--out"):
            writes.add(out)
        if cmd[:2] == ["cycleqd-evolve", "run"]:
            reads.add(str(evolve.models))  # (--resume reads what this same stage wrote before it was retried)
        if cmd[:2] == ["cycleqd-serve", "run"]:
            serve = ServeConfig.model_validate(_config("cycleqd-serve-config", "serve.yaml"))
            reads |= {str(serve.run), str(evolve.models)}  # the run directory records the models it evolved
            writes.add(str(serve.out))
        if cmd[:2] == ["cycleqd-router", "serve"]:
            writes.add(str(RoutingPolicy.model_validate(_config("cycleqd-router-config", "routing.yaml")).cache_dir))
    return reads, writes


def _where(template: dict, path: str, *, container: int = 0) -> tuple[tuple[str, str], str, bool] | None:
    """(volume, path inside the volume, read-only) of ``path`` in a pod's container; None when not mounted."""
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    best = None
    for m in spec["containers"][container].get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]["mountPath"].rstrip("/")):
                best = (m, mp)
    if best is None:
        return None
    m, mp = best
    v = volumes[m["name"]]
    if "persistentVolumeClaim" in v:
        key = ("pvc", v["persistentVolumeClaim"]["claimName"])
    elif "configMap" in v:
        key = ("configmap", v["configMap"]["name"])
    else:
        key = ("pod-local", id(template))  # emptyDir: nothing another stage wrote
    inner = "/".join(p for p in (m.get("subPath", ""), path[len(mp) :].strip("/")) if p)
    return key, inner, bool(m.get("readOnly") or v.get("persistentVolumeClaim", {}).get("readOnly"))


def test_every_path_a_container_reads_is_mounted_and_written_by_the_stage_before():
    written: list[tuple[tuple[str, str], str]] = []
    for kind, name in STAGES:
        d = _doc(kind, name)
        template = _pod_templates(d)[0]  # the container that runs the stage's program (the Ray head)
        reads, writes = _reads_and_writes(d)
        assert writes or kind == "StatefulSet", f"{name} writes nothing?"
        for path in sorted(reads):
            where = _where(template, path)
            assert where is not None, f"{kind}/{name} reads {path}, which is not mounted"
            key, inner, _ = where
            if key[0] == "configmap":
                assert inner in _doc("ConfigMap", key[1])["data"], f"{name}: ConfigMap {key[1]} has no {inner}"
                continue
            assert any(k == key and (inner == w or inner.startswith(w + "/")) for k, w in written), (
                f"{kind}/{name} reads {path} ({key[1]}:/{inner}), which no stage before it writes; written so far: "
                f"{[f'{k[1]}:/{w}' for k, w in written]}"
            )
        for path in sorted(writes):
            where = _where(template, path)
            assert where is not None, f"{kind}/{name} writes {path}, which is not mounted"
            key, inner, read_only = where
            assert not read_only, f"{kind}/{name} writes {path} on a read-only mount"
            written.append((key, inner))


def test_the_shared_volume_means_the_same_paths_in_every_pod():
    """The run directory records absolute paths (its models): every pod mounts the volume's root at one place."""
    claims = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    mounts = set()
    for d in DOCS:
        for t in _pod_templates(d):
            volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
            for c in t["spec"]["containers"]:
                for m in c.get("volumeMounts", []):
                    claim = volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
                    if claim:
                        assert claim in claims, f"{d['metadata']['name']} mounts an undeclared claim {claim}"
                        mounts.add((claim, m["mountPath"], m.get("subPath", "")))
    assert mounts == {("cycleqd-run", "/data", "")}


def test_only_the_routers_reach_the_serve_pods():
    serve = ServeConfig.model_validate(_config("cycleqd-serve-config", "serve.yaml"))
    sts = _doc("StatefulSet", "cycleqd-serve")
    router = _doc("Deployment", "cycleqd-router")
    serve_labels = sts["spec"]["template"]["metadata"]["labels"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]
    policies = [
        p for p in _by_kind("NetworkPolicy") if p["spec"]["podSelector"]["matchLabels"].items() <= serve_labels.items()
    ]
    assert policies, "no NetworkPolicy selects the serve pods: anyone in the cluster reaches the engines"
    allowed_ports = set()
    for p in policies:
        assert "Ingress" in p["spec"]["policyTypes"]
        for rule in p["spec"].get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` admits every pod"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"only router pods may be admitted, not {peer}"
                assert peer["podSelector"]["matchLabels"].items() <= router_labels.items()
            allowed_ports |= {port["port"] for port in rule.get("ports", [])}
    assert allowed_ports == {serve.port, serve.admin_port}


def test_engines_and_routers_share_the_engine_key_from_a_secret():
    def key_ref(d: dict) -> dict:
        (c,) = d["spec"]["template"]["spec"]["containers"]
        (env,) = [e for e in c["env"] if e["name"] == "CYCLEQD_ENGINE_KEY"]
        assert "value" not in env, "a key in clear in a manifest"
        return env["valueFrom"]["secretKeyRef"]

    assert key_ref(_doc("StatefulSet", "cycleqd-serve")) == key_ref(_doc("Deployment", "cycleqd-router"))

"""Children scored by a pool of worker processes or by Ray actors give exactly the archive of the local executor."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from evolve.run import Evolution
from evolve.rundir import RunError, archive_ids, genomes_equal
from tests.evolve.minis import mini_evolve_config


def _run(path, models, **kw):
    ev = Evolution(path, mini_evolve_config(models, generations=3, **kw))
    ev.run()
    return ev.state


@pytest.fixture(scope="module")
def local_state(mini_models, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("local") / "run", mini_models)


def test_pool_workers_give_the_local_archive(tmp_path, mini_models, local_state):
    pooled = _run(tmp_path / "run", mini_models, executor="pool", workers=2)
    assert archive_ids(pooled) == archive_ids(local_state)
    assert genomes_equal(pooled, local_state) and pooled.elites == local_state.elites


@pytest.mark.slow
def test_ray_actors_give_the_local_archive(tmp_path, mini_models, local_state):
    pytest.importorskip("ray", reason="part of the dev extra")
    on_ray = _run(tmp_path / "run", mini_models, executor="ray", workers=2)
    assert archive_ids(on_ray) == archive_ids(local_state)
    assert genomes_equal(on_ray, local_state) and on_ray.elites == local_state.elites


def test_a_run_resumes_under_another_executor_but_not_another_config(tmp_path, mini_models):
    ev = Evolution(tmp_path / "run", mini_evolve_config(mini_models, generations=1))
    ev.run()
    resumed = Evolution(tmp_path / "run", mini_evolve_config(mini_models, generations=1, executor="pool"), resume=True)
    assert resumed.state.generation == 1
    with pytest.raises(RunError, match="differs"):
        Evolution(tmp_path / "run", mini_evolve_config(mini_models, generations=1, seed=5), resume=True)


def test_the_vllm_engine_cannot_be_farmed_out(mini_models):
    with pytest.raises(ValueError, match="executor: local"):
        mini_evolve_config(mini_models, engine="vllm", executor="pool")


@pytest.mark.slow
def test_ray_executor_joins_an_existing_cluster(tmp_path, mini_models, local_state):
    """The cluster path as a user runs it: a Ray head started with `ray start`, then `cycleqd-evolve run` with
    ``executor: ray`` and ``ray_address`` in its own process; the archive equals the local run's."""
    import shutil
    import subprocess
    import tempfile

    import yaml

    from evolve.rundir import RunState

    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, RAY_TMPDIR=short, RAY_AUTH_MODE="disabled")  # a throw-away local cluster
    port = "6391"
    started = subprocess.run(
        [ray_bin, "start", "--head", "--num-cpus", "2", "--port", port, "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", short],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        cfg = mini_evolve_config(mini_models, generations=3, executor="ray", workers=2, ray_address=f"127.0.0.1:{port}")
        (tmp_path / "evolve.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        out = subprocess.run(
            [sys.executable, "-m", "evolve", "run", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "evolve.yaml")],
            capture_output=True, text=True, env=env, timeout=1200,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        on_cluster = RunState.load(tmp_path / "run" / "state.safetensors")
        assert archive_ids(on_cluster) == archive_ids(local_state) and genomes_equal(on_cluster, local_state)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(short, ignore_errors=True)


PLACEMENT_SCRIPT = """
import json, sys
from pathlib import Path
from evolve.executors import RayExecutor, WorkerSpec
spec = WorkerSpec(base_model=Path("unused"), dtype="bfloat16", device="cuda", svd_dir=Path("unused"),
                  skills=("code", "os"), validation_items=1, seed=0, threads=1)
ex = RayExecutor(spec, 2, sys.argv[1])
print(json.dumps(ex.placements()))
ex.close()
"""


@pytest.mark.slow
def test_with_device_cuda_each_ray_actor_holds_its_own_gpu(tmp_path):
    """Placement on a local cluster with two logical GPUs (``ray start --num-gpus 2``): each actor asks Ray for one
    GPU, gets a different one, and sees only it (CUDA_VISIBLE_DEVICES), so its engine's ``cuda`` is that GPU. The
    engines themselves need a real GPU (built on the first genome), which this machine lacks."""
    pytest.importorskip("ray", reason="part of the dev extra")
    import json
    import shutil
    import subprocess
    import tempfile

    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=short, RAY_AUTH_MODE="disabled")
    port = "6393"
    started = subprocess.run(
        [ray_bin, "start", "--head", "--num-cpus", "2", "--num-gpus", "2", "--port", port, "--include-dashboard",
         "false", "--disable-usage-stats", "--temp-dir", short],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        out = subprocess.run(
            [sys.executable, "-c", PLACEMENT_SCRIPT, f"127.0.0.1:{port}"],
            capture_output=True, text=True, env=env, timeout=1200,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        placements = json.loads(out.stdout.strip().splitlines()[-1])
        gpus = [p["ray_gpu_ids"] for p in placements]
        assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1]
        assert [p["cuda_visible"] for p in placements] == [g[0] for g in gpus]
        assert all(p["device"] == "cuda:0" for p in placements)  # the one GPU each actor sees
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(short, ignore_errors=True)

"""Where children are scored: in this process, in a pool of worker processes, or on Ray actors.

Every executor answers ``score_many(genomes) -> [scores]`` in the order given. A generation makes all its
children before any is scored and inserts them in order afterwards, so scoring them concurrently changes nothing
in the result: a run gives the same archive with any executor and any number of workers (tested). Each worker
holds its own engine (the ``transformers`` engine, ``worker_threads`` torch threads) built from the run's base
model and SVD bases; on a GPU cluster that is one worker per GPU, as in the paper's setup. This is
generation-synchronous, not the paper's steady-state asynchronous loop, because the run must stay deterministic.

- ``local`` (default): the run's own engine, one child after another;
- ``pool``: ``workers`` processes on this machine (``concurrent.futures``, spawned);
- ``ray``: ``workers`` Ray actors, on a local Ray instance or the cluster at ``ray_address``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import torch

from evolve.evaluators import build_evaluators, score_skills


class Executor(Protocol):
    def score_many(self, genomes: Sequence[torch.Tensor]) -> list[dict[str, float]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its engine and score like the run does."""

    base_model: Path
    dtype: str
    device: str  # cpu, cuda or auto: with cuda, each worker holds one GPU
    svd_dir: Path
    skills: dict[str, Any]  # name -> spec (pydantic models pickle, so they reach pool and Ray workers)
    validation_items: int
    seed: int
    threads: int


class LocalExecutor:
    def __init__(self, score: Callable[[torch.Tensor], dict[str, float]]) -> None:
        self._score = score

    def score_many(self, genomes: Sequence[torch.Tensor]) -> list[dict[str, float]]:
        return [self._score(g) for g in genomes]

    def close(self) -> None:
        pass


class Worker:
    """One engine scoring genomes on the validation split (used by both the pool and Ray).

    The engine is built on the first genome, not in the constructor, so where a worker was placed (its GPU) can
    be asked before anything heavy is loaded.
    """

    def __init__(self, spec: WorkerSpec, slot: int = 0) -> None:
        torch.set_num_threads(spec.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.spec = spec
        self.device = worker_device(spec.device, slot)
        self.engine: Any = None

    def placement(self) -> dict[str, Any]:
        """The device this worker computes on and, on Ray, the GPU ids Ray gave it."""
        gpus: list[Any] = []
        try:
            import ray

            if ray.is_initialized():
                gpus = [str(g) for g in ray.get_gpu_ids()]
        except ImportError:
            pass
        return {"device": self.device, "ray_gpu_ids": gpus, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _build(self) -> None:
        from evolve.engines.hf import TransformersEngine
        from evolve.rundir import load_bases

        spec = self.spec
        self.engine = TransformersEngine.from_pretrained(spec.base_model, dtype=spec.dtype, device=self.device)
        self.bases = load_bases(spec.svd_dir).to(self.engine.device)
        self.tasks = build_evaluators(spec.skills)

    def score(self, genome: torch.Tensor) -> dict[str, float]:
        if self.engine is None:
            self._build()
        self.engine.load_genome(self.bases, genome)
        n, seed = self.spec.validation_items, self.spec.seed
        return score_skills(self.engine, self.tasks, "validation", n, seed=seed)


def worker_device(device: str, slot: int) -> str:
    """``cuda`` becomes the slot's own GPU: on Ray, the one GPU Ray made visible to the actor (``cuda:0``); in a
    pool, GPU ``slot mod count``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return device
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        try:
            import ray

            if ray.is_initialized() and ray.get_gpu_ids():
                return "cuda:0"
        except ImportError:
            pass
    count = torch.cuda.device_count()
    return f"cuda:{slot % count}" if count else "cuda"


_worker: Worker | None = None


def _init_worker(spec: WorkerSpec, counter: Any) -> None:
    global _worker
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    _worker = Worker(spec, slot)


def _score_in_worker(genome: torch.Tensor) -> dict[str, float]:
    assert _worker is not None, "pool worker not initialised"
    return _worker.score(genome)


class PoolExecutor:
    def __init__(self, spec: WorkerSpec, workers: int) -> None:
        ctx = get_context("spawn")
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(spec, ctx.Value("i", 0))
        )

    def score_many(self, genomes: Sequence[torch.Tensor]) -> list[dict[str, float]]:
        return list(self.pool.map(_score_in_worker, [g.contiguous() for g in genomes]))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("executor: ray needs Ray: pip install 'cycleqd-serve[ray]'") from exc
        self.ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=max(workers * spec.threads, 1), **kwargs)
        # One GPU per actor with device: cuda; Ray places them and sets each one's CUDA_VISIBLE_DEVICES.
        actor = ray.remote(num_cpus=spec.threads, num_gpus=1 if spec.device == "cuda" else 0)(Worker)
        self.actors = [actor.remote(spec, i) for i in range(workers)]

    def placements(self) -> list[dict[str, Any]]:
        return list(self.ray.get([a.placement.remote() for a in self.actors]))

    def score_many(self, genomes: Sequence[torch.Tensor]) -> list[dict[str, float]]:
        refs = [self.actors[i % len(self.actors)].score.remote(g) for i, g in enumerate(genomes)]
        return list(self.ray.get(refs))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._owns:
            self.ray.shutdown()


def make_executor(
    kind: str,
    spec: WorkerSpec,
    *,
    workers: int,
    local: Callable[[torch.Tensor], dict[str, float]],
    ray_address: str | None,
) -> Executor:
    if kind == "local" or workers < 1:
        return LocalExecutor(local)
    if kind == "pool":
        return PoolExecutor(spec, workers)
    if kind == "ray":
        return RayExecutor(spec, workers, ray_address)
    raise ValueError(f"unknown executor {kind!r}; choose local, pool or ray")

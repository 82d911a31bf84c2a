"""``cycleqd-evolve run``: CycleQD over genomes, in a run directory (its files: :mod:`evolve.rundir`; its settings:
:mod:`evolve.run_config`).

Generation t takes skill t mod K as quality (``cycle: false`` fixes one skill), draws parents from that
archive, crosses and mutates their genomes, scores each child on every skill's validation split and offers it
to every archive. All children of a generation are made before any is scored, so the order of evaluation
cannot change the result, and a run resumed after a kill continues exactly where the last saved generation
ended.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evolve.archive import SkillArchive, default_ranges
from evolve.engines.hf import TransformersEngine
from evolve.evaluators import build_evaluators, score_skills
from evolve.executors import Executor, LocalExecutor, WorkerSpec, make_executor
from evolve.genome import Bases, svd_tensors
from evolve.models.hf import check_population, load_hf, resolve_device
from evolve.operators import crossover, mutate, sample_parents
from evolve.run_config import EvolveConfig
from evolve.rundir import (
    STATE_FILE,
    SVD_DIR,
    RunState,
    aggregate_genome,
    best_mean_elite,
    check_run_dir,
    load_bases,
    save_bases,
    write_run_file,
)


def embedding_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameter names of the input embedding and the output head, found through the model's own accessors (so
    no architecture's naming is assumed). A tied head shares the embedding's tensor and is listed once."""
    wanted = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return {name for name, p in model.named_parameters() if any(p is w for w in wanted)}


class ExpertWeights(Mapping[str, dict[str, torch.Tensor]]):
    """Each expert's weights, loaded when asked for and not kept: SVD needs one expert at a time, so a run over
    a large model holds the base and one expert in memory, not all of them."""

    def __init__(self, dirs: Mapping[str, Path], skills: Sequence[str], *, names: list[str], device: torch.device):
        self.dirs, self.skills, self.names, self.device = dirs, list(skills), names, device

    def __getitem__(self, skill: str) -> dict[str, torch.Tensor]:
        model, _ = load_hf(self.dirs[skill], dtype="float32", device=self.device)
        params = dict(model.named_parameters())
        return {k: params[k].detach() for k in self.names}

    def __iter__(self) -> Iterator[str]:
        return iter(self.skills)

    def __len__(self) -> int:
        return len(self.skills)


class Evolution:
    """One run directory: set-up, generations, saving. Keyword-only, one engine, in-process evaluation."""

    def __init__(self, run_dir: Path, config: EvolveConfig, *, resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.config = config
        self.skills = build_evaluators(config.skills)
        check_run_dir(self.dir, config, resume=resume)
        self.population = config.resolved_population()
        # Headers only: a mismatched expert, a missing shard or a pickle checkpoint is refused in seconds.
        check_population(self.population.base, self.population.experts)
        self.device = resolve_device(config.device)
        base_model, self.tokenizer = load_hf(self.population.base, dtype=config.dtype, device=self.device)
        self.base_weights = {k: v.detach().float().clone() for k, v in base_model.named_parameters()}
        self.embedding_names = embedding_parameter_names(base_model)
        if config.engine == "vllm":
            from evolve.engines.vllm_engine import VLLMEngine

            del base_model
            self.engine: TransformersEngine | VLLMEngine = VLLMEngine(
                self.population.base, seed=config.seed, dtype=config.dtype
            )
        else:
            self.engine = TransformersEngine(base_model, self.tokenizer)
        #: Seconds spent per phase (sampling, crossover, mutation, materialisation, evaluation, saving).
        self.timings: defaultdict[str, float] = defaultdict(float)
        self._executor: Executor | None = None
        if resume and (self.dir / STATE_FILE).exists():
            self.bases = load_bases(self.dir / SVD_DIR).to(self.device)
            self.state = RunState.load(self.dir / STATE_FILE)
        else:
            self._start()

    # -- set-up ----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        write_run_file(self.dir, cfg)
        base = self.base_weights
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        svd = svd_tensors(shapes, embeddings=cfg.svd_embeddings(), embedding_names=self.embedding_names)
        experts = ExpertWeights(self.population.experts, cfg.skills, names=list(base), device=self.device)
        self.bases = Bases.compute(base, experts, rank_cap=cfg.rank_cap(), svd=svd)
        save_bases(self.dir / SVD_DIR, self.bases)
        st = RunState()
        st.torch_gen.manual_seed(cfg.seed)
        st.np_rng = np.random.default_rng(cfg.seed)
        scores = {}
        for q, s in enumerate(cfg.skills):
            eid = f"expert:{s}"
            st.genomes[eid] = self.bases.layout.expert(q)
            scores[eid] = self.score(st.genomes[eid])
            st.elites[eid] = {"validation": scores[eid], "lineage": {"generation": -1, "expert": s}}
        expert_scores = {s: scores[f"expert:{s}"] for s in cfg.skills}
        for s in cfg.skills:
            measures = [m for m in cfg.skills if m != s]
            ranges = [cfg.ranges[m] for m in measures] if cfg.ranges else default_ranges(expert_scores, measures)
            st.archives[s] = SkillArchive(quality=s, measures=measures, ranges=ranges, bins=cfg.bins)
            ids = list(scores)
            st.archives[s].add(ids, [scores[i] for i in ids])
        st.record_history(-1, {eid: [] for eid in scores})
        self.state = st
        st.save(self.dir / STATE_FILE)

    # -- the cycle -------------------------------------------------------------------------------------------
    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - t0

    def score(self, genome: torch.Tensor, split: str = "validation") -> dict[str, float]:
        with self._timed("materialisation"):
            self.engine.load_genome(self.bases, genome)
        cfg = self.config
        n = {"validation": cfg.validation_items, "calibration": cfg.calibration_items}.get(split, cfg.test_items)
        with self._timed("evaluation"):
            return score_skills(self.engine, self.skills, split, n, seed=self.config.seed)  # type: ignore[arg-type]

    def quality_skill(self, generation: int) -> str:
        cfg = self.config
        if not cfg.cycle:
            return cfg.fixed_quality or cfg.skill_names[0]
        return cfg.skill_names[generation % len(cfg.skills)]

    def step(self) -> dict[str, Any]:
        """Run one generation and save; returns a summary for progress display."""
        cfg, st = self.config, self.state
        t = st.generation
        q = self.quality_skill(t)
        q_index = cfg.skill_names.index(q)
        children = []
        for c in range(cfg.children_per_generation):
            with self._timed("sampling"):
                p1, p2 = sample_parents(st.archives[q].elites(), cfg.sampling, st.np_rng)
            with self._timed("crossover"):
                genome, weights = crossover([st.genomes[p1.id], st.genomes[p2.id]], cfg.crossover, st.torch_gen)
            with self._timed("mutation"):
                genome = mutate(genome, self.bases.layout, q_index, cfg.mutation, st.torch_gen)
            lineage = {
                "generation": t,
                "quality": q,
                "parents": [p1.id, p2.id],
                "crossover_weights": weights,
                "mutation": cfg.mutation.kind,
            }
            children.append((f"g{t:05d}c{c:02d}", genome, lineage))
        executor = self.executor()
        if isinstance(executor, LocalExecutor):
            results = executor.score_many([g for _, g, _ in children])
        else:
            with self._timed("evaluation"):  # materialisation happens inside the workers
                results = executor.score_many([g for _, g, _ in children])
        scored = [(cid, genome, lineage, sc) for (cid, genome, lineage), sc in zip(children, results, strict=True)]
        added: dict[str, list[str]] = {}
        for cid, genome, lineage, scores in scored:
            entered = [s for s, a in st.archives.items() if a.add([cid], [scores])[0]]
            if entered:
                added[cid] = lineage["parents"]
                st.genomes[cid] = genome
                st.elites[cid] = {"validation": scores, "lineage": lineage}
        live = {e.id for a in st.archives.values() for e in a.elites()}
        for eid in list(st.genomes):
            if eid not in live and not eid.startswith("expert:"):
                del st.genomes[eid]
                del st.elites[eid]
        st.record_history(t, added)
        st.generation = t + 1
        with self._timed("saving"):
            st.save(self.dir / STATE_FILE)
        return {"generation": t, "quality": q, "added": len(added)}

    def executor(self) -> Executor:
        if self._executor is None:
            cfg = self.config
            spec = WorkerSpec(
                base_model=self.population.base,
                dtype=cfg.dtype,
                device=cfg.device,
                svd_dir=self.dir / SVD_DIR,
                skills=dict(cfg.skills),
                validation_items=cfg.validation_items,
                seed=cfg.seed,
                threads=cfg.worker_threads,
            )
            self._executor = make_executor(
                cfg.executor, spec, workers=cfg.workers, local=self.score, ray_address=cfg.ray_address
            )
        return self._executor

    def close(self) -> None:
        """Stop the workers (a later step starts them again)."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def run(self, on_generation: Callable[[dict[str, Any]], None] | None = None) -> None:
        try:
            while self.state.generation < self.config.generations:
                summary = self.step()
                if on_generation:
                    on_generation(summary)
        finally:
            self.close()

    # -- final models ----------------------------------------------------------------------------------------
    def best_mean_elite(self) -> str:
        return best_mean_elite(self.state)

    def aggregate_genome(self) -> tuple[torch.Tensor, dict[str, float]]:
        return aggregate_genome(self.state)

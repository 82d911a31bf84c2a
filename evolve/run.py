"""``cycleqd-evolve run``: CycleQD over genomes, writing the run directory (contract #1, see ARCHITECTURE.md).

Run directory (``format_version`` 1)::

    run.json             the config of the run and the format version; written once, checked on resume
    svd/                 the experts' SVD bases (safetensors + manifest.json), see evolve.genome
    state.safetensors    every kept genome as a tensor, keyed by elite id; its metadata "state" is JSON:
                         generation, archives (cells, qualities, scores), elites (validation and, after
                         ``report``, test scores; lineage: parents, crossover weights, mutation, generation),
                         the RNG states, and "history" (one record per generation: each archive's
                         [elites, coverage, QD score, best] after it, and the parents of every child that
                         entered an archive, so lineage survives replaced elites; added later, so a state
                         without it still loads, with an empty history); replaced atomically (write new, then
                         rename) every generation

Generation t takes skill t mod K as quality (``cycle: false`` fixes one skill), draws parents from that
archive, crosses and mutates their genomes, scores each child on every skill's validation split and offers it
to every archive. All children of a generation are made before any is scored, so the order of evaluation
cannot change the result, and a run resumed after a kill continues exactly where the last saved generation
ended.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cycleqd.atomic import atomic_file, read_versioned_json, write_json_atomic
from cycleqd.errors import UserError
from evolve.archive import SkillArchive, default_ranges
from evolve.engines.hf import TransformersEngine
from evolve.evaluators import SKILL_NAMES, build_evaluators, score_skills
from evolve.evaluators.specs import SkillSpec, WorldSpec, normalise_skills
from evolve.executors import Executor, LocalExecutor, WorkerSpec, make_executor
from evolve.genome import Bases, svd_tensors
from evolve.merge import get_method
from evolve.models.hf import Device, DType, check_population, load_hf, resolve_device
from evolve.operators import CrossoverConfig, MutationConfig, SamplingConfig, crossover, mutate, sample_parents

FORMAT_VERSION = 1
RUN_FILE = "run.json"
STATE_FILE = "state.safetensors"


class RunError(UserError, RuntimeError):
    """A run directory that cannot be used; it is never overwritten. The message names the file and field."""


class PopulationConfig(BaseModel):
    """A base model and one expert per skill: any Hugging Face causal LM directories (see evolve.models.hf)."""

    model_config = ConfigDict(extra="forbid")

    base: Path
    experts: dict[str, Path] = Field(min_length=2, description="skill -> the expert fine-tuned for it")
    multitask: Path | None = Field(None, description="optional multi-task fine-tune, reported beside CycleQD")


class GenomeConfig(BaseModel):
    """Which tensors get SVD bases (see evolve.genome.svd_tensors) and how large the bases may grow."""

    model_config = ConfigDict(extra="forbid")

    embeddings: bool | None = Field(
        None,
        description="also decompose the token embedding (and an untied head); default: on for the embedded "
        "bootstrap population, whose experts differ mostly there, off for other populations",
    )
    rank_cap: int | Literal["auto"] | None = Field(
        "auto",
        description="per-expert rank per matrix; auto: the factors of all experts about one model's size "
        "(full rank for the embedded bootstrap population, whose bases are a few MB); null: full rank",
    )

    @field_validator("rank_cap")
    @classmethod
    def _positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("rank_cap must be at least 1, 'auto' or null")
        return v


class EvolveConfig(BaseModel):
    """Settings of one CycleQD run; defaults follow the official code unless the docs say why not."""

    model_config = ConfigDict(extra="forbid")

    models: Path = Field(Path(".cache/demo/models"), description="bootstrap output: base/ and experts/<skill>/")
    population: PopulationConfig | None = Field(
        None, description="base and experts as any HF directories; default: the bootstrap output under `models`"
    )
    dtype: DType = Field("float32", description="the engine's weights: float32, bfloat16, float16 or auto")
    device: Device = Field("cpu", description="cpu, cuda or auto; with cuda each pool/Ray worker holds one GPU")
    genome: GenomeConfig = Field(default_factory=GenomeConfig)
    skills: dict[str, SkillSpec] = Field(
        default_factory=lambda: {s: WorldSpec() for s in SKILL_NAMES},
        min_length=2,
        description="skill name -> spec (evolve/evaluators/registry.py); a list of names means world skills",
    )
    seed: int = 0
    generations: int = Field(45, ge=0)
    children_per_generation: int = Field(4, ge=1)
    validation_items: int = Field(80, ge=1)
    test_items: int = Field(200, ge=1)
    calibration_items: int = Field(80, ge=1, description="items per skill of the calibration split (serving)")
    bins: int = Field(15, ge=1)
    ranges: dict[str, tuple[float, float]] | None = Field(
        None, description="fixed score range per skill; default: 85% of the weakest to 115% of the strongest expert"
    )
    cycle: bool = Field(True, description="False: the quality skill stays fixed_quality (ablation)")
    fixed_quality: str | None = None
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="vllm: one in-process vLLM engine, weights updated in place per child"
    )
    executor: Literal["local", "pool", "ray"] = Field(
        "local", description="where children are scored: this process, a pool of processes, or Ray actors"
    )
    workers: int = Field(2, ge=1, description="worker processes or actors for executor pool / ray")
    worker_threads: int = Field(1, ge=1, description="torch threads per worker")
    ray_address: str | None = Field(None, description="a Ray cluster to join (executor: ray); default: start one")
    crossover: CrossoverConfig = Field(default_factory=CrossoverConfig)
    mutation: MutationConfig = Field(default_factory=MutationConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    _skills = field_validator("skills", mode="before")(normalise_skills)

    @property
    def skill_names(self) -> list[str]:
        return list(self.skills)

    @model_validator(mode="after")
    def _check(self) -> EvolveConfig:
        for name, spec in self.skills.items():
            if isinstance(spec, WorldSpec) and (spec.skill or name) not in SKILL_NAMES:
                raise ValueError(f"skills.{name}: no world skill {spec.skill or name!r}: they are {SKILL_NAMES}")
        if self.engine == "vllm" and self.executor != "local":
            raise ValueError("engine vllm runs in this process; use executor: local with it")
        if self.fixed_quality is not None and self.fixed_quality not in self.skills:
            raise ValueError(f"fixed_quality {self.fixed_quality!r} is not one of skills {self.skills}")
        if self.population is not None and set(self.population.experts) != set(self.skills):
            missing = sorted(set(self.skills) - set(self.population.experts))
            extra = sorted(set(self.population.experts) - set(self.skills))
            what = f"has no expert for skill {missing[0]!r}" if missing else f"has an expert for {extra[0]!r}"
            raise ValueError(f"population.experts {what}, but skills are {self.skills}: one expert per skill")
        return self

    # -- what the defaults resolve to ----------------------------------------------------------------------------
    def resolved_population(self) -> PopulationConfig:
        if self.population is not None:
            return self.population
        return PopulationConfig(
            base=self.models / "base",
            experts={s: self.models / "experts" / s for s in self.skills},
            multitask=self.models / "multitask",
        )

    def svd_embeddings(self) -> bool:
        return self.population is None if self.genome.embeddings is None else self.genome.embeddings

    def rank_cap(self) -> int | Literal["auto"] | None:
        if self.genome.rank_cap == "auto" and self.population is None:
            return None
        return self.genome.rank_cap


#: Settings that decide where work runs, not what it computes: a run may resume with other values.
EXECUTION_FIELDS = {"executor", "workers", "worker_threads", "ray_address"}


def same_run(a: EvolveConfig, b: EvolveConfig) -> bool:
    return a.model_dump(exclude=EXECUTION_FIELDS) == b.model_dump(exclude=EXECUTION_FIELDS)


class RunState:
    """Everything that changes during a run; (de)serialised as one safetensors file."""

    def __init__(self) -> None:
        self.generation = 0
        self.genomes: dict[str, torch.Tensor] = {}
        self.elites: dict[str, dict[str, Any]] = {}  # id -> {"validation": {...}, "test": {...}, "lineage": {...}}
        self.archives: dict[str, SkillArchive] = {}
        #: per generation: {"generation", "archives": {skill: [elites, coverage, qd_score, best]}, "entered"}
        self.history: list[dict[str, Any]] = []
        self.torch_gen = torch.Generator()
        self.np_rng = np.random.default_rng()

    def save(self, path: Path) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "generation": self.generation,
            "elites": self.elites,
            "archives": {k: a.to_dict() for k, a in self.archives.items()},
            "np_rng": self.np_rng.bit_generator.state,
            "history": self.history,
        }
        tensors = {f"genome/{k}": v.contiguous() for k, v in self.genomes.items()}
        tensors["rng/torch"] = self.torch_gen.get_state()
        try:
            with atomic_file(path) as tmp:
                save_file(tensors, str(tmp), metadata={"state": json.dumps(meta, default=_json_default)})
        except (OSError, SafetensorError) as exc:  # a full disk, a read-only or vanished directory
            raise RunError(
                f"{path}: cannot save generation {self.generation} ({_io_reason(exc)}); the state saved before it is "
                f"unchanged. Free space or make {path.parent} writable, then continue with --resume"
            ) from exc

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
            raise RunError(f"{path}: corrupt or not a CycleQD state file ({exc}); the run cannot resume") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise RunError(
                f"{path}: field 'format_version' is {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        st = cls()
        st.generation = meta["generation"]
        st.elites = meta["elites"]
        st.archives = {k: SkillArchive.from_dict(a) for k, a in meta["archives"].items()}
        st.genomes = {k.removeprefix("genome/"): v for k, v in tensors.items() if k.startswith("genome/")}
        st.torch_gen.set_state(tensors["rng/torch"])
        st.np_rng.bit_generator.state = meta["np_rng"]
        st.history = meta.get("history", [])
        return st

    def record_history(self, generation: int, entered: dict[str, list[str]]) -> None:
        """Append the archives' standard curves (pyribs' coverage, QD score, best) after ``generation``."""
        stats = {s: a.stats for s, a in self.archives.items()}
        self.history.append({
            "generation": generation,
            "archives": {s: [st.num_elites, st.coverage, st.qd_score, st.best] for s, st in stats.items()},
            "entered": entered,
        })  # fmt: skip


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


def _io_reason(exc: Exception) -> str:
    """The operating system's words for a failed write (safetensors wraps them in a Rust debug string)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    found = re.search(r"os error (\d+)", str(exc))
    return os.strerror(int(found.group(1))) if found else str(exc)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


class Evolution:
    """One run directory: set-up, generations, saving. Keyword-only, one engine, in-process evaluation."""

    def __init__(self, run_dir: Path, config: EvolveConfig, *, resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.config = config
        self.skills = build_evaluators(config.skills)
        run_file = self.dir / RUN_FILE
        if resume:
            if not run_file.is_file():
                raise RunError(f"{run_file}: missing; there is no run to resume in {self.dir}")
            # Compared as validated configs, so a run from an older release (without a newly added, defaulted
            # setting) still resumes.
            if not same_run(EvolveConfig.model_validate(_read_run_file(run_file)), config):
                raise RunError(f"{run_file}: the saved config differs from the one given; resume without --config")
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise RunError(f"{self.dir}: not empty; pass --resume to continue the run there, or choose another --out")
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
            self.bases = Bases.load(self.dir / "svd").to(self.device)
            self.state = RunState.load(self.dir / STATE_FILE)
        else:
            self._start()

    # -- set-up ----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.dir / RUN_FILE, {"format_version": FORMAT_VERSION, "config": json.loads(cfg.model_dump_json())}
        )
        base = self.base_weights
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        svd = svd_tensors(shapes, embeddings=cfg.svd_embeddings(), embedding_names=self.embedding_names)
        experts = ExpertWeights(self.population.experts, cfg.skills, names=list(base), device=self.device)
        self.bases = Bases.compute(base, experts, rank_cap=cfg.rank_cap(), svd=svd)
        self.bases.save(self.dir / "svd")
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
                svd_dir=self.dir / "svd",
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


def aggregate_genome(state: RunState) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's final model: each archive's best elite, merged with softmax(best quality) weights."""
    best = {s: a.stats.best_id for s, a in state.archives.items()}
    q = torch.tensor([state.archives[s].stats.best for s in best])
    w = torch.softmax(q, dim=0).tolist()
    genome = get_method("task_arithmetic").merge_genomes([state.genomes[best[s]] for s in best], weights=w)
    return genome, {best[s]: wi for wi, s in zip(w, best, strict=True)}


def best_mean_elite(state: RunState) -> str:
    """The elite with the highest mean validation score (ties: the smaller id)."""
    return max(sorted(state.elites), key=lambda e: mean_score(state.elites[e]["validation"]))


def load_run(run_dir: Path) -> tuple[EvolveConfig, RunState, Bases]:
    """Read a run directory without building an engine (for serving and inspection)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise RunError(f"{state_file}: missing; the run in {run_dir} has not saved a generation yet")
    return config, RunState.load(state_file), Bases.load(run_dir / "svd")


def mean_score(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def _read_run_file(path: Path) -> dict[str, Any]:
    return read_versioned_json(path, FORMAT_VERSION, RunError, "not a usable CycleQD run directory")["config"]


def load_run_config(run_dir: Path) -> EvolveConfig:
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise RunError(f"{run_file}: missing; {run_dir} is not a CycleQD run directory")
    return EvolveConfig.model_validate(_read_run_file(run_file))


def archive_ids(state: RunState) -> dict[str, list[tuple[tuple[int, ...], str, float]]]:
    """A comparable summary of the archives (cell, elite id, quality), for determinism checks."""
    return {s: [(e.cell, e.id, e.quality) for e in a.elites()] for s, a in state.archives.items()}


def genomes_equal(a: RunState, b: RunState, ids: Sequence[str] | None = None) -> bool:
    keys = ids if ids is not None else sorted(set(a.genomes) | set(b.genomes))
    return all(k in a.genomes and k in b.genomes and torch.equal(a.genomes[k], b.genomes[k]) for k in keys)

"""The settings of one CycleQD run: the population (base and experts), the genome's bases, the skills, and the
loop's own settings. ``run.json`` in the run directory holds them (see :mod:`evolve.rundir`); a run resumes only
with the same settings, except those that decide where work runs (:data:`EXECUTION_FIELDS`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evolve.evaluators import SKILL_NAMES
from evolve.evaluators.specs import SkillSpec, WorldSpec, normalise_skills
from evolve.models.hf import Device, DType
from evolve.operators import CrossoverConfig, MutationConfig, SamplingConfig


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
        description="skill name -> spec (evolve/evaluators/specs.py); a list of names means world skills",
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

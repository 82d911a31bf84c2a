"""Configuration files: YAML validated by pydantic, with errors that name the file and the field."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cycleqd.configfile import ConfigError, load_yaml_model
from evolve.evaluators import SKILL_NAMES, get_skill
from evolve.models.modeling import ArchSpec

__all__ = ["BootstrapConfig", "ConfigError", "PhaseConfig", "load_yaml_model"]


class PhaseConfig(BaseModel):
    """One training phase of the bootstrap."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=0)
    lr: float = Field(gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=4096)
    levels: list[int] = Field(min_length=1, description="difficulty levels of the training items")


class BootstrapConfig(BaseModel):
    """Everything ``cycleqd-evolve bootstrap`` needs; the defaults are the embedded demo (about 5 CPU minutes).

    The multi-task baseline gets the experts' total compute: ``len(skills) * expert.steps`` steps at the
    experts' learning rate and batch size, on every level of every skill.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    skills: list[str] = Field(default_factory=lambda: list(SKILL_NAMES), min_length=2)
    vocab_size: int = Field(1024, ge=300, le=65536)
    arch: ArchSpec = Field(default_factory=ArchSpec)
    train_items_per_skill: int = Field(4000, ge=10)
    base: PhaseConfig = Field(default_factory=lambda: PhaseConfig(steps=300, lr=3e-3, levels=[1, 2, 3]))
    expert: PhaseConfig = Field(default_factory=lambda: PhaseConfig(steps=400, lr=1e-3, levels=[1, 2, 3]))
    replay: float = Field(0.2, ge=0, lt=1, description="share of an expert's batches drawn from the other skills")
    test_items: int = Field(200, ge=1, description="test items per skill for the accuracy matrix")

    @field_validator("skills")
    @classmethod
    def _known_skills(cls, skills: list[str]) -> list[str]:
        for s in skills:
            get_skill(s)  # raises UnknownSkillError naming the built-in skills
        if len(set(skills)) != len(skills):
            raise ValueError("skills must not repeat")
        return skills

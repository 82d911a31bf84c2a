"""Skills as evaluators: one interface (``base``; multi-turn skills in ``episodes``), a registry of kinds
(``registry``: world, jsonl, lm_eval, plugins and ``cycleqd.skills`` entry points), and the embedded skill world
(``world``), whose three skills mirror the paper's coding, OS and database tasks."""

from __future__ import annotations

from collections.abc import Mapping

from cycleqd.errors import UserError
from evolve.evaluators.base import (
    SPLITS,
    Evaluator,
    EvaluatorError,
    Generator,
    Item,
    SkillTask,
    Split,
    TaskResult,
    format_prompt,
)
from evolve.evaluators.episodes import EpisodeTask, Message, Policy, Transcript

__all__ = [
    "SKILL_NAMES",
    "SPLITS",
    "EpisodeTask",
    "Evaluator",
    "EvaluatorError",
    "Item",
    "Message",
    "Policy",
    "SkillTask",
    "Split",
    "TaskResult",
    "Transcript",
    "UnknownSkillError",
    "build_evaluators",
    "format_prompt",
    "get_skill",
    "score_skills",
]

#: Skill names in their canonical order (the cycle order of CycleQD and the column order of every table).
SKILL_NAMES: tuple[str, ...] = ("code", "os", "db")


class UnknownSkillError(UserError, ValueError):
    """Raised for a skill name that is not built in."""


def get_skill(name: str) -> SkillTask:
    """A fresh task object for ``name``; the error lists the skills that exist."""
    if name == "code":
        from evolve.evaluators.world.code import CodeTask

        return CodeTask()
    if name == "os":
        from evolve.evaluators.world.shell import ShellTask

        return ShellTask()
    if name == "db":
        from evolve.evaluators.world.db import DbTask

        return DbTask()
    raise UnknownSkillError(f"unknown skill {name!r}: the built-in skills are {', '.join(SKILL_NAMES)}")


def build_evaluators(skills: Mapping[str, object]) -> dict[str, Evaluator]:
    """The evaluators of a run's ``skills`` (name -> spec, see ``registry``), in order."""
    from evolve.evaluators.registry import build_all

    return build_all(skills)  # type: ignore[arg-type]


def score_skills(
    engine: Generator, tasks: Mapping[str, Evaluator], split: Split, limit: int, *, seed: int
) -> dict[str, float]:
    """Quality per skill of whatever the engine holds, on ``limit`` items of ``split`` drawn with ``seed`` (the
    same items for every model scored with the same arguments, so scores compare)."""
    return {name: task.evaluate(engine, split, limit, seed=seed).quality for name, task in tasks.items()}

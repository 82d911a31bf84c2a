"""Which evaluator a skill's config builds: the factory over the spec models of ``specs.py`` (world, jsonl,
lm_eval, the benchmark kinds, plugins and ``cycleqd.skills`` entry points). Implementations are imported lazily,
so a run that uses only world skills never imports lm-eval or the OS sandbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from evolve.evaluators.base import Evaluator, EvaluatorError
from evolve.evaluators.specs import (
    AgentBenchDbSpec,
    AgentBenchOsSpec,
    EntryPointSpec,
    HumanEvalSpec,
    JsonlSpec,
    LmEvalSpec,
    PluginSpec,
    WorldSpec,
    _load_entry_point,
    import_object,
)


def _instantiate(factory: Any, options: Mapping[str, Any], name: str, field: str) -> Evaluator:
    try:
        ev = factory(**options)
    except Exception as exc:
        raise EvaluatorError(f"{field}: {factory!r}({', '.join(options)}) failed: {type(exc).__name__}: {exc}") from exc
    if not (callable(getattr(ev, "evaluate", None)) and callable(getattr(ev, "exemplars", None))):
        raise EvaluatorError(
            f"{field}: {factory!r} made a {type(ev).__name__}, not an evaluator (it needs evaluate and exemplars; "
            "subclass evolve.evaluators.base.Evaluator)"
        )
    if not getattr(ev, "name", None):
        ev.name = name
    return ev


def build(name: str, spec: BaseModel) -> Evaluator:
    """The evaluator of one configured skill. Errors name the config field (``skills.<name>.<field>``)."""
    field = f"skills.{name}"
    if isinstance(spec, WorldSpec):
        from evolve.evaluators import UnknownSkillError, get_skill

        try:
            task = get_skill(spec.skill or name)
            task.chat = spec.chat
            return task
        except UnknownSkillError as exc:
            raise EvaluatorError(f"{field}: {exc} (or give a kind: jsonl, lm_eval, plugin)") from exc
    if isinstance(spec, JsonlSpec):
        from evolve.evaluators.jsonl import JsonlEvaluator

        return JsonlEvaluator(name, spec)
    if isinstance(spec, LmEvalSpec):
        from evolve.evaluators.lm_eval import LmEvalEvaluator

        return LmEvalEvaluator(name, spec)
    if isinstance(spec, HumanEvalSpec):
        from evolve.evaluators.humaneval import HumanEvalTask

        return HumanEvalTask(name, spec)
    if isinstance(spec, AgentBenchDbSpec):
        from evolve.evaluators.agentbench_db import AgentBenchDbTask

        return AgentBenchDbTask(name, spec)
    if isinstance(spec, AgentBenchOsSpec):
        from evolve.evaluators.agentbench_os import AgentBenchOsTask

        return AgentBenchOsTask(name, spec)
    if isinstance(spec, PluginSpec):
        if ":" in spec.name:
            factory = import_object(spec.name, f"{field}.name")
        else:
            factory = _load_entry_point(spec.name, f"{field}.name")
        return _instantiate(factory, spec.options, name, f"{field}.name")
    if isinstance(spec, EntryPointSpec):
        factory = _load_entry_point(spec.kind, f"{field}.kind")
        return _instantiate(factory, spec.model_extra or {}, name, f"{field}.kind")
    raise EvaluatorError(f"{field}: not a skill spec ({type(spec).__name__})")


def build_all(skills: Mapping[str, BaseModel]) -> dict[str, Evaluator]:
    """Every configured skill's evaluator, in the configured order."""
    return {name: build(name, spec) for name, spec in skills.items()}

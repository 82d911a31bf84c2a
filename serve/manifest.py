"""The serving manifest (contract #2, see ARCHITECTURE.md): which endpoint serves which elite.

``cycleqd-serve`` writes it (atomically, every time an engine or an elite comes or goes, or an engine's health
changes); ``cycleqd-router`` reads it and nothing else. It lives next to its writer; the router imports it
and nothing else of serve/ or evolve/, so this module needs only pydantic and the standard library.

``manifest.json`` (``format_version`` 1)::

    {
      "format_version": 1,
      "run": "<run directory>",  "skills": ["code", "os", "db"],  "updated_at": <unix seconds>,
      "engines": [{"id": "engine-0", "url": "http://127.0.0.1:8100", "device": "cpu", "mode": "lora",
                   "pid": 1234, "health": "ready", "restarts": 0, "log": "<file>", "base_model": "<dir>"}],
      "elites":  [{"id": "g00003c00", "engine_id": "engine-0", "served_model_name": "g00003c00",
                   "endpoint": "http://127.0.0.1:8100/v1", "kind": "lora", "lora_rank": 96,
                   "scores": {"code": 0.89, ...},          # validation scores from the archive
                   "served_scores": {"code": 0.88, ...},   # the served weights' validation scores (LoRA truncation)
                   "calibration_scores": {"code": 0.84, ...},  # the served weights on the calibration split
                   "test_scores": {...} | null, "lineage": {...}, "selected_by": ["best:code"],
                   "health": "ready"}],
      "exemplars": {"code": {"train": ["<prompt>", ...], "validation": [...], "test": [...]}, ...} | null
    }

``exemplars`` are each skill's prompts as the run's evaluators give them: the router's classifier learns its
skills from them (train: centroids; validation: temperature and out-of-domain threshold; test: its reported
accuracy), so a router serving a population of any skills classifies into them without importing ``evolve``.
``calibration_scores`` come from a split that selection never saw, so unlike the archive's validation scores
they are not inflated by the winner's curse; they are what the router weighs when present.

An elite's health is its engine's (copied into each elite entry at every write, for readers' convenience).
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cycleqd.atomic import write_text_atomic
from cycleqd.errors import UserError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


class ManifestError(UserError, RuntimeError):
    """A manifest that cannot be used; the message names the file and the field."""


class Health(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    FAILED = "failed"  # gave up after too many restarts
    STOPPED = "stopped"


class EngineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    url: str = Field(description="server root, e.g. http://127.0.0.1:8100 (the OpenAI API is under /v1)")
    device: str
    mode: Literal["lora", "full"]
    base_model: str
    pid: int | None = None
    health: Health = Health.STARTING
    restarts: int = 0
    log: str | None = None


class EliteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    engine_id: str
    served_model_name: str
    endpoint: str = Field(description="OpenAI base URL, e.g. http://127.0.0.1:8100/v1")
    kind: Literal["lora", "full"]
    lora_rank: int | None = None
    scores: dict[str, float] = Field(description="validation score per skill, from the archive")
    served_scores: dict[str, float] | None = Field(
        None, description="validation scores of the weights actually served (a LoRA adapter loses some)"
    )
    calibration_scores: dict[str, float] | None = Field(
        None, description="the served weights' calibration scores: selection never saw them (no winner's curse)"
    )
    test_scores: dict[str, float] | None = None
    lineage: dict[str, Any] = Field(default_factory=dict)
    selected_by: list[str] = Field(default_factory=list)
    health: Health = Field(Health.STARTING, description="its engine's health, copied at every write")

    def routing_scores(self) -> dict[str, float]:
        """What the router should weigh: the served weights' calibration scores (unbiased by selection) when
        measured, else their validation scores, else the archive's."""
        return self.calibration_scores or self.served_scores or self.scores


class SkillExemplars(BaseModel):
    """One skill's prompts per split, for the router's classifier."""

    model_config = ConfigDict(extra="forbid")

    train: list[str] = Field(default_factory=list)
    validation: list[str] = Field(default_factory=list)
    test: list[str] = Field(default_factory=list)


class ServingManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    run: str
    skills: list[str]
    updated_at: float = Field(default_factory=time.time)
    engines: list[EngineEntry] = Field(default_factory=list)
    elites: list[EliteEntry] = Field(default_factory=list)
    exemplars: dict[str, SkillExemplars] | None = Field(
        None, description="each skill's prompts per split, from the run's evaluators (the router's classifier)"
    )

    def engine(self, engine_id: str) -> EngineEntry:
        for e in self.engines:
            if e.id == engine_id:
                return e
        raise KeyError(engine_id)

    def health_of(self, elite: EliteEntry) -> Health:
        try:
            return self.engine(elite.engine_id).health
        except KeyError:
            return Health.STOPPED


def save_manifest(path: Path, manifest: ServingManifest) -> None:
    """Write new, then rename: a reader never sees half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.updated_at = time.time()
    write_text_atomic(path, manifest.model_dump_json(indent=2))


def load_manifest(path: Path) -> ServingManifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no serving manifest there; start `cycleqd-serve run` or pass the right path")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: corrupt, not valid JSON ({exc}); not a CycleQD serving manifest") from exc
    found = raw.get("format_version") if isinstance(raw, dict) else None
    if found != FORMAT_VERSION:
        raise ManifestError(f"{path}: field 'format_version' is {found!r}, expected {FORMAT_VERSION}")
    try:
        return ServingManifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ManifestError(f"{path}: field '{field}': {err['msg']}") from exc

"""The routing policy: one YAML file, validated by pydantic, reloadable at run time (admin endpoint or SIGHUP).

A reload swaps the whole policy object at once; requests already in flight keep the one they started with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ClassifierPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["centroid", "knn"] = "centroid"
    k: int = Field(10, ge=1, description="neighbours for method: knn")
    exemplars_per_skill: int = Field(150, ge=5, description="training prompts embedded per skill")


class Breaker(BaseModel):
    model_config = ConfigDict(extra="forbid")

    failures: int = Field(3, ge=1, description="consecutive failures that open an endpoint's circuit")
    reset_s: float = Field(10.0, gt=0, description="how long it stays open before one trial request")


class Timeouts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connect_s: float = Field(3.0, gt=0)
    first_byte_s: float = Field(120.0, gt=0, description="until the upstream's response headers")
    idle_s: float = Field(60.0, gt=0, description="longest gap between two chunks of a response")


class FeedbackPolicy(BaseModel):
    """Outcome feedback (``POST /v1/feedback``): a per-elite, per-skill Beta posterior of success whose prior is the
    elite's calibration score worth ``prior_strength`` observations; see docs/feedback.md."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="accept feedback and rank by the posterior mean instead of the score")
    store: Literal["memory", "sqlite", "redis"] = Field(
        "memory", description="memory (one process), sqlite (survives restarts; one machine), redis (replicas)"
    )
    path: Path | None = Field(None, description="the SQLite file (store: sqlite)")
    redis_url: str | None = Field(None, description="redis://host:6379/0 (store: redis)")
    namespace: str = Field(
        "default", min_length=1, description="evidence is kept per namespace: give a new population its own"
    )
    prior_strength: float = Field(20.0, gt=0, description="how many outcomes the calibration score is worth")
    explore: Literal["none", "thompson"] = Field(
        "none", description="thompson: order the elites within the margin by a draw from their posteriors"
    )
    seed: int | None = Field(None, description="seed of the Thompson draws (tests, simulations)")
    attribution_ttl_s: float = Field(
        3600.0, gt=0, description="how long a request can still be rated (a shared store keeps rate x TTL of them)"
    )
    max_attributions: int = Field(
        100_000,
        ge=1,
        description="answered requests remembered (memory store), or queued for a shared store that is down",
    )
    sync_s: float = Field(1.0, gt=0, description="how often the evidence is re-read from a shared store")

    @model_validator(mode="after")
    def _store_settings(self) -> FeedbackPolicy:
        if self.store == "sqlite" and self.path is None:
            raise ValueError("store 'sqlite' needs 'path' (the SQLite file, e.g. .cache/router/feedback.sqlite)")
        if self.store == "redis" and not self.redis_url:
            raise ValueError("store 'redis' needs 'redis_url' (e.g. redis://127.0.0.1:6379/0)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url {self.redis_url!r} must start with redis://, rediss:// or unix://")
        return self


class RoutingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: str | list[str] = Field(
        ".cache/demo/serve/manifest.json",
        description="serving manifest(s): file paths or URLs of cycleqd-serve admin APIs (http://host:8099/manifest)",
    )
    aliases: dict[str, dict[str, float] | Literal["auto"]] = Field(
        default_factory=lambda: {"auto": "auto", "coder": {"code": 1.0}, "shell": {"os": 1.0}, "sql": {"db": 1.0}},
        description="model name -> skill weights, or 'auto' (header, else classifier)",
    )
    weights_header: str = Field("x-cycleqd-skill-weights", description='e.g. "code=0.7,db=0.3"')
    session_header: str = Field("x-session-id", description="keeps a multi-turn episode on one elite")
    margin: float = Field(
        0.005,
        ge=0,
        description="elites within this of the best weighted score count as equal (load or the session chooses among "
        "them, and the response says x-cycleqd-tie); keep it below the score differences that matter and above the "
        "calibration scores' resolution (1 / calibration items)",
    )
    max_attempts: int = Field(3, ge=1, description="endpoints tried per request (only before the first byte)")
    classifier: ClassifierPolicy = Field(default_factory=ClassifierPolicy)
    fallback: str = Field(
        "best_mean",
        description="where a request far from every skill goes (classifier out of domain): best_mean (the elite "
        "with the best mean score) or an elite id",
    )
    breaker: Breaker = Field(default_factory=Breaker)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    rate_limit_per_minute: int = Field(0, ge=0, description="per API key (or client address); 0: unlimited")
    api_keys_file: Path | None = Field(None, description="one key per line; with api_keys_env unset too: no auth")
    api_keys_env: str = Field("CYCLEQD_API_KEYS", description="comma-separated keys")
    admin_key_env: str = Field("CYCLEQD_ROUTER_ADMIN_KEY", description="key for POST /admin/reload")
    cache_dir: Path = Field(Path(".cache/router"), description="classifier exemplar embeddings")
    metrics_public: bool = Field(False, description="serve /metrics without an API key even when keys are set")
    feedback: FeedbackPolicy = Field(default_factory=FeedbackPolicy)

    @field_validator("aliases")
    @classmethod
    def _weights(cls, v: dict[str, dict[str, float] | str]) -> dict[str, dict[str, float] | str]:
        for name, w in v.items():
            if isinstance(w, dict) and (not w or any(x < 0 for x in w.values()) or sum(w.values()) <= 0):
                raise ValueError(f"alias {name!r}: weights must be non-negative with a positive sum")
        return v

    @field_validator("manifest", mode="before")
    @classmethod
    def _sources(cls, v: object) -> object:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        if isinstance(v, list) and not v:
            raise ValueError("give at least one manifest")
        return v

    @property
    def manifests(self) -> list[str]:
        return [str(m) for m in ([self.manifest] if isinstance(self.manifest, str) else self.manifest)]

    def api_keys(self) -> list[str]:
        import os

        keys = [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        if self.api_keys_file is not None:
            keys += [ln.strip() for ln in self.api_keys_file.read_text().splitlines() if ln.strip()]
        return keys

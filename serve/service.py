"""From a serve config to a planned, materialised, supervised set of engines (what ``cycleqd-serve run`` does).

Order matters for "nothing left half-started": selection, rank checks and the placement plan come first (cheap,
refuse early), then the weights are written, then the pre-flight checks (vLLM present, ports free), and only then
does any process start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evolve.rundir import Bases, EvolveConfig, RunState, load_run
from serve.config import Selection, ServeConfig
from serve.engine import Engine
from serve.manifest import ServingManifest
from serve.materialise import (
    Artifact,
    MaterialiseError,
    Scorer,
    calibration_size,
    check_lora_rank,
    materialise,
    max_lora_rank,
    skill_exemplars,
)
from serve.plan import Plan, make_plan, model_size
from serve.preflight import ServeError, check_vllm, port_in_use
from serve.select import Selected, select
from serve.supervisor import Supervisor, elite_entry


@dataclass
class Prepared:
    cfg: ServeConfig
    run_config: EvolveConfig
    state: RunState
    bases: Bases
    selected: list[Selected]
    plan: Plan

    @property
    def base_model(self) -> Path:
        return self.run_config.resolved_population().base


def prepare(cfg: ServeConfig) -> Prepared:
    """Select and plan (no weights written, nothing started)."""
    run_config, state, bases = load_run(cfg.run)
    selected = select(state, cfg.select)
    base = run_config.resolved_population().base
    total = None
    if cfg.mode == "lora":
        total = check_lora_rank(bases, cfg.lora_rank, base)
    elif cfg.mode == "auto":
        with contextlib.suppress(MaterialiseError):  # auto may still serve full weights
            total = check_lora_rank(bases, cfg.lora_rank, base)
    size = model_size(base, cfg.dtype, total)
    plan = make_plan(cfg, [s.id for s in selected], size, max_lora_rank=max_lora_rank(total) if total else None)
    # From here on the config names the mode actually served (auto resolved), for materialise and the supervisor.
    cfg = cfg.model_copy(update={"mode": plan.mode})
    return Prepared(cfg, run_config, state, bases, selected, plan)


def preflight(prep: Prepared) -> None:
    """vLLM present, ports free: checked before any weights are written or any process starts."""
    cfg = prep.cfg
    check_vllm(cfg.python)
    for ep in prep.plan.engines:
        if port_in_use(cfg.host, ep.port):
            last = cfg.port + len(prep.plan.engines) - 1
            raise ServeError(
                f"port {ep.port} on {cfg.host} is in use (planned for {ep.id}); stop what holds it or set `port:` "
                f"in the config (engines use {cfg.port}..{last})"
            )
    if port_in_use(cfg.admin_host, cfg.admin_port):
        raise ServeError(f"admin_port {cfg.admin_port} on {cfg.admin_host} is in use; set `admin_port:` in the config")


def build_supervisor(
    prep: Prepared, *, on_materialised: Callable[[Artifact], None] | None = None, scorer: Scorer | None = None
) -> tuple[Supervisor, list[Artifact]]:
    """Materialise and score the selected elites and build the supervisor and the manifest it writes.

    ``on_materialised`` is called after each elite, while ``scorer.engine`` still holds exactly its served weights
    (``benchmarks/bench_routing_quality.py`` grades held-out tasks on them then)."""
    cfg = prep.cfg
    # calibration scores for every served elite
    scorer = scorer or Scorer(prep.run_config, calibration_items=calibration_size(cfg, prep.run_config))
    artifacts = materialise(cfg, prep.run_config, prep.bases, prep.selected, scorer=scorer, on_done=on_materialised)
    by_id = {a.selected.id: a for a in artifacts}
    engines = []
    for ep in prep.plan.engines:
        if ep.mode == "lora":
            adapters = {eid: by_id[eid].path.resolve() for eid in ep.elites}
            engines.append(Engine(ep, prep.base_model.resolve(), adapters))
        else:
            engines.append(Engine(ep, by_id[ep.elites[0]].path.resolve()))
    manifest = ServingManifest(
        run=str(cfg.run), skills=list(prep.run_config.skills), exemplars=skill_exemplars(prep.run_config, scorer.tasks)
    )

    def materialise_one(elite_id: str) -> Artifact:
        (sel,) = select(prep.state, Selection(ids=[elite_id], best_per_skill=False))
        return materialise(cfg, prep.run_config, prep.bases, [sel], scorer=scorer)[0]

    sup = Supervisor(cfg, engines, manifest, materialise_one=materialise_one)
    for ep in prep.plan.engines:
        engine = sup.engines[ep.id]
        manifest.elites += [elite_entry(by_id[eid], engine) for eid in ep.elites]
    return sup, artifacts

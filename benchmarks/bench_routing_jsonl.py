"""The router on a population whose skills are JSONL data, not the built-in world: held-out skill-classification
accuracy, the out-of-domain fallback rate on general chat prompts, and routed vs oracle vs best single elite.

Three JSONL skills are written from the skill world's items but graded by the JSONL graders (``sql``: the SQL
grader on a SQLite file; ``shell``: ``exact``; ``python``: ``python``, functions run in the sandbox on test
inputs). The population is the bootstrap's base, its three experts (one per skill: db -> sql, os -> shell,
code -> python), the plain average of all three and of every pair: eight elites. Every elite is scored on each
skill's calibration split (what the manifest tells the router) and test split (per item). The router is given a
manifest with those elites and the JSONL skills' exemplar prompts, and its own decision code (``Router.decide``,
model ``auto``) picks an elite for every test item from the text alone; general chat prompts measure how often it
falls back (``out_of_domain``) instead of forcing a skill.

    .venv/bin/python benchmarks/bench_routing_jsonl.py [--models .cache/demo/models]

Without bootstrap models at ``--models`` it trains miniature ones first (about a minute; numbers then describe
those tiny models).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from evolve.engines.hf import TransformersEngine
from evolve.evaluators import SPLITS, build_evaluators, get_skill
from evolve.evaluators.world.code import INT_INPUTS, LIST_INPUTS, SPECS
from evolve.evaluators.world.db import build_database
from evolve.models.modeling import load_model
from evolve.run_config import EvolveConfig
from router.app import Router
from router.policy import RoutingPolicy
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from serve.materialise import skill_exemplars

EXPERT = {"sql": "db", "shell": "os", "python": "code"}

GENERAL_CHAT = [
    "Hi! How are you doing today?", "Can you recommend a good novel for a long flight?",
    "What is the capital of Australia?", "Write a short poem about autumn leaves.",
    "How do I make a sourdough starter at home?", "Tell me a joke about cats.",
    "What should I pack for a week of hiking in the Alps?", "Explain why the sky is blue to a six-year-old.",
    "Who painted the Mona Lisa?", "Give me three tips for a job interview.",
    "What's a healthy breakfast I can make in five minutes?", "Translate 'good morning' into Spanish.",
    "How far is the Moon from the Earth?", "Summarise the plot of Romeo and Juliet.",
    "What are some fun things to do in Lisbon?", "How do I politely decline a wedding invitation?",
    "Why do cats purr?", "Suggest a name for my new puppy.", "What is the difference between weather and climate?",
    "How can I improve my sleep?", "Write a thank-you note to my neighbour.", "What year did World War II end?",
    "Recommend a board game for four players.", "How do vaccines work?", "What is a black hole?",
    "Plan a birthday party for a ten-year-old.", "Is it better to rent or buy a house?",
    "How do I care for a succulent?", "What music is good for studying?",
    "Tell me an interesting fact about octopuses.",
]  # fmt: skip


def write_skills(d: Path) -> dict[str, dict]:
    """The three JSONL skills (files under ``d``) as run-config specs."""
    d.mkdir(parents=True, exist_ok=True)
    db = d / "shop.sqlite"
    if not db.exists():
        import sqlite3

        dst = sqlite3.connect(db)
        build_database().backup(dst)
        dst.close()
    rows: dict[str, list[dict]] = {"sql": [], "shell": [], "python": []}
    for split in SPLITS:
        n = 300 if split == "train" else 120
        for i in get_skill("db").items(split, n, seed=11):
            rows["sql"].append({"prompt": i.prompt, "answer": i.answer})
        for i in get_skill("os").items(split, n, seed=11):
            rows["shell"].append({"prompt": i.prompt, "answer": i.answer})
        for i in get_skill("code").items(split, n, seed=11):
            arg = SPECS[i.template][1]
            inputs = INT_INPUTS if arg == "x" else LIST_INPUTS
            tests = [{"input": list(c)} for c in inputs]
            rows["python"].append({"prompt": i.prompt, "answer": i.answer, "args": [arg], "tests": tests})
    specs = {}
    for name, rs in rows.items():
        seen, uniq = set(), []
        for r in rs:
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                uniq.append(r)
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in uniq))
        grader = {"sql": "sql", "shell": "exact", "python": "python"}[name]
        specs[name] = {"kind": "jsonl", "path": str(d / f"{name}.jsonl"), "grader": grader}
        if name == "sql":
            specs[name]["database"] = str(db)
    return specs


def ensure_models(path: Path, console: Console) -> Path:
    if (path / "base").is_dir():
        return path
    from evolve.bootstrap import run_bootstrap
    from evolve.config import BootstrapConfig, PhaseConfig
    from evolve.models.modeling import ArchSpec

    out = Path(".cache/bench-routing-jsonl/models")
    if not (out / "base").is_dir():
        console.print(f"no bootstrap models at {path}: training miniature ones into {out}")
        cfg = BootstrapConfig(
            vocab_size=400, arch=ArchSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
            train_items_per_skill=800, base=PhaseConfig(steps=150, lr=3e-3, batch_size=32, levels=[1, 2, 3]),
            expert=PhaseConfig(steps=150, lr=1e-3, batch_size=32, levels=[1, 2, 3]), test_items=50,
        )  # fmt: skip
        run_bootstrap(cfg, out, console=Console(quiet=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path(".cache/demo/models"))
    ap.add_argument("--items", type=int, default=60, help="calibration and test items per skill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_routing_jsonl.json")
    args = ap.parse_args()
    console = Console(width=130)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-jsonl-"))
    models = ensure_models(args.models, console)
    run_config = EvolveConfig(models=models, skills=write_skills(tmp / "data"), seed=args.seed,
                              calibration_items=args.items, test_items=args.items)  # fmt: skip
    tasks = build_evaluators(run_config.skills)
    skills = list(tasks)

    # the population: base, experts, the average of all and of every pair
    model, tok = load_model(models / "base")
    engine = TransformersEngine(model, tok)
    weights = {"base": {k: v.detach().clone() for k, v in model.named_parameters()}}
    for s, e in EXPERT.items():
        m, _ = load_model(models / "experts" / e)
        weights[f"expert:{s}"] = {k: v.detach().clone() for k, v in m.named_parameters()}
    experts = [f"expert:{s}" for s in EXPERT]
    for group in [experts, *itertools.combinations(experts, 2)]:
        name = "avg(" + ",".join(g.split(":")[1] for g in group) + ")"
        weights[name] = {k: sum(weights[g][k] for g in group) / len(group) for k in weights["base"]}
    elites = list(weights)

    cal: dict[str, dict[str, float]] = {}
    test: dict[str, dict[str, list[float]]] = {}
    with console.status("scoring the population") as status:
        for e in elites:
            status.update(f"scoring {e}")
            engine.load_state_dict(weights[e])
            cal[e] = {
                s: t.evaluate(engine, "calibration", args.items, seed=args.seed).quality for s, t in tasks.items()
            }
            test[e] = {s: t.evaluate(engine, "test", args.items, seed=args.seed).scores for s, t in tasks.items()}

    manifest = ServingManifest(run="bench", skills=skills, exemplars=skill_exemplars(run_config))
    manifest.engines.append(EngineEntry(id="e0", url="http://127.0.0.1:9", device="cpu", mode="full",
                                        base_model="-", health=Health.READY))  # fmt: skip
    for e in elites:
        manifest.elites.append(EliteEntry(id=e, engine_id="e0", served_model_name=e, endpoint="http://127.0.0.1:9/v1",
                                          kind="full", scores=cal[e], calibration_scores=cal[e]))  # fmt: skip
    save_manifest(tmp / "manifest.json", manifest)
    router = Router(RoutingPolicy(manifest=str(tmp / "manifest.json"), cache_dir=tmp / "cache", margin=0.0))
    router.refresh_manifest(force=True)
    router.build_classifier()

    def decide(text: str) -> tuple[str, str, dict[str, float]]:
        body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
        ranked, w, reason = router.decide(body, {}, text)
        return ranked[0].id, reason, w

    routed, oracle, correct, ood_in = [], [], [], []
    per_elite = {e: [] for e in elites}
    test_records = {s: t.records("test", args.items, seed=args.seed) for s, t in tasks.items()}  # type: ignore[attr-defined]
    for s in skills:
        for k, rec in enumerate(test_records[s]):
            chosen, reason, w = decide(rec.prompt)
            routed.append(test[chosen][s][k])
            oracle.append(max(test[e][s][k] for e in elites))
            ood_in.append(reason == "out_of_domain")
            correct.append(reason != "out_of_domain" and max(w, key=w.get) == s)
            for e in elites:
                per_elite[e].append(test[e][s][k])
    chat = [decide(t)[1] == "out_of_domain" for t in GENERAL_CHAT]
    best_single = max(elites, key=lambda e: np.mean(list(cal[e].values())))
    rows = {
        "routed (classifier, model auto)": float(np.mean(routed)),
        f"best single elite by calibration ({best_single})": float(np.mean(per_elite[best_single])),
        "best single elite in hindsight (test)": max(float(np.mean(v)) for v in per_elite.values()),
        "oracle (best elite per item)": float(np.mean(oracle)),
    }
    table = Table(title=f"Routing on JSONL skills ({', '.join(skills)}): mean test score, {len(routed)} items")
    table.add_column("system")
    table.add_column("score %", justify="right")
    table.add_column("vs best single", justify="right")
    base_row = rows[f"best single elite by calibration ({best_single})"]
    for name, v in rows.items():
        table.add_row(name, f"{100 * v:.1f}", f"{v / base_row:.2f}x" if base_row else "-")
    console.print(table)
    rep = router.classifier_report
    summary = {
        "classification accuracy, held-out test exemplars (manifest)": rep.get("test_accuracy"),
        "classification accuracy, routed test items": float(np.mean(correct)),
        "out-of-domain share, in-domain test items": float(np.mean(ood_in)),
        "out-of-domain fallback rate, general chat prompts": float(np.mean(chat)),
        "out-of-domain threshold (cosine to nearest exemplar)": rep.get("ood_threshold"),
    }
    for k, v in summary.items():
        console.print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    elapsed = time.perf_counter() - t0
    console.print(f"elapsed {elapsed:.0f} s; models {models}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "models": str(models), "skills": skills, "elites": elites, "items_per_skill": args.items, "rows": rows,
        "classifier": summary, "classifier_report": rep, "calibration_scores": cal, "seconds": elapsed,
    }, indent=2))  # fmt: skip
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

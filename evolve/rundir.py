"""The run directory (contract #1, see ARCHITECTURE.md): its files, the one writer of each, and their readers.

``cycleqd-evolve run`` (:mod:`evolve.run`) creates it; ``report`` adds test scores to its state; ``serve`` and the
reports read it through :func:`load_run`. Nothing else writes it. Format (``format_version`` 1)::

    run.json             {"format_version", "config"}: the run's settings (an :class:`~evolve.run_config.EvolveConfig`);
                         written once, when the run starts, and checked on resume (:func:`check_run_dir`)
    svd/                 the experts' SVD bases (an :class:`~evolve.genome.Bases`), computed once per run:
                         base.safetensors (the base weights), one {expert}.safetensors per expert (per matrix its
                         factors "{name}.U", ".S", ".V", per other tensor its task vector "{name}.delta") and
                         manifest.json {"format_version", "experts", "rank_cap", "reconstruction_error" (per expert),
                         "genome_size"}; written as one directory, swapped into place (:func:`save_bases`)
    state.safetensors    every kept genome as a tensor, keyed by elite id; its metadata "state" is JSON:
                         generation, archives (cells, qualities, scores), elites (validation and, after
                         ``report``, test scores; lineage: parents, crossover weights, mutation, generation),
                         the RNG states, and "history" (one record per generation: each archive's
                         [elites, coverage, QD score, best] after it, and the parents of every child that
                         entered an archive, so lineage survives replaced elites; added later, so a state
                         without it still loads, with an empty history); replaced atomically (write new, then
                         rename) every generation (:meth:`RunState.save`)

Beside them the commands leave outputs that no run reads back: ``heatmaps/`` (``run``), ``report.json`` and
``report.html`` (``report``). Every file is refused on load with an error that names it and the field
(:class:`RunError`, :class:`BasisError`); a run directory that cannot be used is never overwritten. Safetensors
everywhere, never pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cycleqd.atomic import atomic_directory, atomic_file, read_versioned_json, recover, write_json_atomic
from cycleqd.errors import UserError
from evolve.archive import SkillArchive
from evolve.genome import Bases
from evolve.merge import get_method
from evolve.run_config import EvolveConfig, same_run

__all__ = [
    "BASES_FORMAT_VERSION",
    "BASES_MANIFEST",
    "FORMAT_VERSION",
    "RUN_FILE",
    "STATE_FILE",
    "SVD_DIR",
    "Bases",
    "BasisError",
    "EvolveConfig",
    "RunError",
    "RunState",
    "aggregate_genome",
    "archive_ids",
    "best_mean_elite",
    "check_run_dir",
    "genomes_equal",
    "load_bases",
    "load_run",
    "load_run_config",
    "mean_score",
    "save_bases",
    "write_run_file",
]

FORMAT_VERSION = 1
RUN_FILE = "run.json"
STATE_FILE = "state.safetensors"
SVD_DIR = "svd"
BASES_FORMAT_VERSION = 1
BASES_MANIFEST = "manifest.json"


class RunError(UserError, RuntimeError):
    """A run directory that cannot be used; it is never overwritten. The message names the file and field."""


class BasisError(UserError):
    """SVD bases that are missing, corrupt or do not match the model; the message names the file."""


# -- run.json ----------------------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, config: EvolveConfig, *, resume: bool) -> None:
    """Refuse what would mix two runs in one directory: a resume without ``run.json`` or with other settings than
    it holds (compared as validated configs, so a run from an older release, without a newly added, defaulted
    setting, still resumes), or a new run in a directory that is not empty."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if resume:
        if not run_file.is_file():
            raise RunError(f"{run_file}: missing; there is no run to resume in {run_dir}")
        if not same_run(EvolveConfig.model_validate(_read_run_file(run_file)), config):
            raise RunError(f"{run_file}: the saved config differs from the one given; resume without --config")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"{run_dir}: not empty; pass --resume to continue the run there, or choose another --out")


def write_run_file(run_dir: Path, config: EvolveConfig) -> None:
    """``run.json``, once, when a run starts (the directory is made)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / RUN_FILE, {"format_version": FORMAT_VERSION, "config": json.loads(config.model_dump_json())}
    )


def load_run_config(run_dir: Path) -> EvolveConfig:
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise RunError(f"{run_file}: missing; {run_dir} is not a CycleQD run directory")
    return EvolveConfig.model_validate(_read_run_file(run_file))


def _read_run_file(path: Path) -> dict[str, Any]:
    return read_versioned_json(path, FORMAT_VERSION, RunError, "not a usable CycleQD run directory")["config"]


# -- svd/ --------------------------------------------------------------------------------------------------------
def save_bases(directory: Path, bases: Bases) -> None:
    """``base.safetensors``, one ``{expert}.safetensors`` per expert and ``manifest.json``, written to a
    temporary directory and swapped into place (``cycleqd.atomic.atomic_directory``)."""
    with atomic_directory(Path(directory)) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in bases.base.items()}, tmp / "base.safetensors")
        for name, f in zip(bases.experts, bases.factors, strict=True):
            save_file({k: v.cpu().contiguous() for k, v in f.items()}, tmp / f"{name}.safetensors")
        manifest = {
            "format_version": BASES_FORMAT_VERSION,
            "experts": bases.experts,
            "rank_cap": bases.rank_cap,
            "reconstruction_error": dict(zip(bases.experts, bases.errors, strict=True)),
            "genome_size": bases.layout.size,
        }
        (tmp / BASES_MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_bases(directory: Path) -> Bases:
    """The bases :func:`save_bases` wrote (on the CPU; ``Bases.to`` moves them)."""
    directory = Path(directory)
    path = directory / BASES_MANIFEST
    if not path.is_file():  # a save killed between its two renames left the old bases aside: put them back
        with contextlib.suppress(OSError):
            recover(directory)
    if not path.is_file():
        raise BasisError(f"{path}: missing; {directory} holds no SVD bases")
    manifest = read_versioned_json(path, BASES_FORMAT_VERSION, BasisError, "the SVD bases must be recomputed")
    tensors = {}
    for name in ["base", *manifest["experts"]]:
        file = directory / f"{name}.safetensors"
        try:
            tensors[name] = load_file(file)
        except (OSError, SafetensorError) as exc:
            raise BasisError(f"{file}: missing or corrupt ({exc})") from exc
    return Bases(
        manifest["experts"],
        tensors["base"],
        [tensors[e] for e in manifest["experts"]],
        [manifest["reconstruction_error"][e] for e in manifest["experts"]],
        manifest["rank_cap"],
    )


# -- state.safetensors -------------------------------------------------------------------------------------------
class RunState:
    """Everything that changes during a run; (de)serialised as one safetensors file."""

    def __init__(self) -> None:
        self.generation = 0
        self.genomes: dict[str, torch.Tensor] = {}
        self.elites: dict[str, dict[str, Any]] = {}  # id -> {"validation": {...}, "test": {...}, "lineage": {...}}
        self.archives: dict[str, SkillArchive] = {}
        #: per generation: {"generation", "archives": {skill: [elites, coverage, qd_score, best]}, "entered"}
        self.history: list[dict[str, Any]] = []
        self.torch_gen = torch.Generator()
        self.np_rng = np.random.default_rng()

    def save(self, path: Path) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "generation": self.generation,
            "elites": self.elites,
            "archives": {k: a.to_dict() for k, a in self.archives.items()},
            "np_rng": self.np_rng.bit_generator.state,
            "history": self.history,
        }
        tensors = {f"genome/{k}": v.contiguous() for k, v in self.genomes.items()}
        tensors["rng/torch"] = self.torch_gen.get_state()
        try:
            with atomic_file(path) as tmp:
                save_file(tensors, str(tmp), metadata={"state": json.dumps(meta, default=_json_default)})
        except (OSError, SafetensorError) as exc:  # a full disk, a read-only or vanished directory
            raise RunError(
                f"{path}: cannot save generation {self.generation} ({_io_reason(exc)}); the state saved before it is "
                f"unchanged. Free space or make {path.parent} writable, then continue with --resume"
            ) from exc

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
            raise RunError(f"{path}: corrupt or not a CycleQD state file ({exc}); the run cannot resume") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise RunError(
                f"{path}: field 'format_version' is {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        st = cls()
        st.generation = meta["generation"]
        st.elites = meta["elites"]
        st.archives = {k: SkillArchive.from_dict(a) for k, a in meta["archives"].items()}
        st.genomes = {k.removeprefix("genome/"): v for k, v in tensors.items() if k.startswith("genome/")}
        st.torch_gen.set_state(tensors["rng/torch"])
        st.np_rng.bit_generator.state = meta["np_rng"]
        st.history = meta.get("history", [])
        return st

    def record_history(self, generation: int, entered: dict[str, list[str]]) -> None:
        """Append the archives' standard curves (pyribs' coverage, QD score, best) after ``generation``."""
        stats = {s: a.stats for s, a in self.archives.items()}
        self.history.append({
            "generation": generation,
            "archives": {s: [st.num_elites, st.coverage, st.qd_score, st.best] for s, st in stats.items()},
            "entered": entered,
        })  # fmt: skip


def _io_reason(exc: Exception) -> str:
    """The operating system's words for a failed write (safetensors wraps them in a Rust debug string)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    found = re.search(r"os error (\d+)", str(exc))
    return os.strerror(int(found.group(1))) if found else str(exc)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


# -- the whole directory -----------------------------------------------------------------------------------------
def load_run(run_dir: Path) -> tuple[EvolveConfig, RunState, Bases]:
    """Read a run directory without building an engine (for serving and inspection)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise RunError(f"{state_file}: missing; the run in {run_dir} has not saved a generation yet")
    return config, RunState.load(state_file), load_bases(run_dir / SVD_DIR)


# -- what a state names: the best elite, the paper's final model; comparisons ---------------------------------------
def mean_score(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def best_mean_elite(state: RunState) -> str:
    """The elite with the highest mean validation score (ties: the smaller id)."""
    return max(sorted(state.elites), key=lambda e: mean_score(state.elites[e]["validation"]))


def aggregate_genome(state: RunState) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's final model: each archive's best elite, merged with softmax(best quality) weights."""
    best = {s: a.stats.best_id for s, a in state.archives.items()}
    q = torch.tensor([state.archives[s].stats.best for s in best])
    w = torch.softmax(q, dim=0).tolist()
    genome = get_method("task_arithmetic").merge_genomes([state.genomes[best[s]] for s in best], weights=w)
    return genome, {best[s]: wi for wi, s in zip(w, best, strict=True)}


def archive_ids(state: RunState) -> dict[str, list[tuple[tuple[int, ...], str, float]]]:
    """A comparable summary of the archives (cell, elite id, quality), for determinism checks."""
    return {s: [(e.cell, e.id, e.quality) for e in a.elites()] for s, a in state.archives.items()}


def genomes_equal(a: RunState, b: RunState, ids: Sequence[str] | None = None) -> bool:
    keys = ids if ids is not None else sorted(set(a.genomes) | set(b.genomes))
    return all(k in a.genomes and k in b.genomes and torch.equal(a.genomes[k], b.genomes[k]) for k in keys)

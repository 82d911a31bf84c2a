"""One MAP-Elites archive per skill, with a small pyribs-like API.

In the archive of skill k, quality is the validation score on k and the cell is given by the other skills'
validation scores (the behaviour characteristics), each binned over a range. ``add`` takes a batch and returns
a status per item, as ``ribs.archives.GridArchive.add`` does; ``stats`` gives coverage, QD score and best.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class AddStatus(IntEnum):
    NOT_ADDED = 0
    IMPROVE_EXISTING = 1
    NEW = 2


@dataclass(frozen=True)
class Elite:
    id: str
    cell: tuple[int, ...]
    quality: float
    scores: dict[str, float]


@dataclass(frozen=True)
class ArchiveStats:
    num_elites: int
    coverage: float  # occupied cells / all cells
    qd_score: float  # sum of the elites' qualities
    best: float | None  # highest quality, None when empty
    best_id: str | None


class SkillArchive:
    """A grid archive for one quality skill over the binned scores of the others."""

    def __init__(
        self,
        *,
        quality: str,
        measures: Sequence[str],
        ranges: Sequence[tuple[float, float]],
        bins: int = 15,
    ) -> None:
        if quality in measures:
            raise ValueError(f"the quality skill {quality!r} cannot also be a measure")
        if len(measures) != len(ranges):
            raise ValueError(f"need one range per measure: {len(measures)} measures, {len(ranges)} ranges")
        for m, (lo, hi) in zip(measures, ranges, strict=True):
            if not hi > lo:
                raise ValueError(f"range of {m!r} is empty: ({lo}, {hi}); the upper bound must exceed the lower")
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        self.quality = quality
        self.measures = list(measures)
        self.ranges = [(float(lo), float(hi)) for lo, hi in ranges]
        self.bins = bins
        self._cells: dict[tuple[int, ...], Elite] = {}

    def index_of(self, scores: Mapping[str, float]) -> tuple[int, ...]:
        """Cell of a score dict; scores outside a range fall into its edge bins."""
        cell = []
        for m, (lo, hi) in zip(self.measures, self.ranges, strict=True):
            i = int((scores[m] - lo) / (hi - lo) * self.bins)
            cell.append(min(self.bins - 1, max(0, i)))
        return tuple(cell)

    def add(self, ids: Sequence[str], scores: Sequence[Mapping[str, float]]) -> list[AddStatus]:
        """Insert each candidate where its cell is empty or it beats the incumbent; a status per candidate.

        Candidates are processed in order, so two in one batch landing in the same cell compete fairly.
        """
        if len(ids) != len(scores):
            raise ValueError(f"{len(ids)} ids but {len(scores)} score dicts")
        statuses = []
        for eid, sc in zip(ids, scores, strict=True):
            missing = [s for s in [self.quality, *self.measures] if s not in sc]
            if missing:
                raise KeyError(f"scores of {eid!r} lack {missing}")
            cell = self.index_of(sc)
            q = float(sc[self.quality])
            old = self._cells.get(cell)
            if old is None or q > old.quality:
                self._cells[cell] = Elite(eid, cell, q, {k: float(v) for k, v in sc.items()})
                statuses.append(AddStatus.NEW if old is None else AddStatus.IMPROVE_EXISTING)
            else:
                statuses.append(AddStatus.NOT_ADDED)
        return statuses

    def retrieve(self, scores: Mapping[str, float]) -> Elite | None:
        return self._cells.get(self.index_of(scores))

    def elites(self) -> list[Elite]:
        """Elites in a stable order (by cell), so sampling from them is reproducible."""
        return [self._cells[c] for c in sorted(self._cells)]

    def __len__(self) -> int:
        return len(self._cells)

    @property
    def stats(self) -> ArchiveStats:
        elites = self.elites()
        best = max(elites, key=lambda e: (e.quality, e.id), default=None)
        return ArchiveStats(
            num_elites=len(elites),
            coverage=len(elites) / self.bins ** len(self.measures),
            qd_score=sum(e.quality for e in elites),
            best=best.quality if best else None,
            best_id=best.id if best else None,
        )

    # -- run-directory form ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quality": self.quality,
            "measures": self.measures,
            "ranges": self.ranges,
            "bins": self.bins,
            "elites": [
                {"id": e.id, "cell": list(e.cell), "quality": e.quality, "scores": e.scores} for e in self.elites()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkillArchive:
        archive = cls(
            quality=data["quality"],
            measures=data["measures"],
            ranges=[tuple(r) for r in data["ranges"]],
            bins=data["bins"],
        )
        for e in data["elites"]:
            cell = tuple(e["cell"])
            archive._cells[cell] = Elite(e["id"], cell, e["quality"], dict(e["scores"]))
        return archive


def default_ranges(
    expert_scores: Mapping[str, Mapping[str, float]], measures: Sequence[str]
) -> list[tuple[float, float]]:
    """The paper's ranges: from 85% of the weakest expert's score to 115% of the strongest's, per measure."""
    out = []
    for m in measures:
        values = [s[m] for s in expert_scores.values()]
        lo, hi = 0.85 * min(values), 1.15 * max(values)
        out.append((lo, hi if hi > lo else lo + 1e-6))
    return out

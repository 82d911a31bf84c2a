"""Model merging by name: merge methods registered over one task-arithmetic core.

Every merge here is task arithmetic, tensor by tensor in float32 (mergekit's "generalised task arithmetic"):

    W = W_base + sum_i w_i * tau_i,    tau_i = W_i - W_base (model i's task vector)

with two optional steps before the sum, each a method's choice:

- **sparsify** each task vector: TIES keeps its top ``density`` share by magnitude, DARE drops each entry with
  probability ``drop`` and rescales the rest by 1 / (1 - drop);
- **elect signs** (TIES): per entry, the sign of the summed task vectors wins and the sum becomes the mean of the
  entries that agree with it, times ``scale``.

The registry, :data:`METHODS` (look a method up with :func:`get_method`; merge in one call with :func:`merge`):

================  ===================  ====================================================================
name              parameters           what it is
================  ===================  ====================================================================
average           (none)               weights 1/n: the plain average of the models
task_arithmetic   weights (one each)   W_base + sum_i weights[i] * tau_i
ties              density, scale       TIES-merging (Yadav et al., 2023): trim, elect signs, agreeing mean
dare              drop, seed           DARE (Yu et al., 2024): random drop and rescale, then the average
================  ===================  ====================================================================

A method (:class:`MergeMethod`) has a ``name``, a ``label`` (how a report names its row), its parameters as a
pydantic model (``Params``) and:

- ``merge(base, models, params)``: one merge of state dicts;
- ``prepare(base, models)``: a :class:`Merger` for many merges of the same models at different parameters (a
  merge-weight search): the task vectors are taken once, and TIES also sorts their magnitudes once, so each merge
  reads its trim threshold instead of searching for it (the k-th value search was over half of every TIES merge
  of SmolLM2's 134.5M parameters: 6.7 of 12.5 s on 2 cores). The price is memory: one float32 copy of every
  model's task vector, and with TIES one of their sorted magnitudes; the threshold is the same k-th largest
  magnitude either way, so both give identical merges;
- for the linear methods (``linear``: no sparsifying, no sign election), ``merge_genomes(genomes, params)``: the
  same sum on genomes. A genome is its model's task vector in the experts' SVD coordinates (evolve/genome.py), so
  this is the merge without materialising weights: CycleQD's crossover and final aggregate, and the searched and
  reported task arithmetic, are merges of genomes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cycleqd.errors import UserError

StateDict = Mapping[str, torch.Tensor]
#: One tensor's task vectors in, the sparsified ones out: ``(tensor name, [n_models, numel] float32)``.
Sparsify = Callable[[str, torch.Tensor], torch.Tensor]


class MergeError(UserError, ValueError):
    """A merge that cannot be made: an unknown method, bad parameters, models that do not fit the base."""


class MergeParams(BaseModel):
    """A merge method's parameters (each method subclasses this)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=MergeParams)


# -- the core ------------------------------------------------------------------------------------------------
def weighted_sum(
    start: torch.Tensor, vectors: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float]
) -> torch.Tensor:
    """``start + sum_i weights[i] * vectors[i]``, added in order into a copy of ``start``: task arithmetic's sum,
    for one weight tensor (``start`` the base's) or for genomes (``start`` zeros: the base's genome)."""
    acc = start.clone()
    for v, w in zip(vectors, weights, strict=True):
        acc.add_(v.reshape(start.shape), alpha=float(w))
    return acc


def trim_to_density(
    vectors: torch.Tensor, density: float, sorted_magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row of ``vectors`` with only its top ``density`` share of entries by magnitude kept (entries equal to
    the threshold, the k-th largest magnitude, are all kept); ``sorted_magnitudes`` (each row's magnitudes sorted
    ascending) saves searching for the threshold."""
    n = vectors.shape[1]
    k = max(1, round(density * n))
    if sorted_magnitudes is not None:
        thresh = sorted_magnitudes[:, n - k : n - k + 1]
    else:
        thresh = vectors.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
    return vectors * (vectors.abs() >= thresh)


def elect_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the rows that are non-zero and agree with the sign of the rows' sum (TIES)."""
    agree = vectors * vectors.sum(0).sign() > 0
    return (vectors * agree).sum(0) / agree.sum(0).clamp(min=1)


class TaskVectors:
    """The models' task vectors against ``base``, per tensor one float32 row per model (flattened): taken per
    tensor when asked for, or all at once and kept (``keep``) for many merges; ``presort`` also keeps each row's
    magnitudes sorted ascending (TIES's trim thresholds)."""

    def __init__(self, base: StateDict, models: Sequence[StateDict], *, keep: bool, presort: bool = False) -> None:
        if not models:
            raise MergeError("a merge needs at least one model")
        if presort and not keep:
            raise MergeError("sorted magnitudes are kept only with the task vectors (keep=True)")
        self.base, self.models = base, list(models)
        self._kept = {name: self._take(name) for name in base} if keep else None
        self.sorted = (
            {name: tv.abs().sort(dim=1).values for name, tv in self._kept.items()}
            if self._kept is not None and presort
            else None
        )

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._kept[name] if self._kept is not None else self._take(name)

    def _take(self, name: str) -> torch.Tensor:
        b = self.base[name]
        for i, m in enumerate(self.models):
            if m[name].shape != b.shape:
                raise MergeError(
                    f"{name}: model {i}'s shape {tuple(m[name].shape)} differs from the base's {tuple(b.shape)}"
                )
        return torch.stack([(m[name].float() - b.float()).flatten() for m in self.models])


# -- methods -------------------------------------------------------------------------------------------------
class MergeMethod(Generic[P]):
    """A merge method: task arithmetic with its own weights, sparsifying and sign election (the core above).

    Subclasses set ``name``, ``label`` and ``Params`` and override the hooks they need: ``coefficients`` (the
    weights w_i), ``sparsifier``, ``elect_sign`` with ``scale``, ``presort``."""

    name: ClassVar[str]
    #: How a report names the method's row.
    label: ClassVar[str]
    Params: ClassVar[type[MergeParams]]
    #: Sum the sign-elected agreeing mean (times ``scale``) instead of the weighted task vectors.
    elect_sign: ClassVar[bool] = False
    #: ``prepare`` sorts the task vectors' magnitudes once (for thresholds by magnitude).
    presort: ClassVar[bool] = False

    @property
    def linear(self) -> bool:
        """A fixed linear combination of the models' task vectors (no sparsifying, no sign election), so also a
        merge of genomes (``merge_genomes``)."""
        return not self.elect_sign and type(self).sparsifier is MergeMethod.sparsifier

    def params(self, params: P | Mapping[str, Any] | None = None, /, **overrides: Any) -> P:
        """Validated parameters: ``params`` (a ``Params``, a mapping or None for the defaults) with ``overrides``."""
        if isinstance(params, self.Params) and not overrides:
            return params  # type: ignore[return-value]
        if isinstance(params, BaseModel) and not isinstance(params, self.Params):
            raise MergeError(f"merge method {self.name!r} takes {self.Params.__name__}, not {type(params).__name__}")
        data = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
        try:
            return self.Params.model_validate({**data, **overrides})  # type: ignore[return-value]
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'parameters'}: {err['msg']}" for err in e.errors()
            )
            raise MergeError(f"merge method {self.name!r}: {problems}") from None

    def coefficients(self, params: P, n: int) -> list[float]:
        """The weights w_i of the n models' task vectors (unused with ``elect_sign``)."""
        return [1.0] * n

    def scale(self, params: P) -> float:
        """The factor of the sign-elected mean (with ``elect_sign``)."""
        return 1.0

    def sparsifier(self, params: P, vectors: TaskVectors) -> Sparsify | None:
        """What sparsifies each tensor's task vectors before the sum, if anything."""
        return None

    def merge(
        self, base: StateDict, models: Sequence[StateDict], params: P | Mapping[str, Any] | None = None, /, **kw: Any
    ) -> dict[str, torch.Tensor]:
        """One merge of ``models`` (state dicts with the base's tensors) onto ``base``, in the base's dtypes."""
        p = self.params(params, **kw)  # bad parameters fail before any task vector is taken
        return self.merge_vectors(TaskVectors(base, models, keep=False), p)

    def prepare(self, base: StateDict, models: Sequence[StateDict]) -> Merger[P]:
        """Many merges of the same models: the task vectors taken (and sorted, with ``presort``) once."""
        return Merger(self, TaskVectors(base, models, keep=True, presort=self.presort))

    def merge_vectors(self, vectors: TaskVectors, params: P) -> dict[str, torch.Tensor]:
        """The core: per tensor, sparsify the task vectors, then add their weighted sum (or with ``elect_sign``,
        ``scale`` times their sign-elected mean) to the base."""
        sparsify = self.sparsifier(params, vectors)
        weights = self.coefficients(params, len(vectors))
        scale = self.scale(params)
        out = {}
        for name, b in vectors.base.items():
            tv = vectors[name]
            if sparsify is not None:
                tv = sparsify(name, tv)
            if self.elect_sign:
                merged = b.float() + scale * elect_signs(tv).reshape(b.shape)
            else:
                merged = weighted_sum(b.float(), tv, weights)
            out[name] = merged.to(b.dtype)
        return out

    def merge_genomes(
        self, genomes: Sequence[torch.Tensor], params: P | Mapping[str, Any] | None = None, /, **kw: Any
    ) -> torch.Tensor:
        """The merge of models given as genomes, as a genome (linear methods only): their weighted sum."""
        if not self.linear:
            raise MergeError(f"merge method {self.name!r} is not linear in the task vectors: it has no genome form")
        if not genomes:
            raise MergeError("a merge needs at least one model")
        p = self.params(params, **kw)
        return weighted_sum(torch.zeros_like(genomes[0]), genomes, self.coefficients(p, len(genomes)))


class Merger(Generic[P]):
    """One method's merges of fixed models (from :meth:`MergeMethod.prepare`): call it with parameters."""

    def __init__(self, method: MergeMethod[P], vectors: TaskVectors) -> None:
        self.method, self.vectors = method, vectors

    def __call__(self, params: P | Mapping[str, Any] | None = None, /, **kw: Any) -> dict[str, torch.Tensor]:
        return self.method.merge_vectors(self.vectors, self.method.params(params, **kw))


class NoParams(MergeParams):
    """A method without parameters."""


class Average(MergeMethod[NoParams]):
    """The plain average of the models: task arithmetic with weights 1/n."""

    name = "average"
    label = "task arithmetic (average)"
    Params = NoParams

    def coefficients(self, params: NoParams, n: int) -> list[float]:
        return [1.0 / n] * n


class TaskArithmeticParams(MergeParams):
    weights: list[float] = Field(min_length=1, description="one weight per model, in the models' order")


class TaskArithmetic(MergeMethod[TaskArithmeticParams]):
    """``W_base + sum_i weights[i] * (W_i - W_base)``."""

    name = "task_arithmetic"
    label = "task arithmetic"
    Params = TaskArithmeticParams

    def coefficients(self, params: TaskArithmeticParams, n: int) -> list[float]:
        if len(params.weights) != n:
            raise MergeError(f"need one weight per model, got {n} models and {len(params.weights)} weights")
        return list(params.weights)


class TiesParams(MergeParams):
    density: float = Field(0.2, gt=0, le=1, description="the share of each task vector kept, by magnitude")
    scale: float = Field(1.0, description="the factor of the merged task vector")


class Ties(MergeMethod[TiesParams]):
    """TIES-merging (Yadav et al., 2023): trim each task vector to its top ``density`` share by magnitude (per
    model, over the whole tensor), elect a sign per entry by the summed trimmed vectors, average only the entries
    that agree with it, and add ``scale`` times that mean."""

    name = "ties"
    label = "TIES"
    Params = TiesParams
    elect_sign = True
    presort = True

    def scale(self, params: TiesParams) -> float:
        return params.scale

    def sparsifier(self, params: TiesParams, vectors: TaskVectors) -> Sparsify:
        sorted_magnitudes = vectors.sorted

        def trim(name: str, tv: torch.Tensor) -> torch.Tensor:
            return trim_to_density(tv, params.density, None if sorted_magnitudes is None else sorted_magnitudes[name])

        return trim


class DareParams(MergeParams):
    drop: float = Field(0.5, ge=0, lt=1, description="the probability of dropping each task-vector entry")
    seed: int = Field(0, description="seeds the drop masks, so a merge is reproducible")


class Dare(MergeMethod[DareParams]):
    """DARE (Yu et al., 2024): drop each task-vector entry with probability ``drop``, rescale the rest by
    1 / (1 - drop), then take the plain average. The masks are drawn on the CPU, model by model and tensor by
    tensor in the base's order, from one generator seeded with ``seed``: the same masks anywhere."""

    name = "dare"
    label = "DARE"
    Params = DareParams

    def coefficients(self, params: DareParams, n: int) -> list[float]:
        return [1.0 / n] * n

    def sparsifier(self, params: DareParams, vectors: TaskVectors) -> Sparsify:
        gen = torch.Generator().manual_seed(params.seed)
        # drawn up front, model by model: the order the masks have always been drawn in
        keep = [
            {name: torch.rand(b.shape, generator=gen) >= params.drop for name, b in vectors.base.items()}
            for _ in range(len(vectors))
        ]

        def drop_and_rescale(name: str, tv: torch.Tensor) -> torch.Tensor:
            b = vectors.base[name].float().flatten()
            mask = torch.stack([k[name].flatten() for k in keep]).to(tv.device)
            # rounded through the sparse models' weights, as DARE merges them: identical to merging those models
            return (b + tv * mask / (1 - params.drop)) - b

        return drop_and_rescale


def _registry(*methods: MergeMethod[Any]) -> dict[str, MergeMethod[Any]]:
    return {m.name: m for m in methods}


#: Every merge method by name.
METHODS: dict[str, MergeMethod[Any]] = _registry(Average(), TaskArithmetic(), Ties(), Dare())


def get_method(name: str) -> MergeMethod[Any]:
    """The registered merge method ``name``; an unknown name is a :class:`MergeError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}: known methods are {', '.join(METHODS)}") from None


def merge(
    method: str, base: StateDict, models: Sequence[StateDict], params: Mapping[str, Any] | None = None, /, **kw: Any
) -> dict[str, torch.Tensor]:
    """One merge by method name: ``merge("ties", base, experts, density=0.3)``."""
    return get_method(method).merge(base, models, params, **kw)

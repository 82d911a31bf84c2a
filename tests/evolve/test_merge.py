"""Merge methods by name over one task-arithmetic core: the registry, and merges bit-identical to the plain
functions they replaced (kept below as the reference)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from evolve.merge import METHODS, MergeError, MergeMethod, get_method, merge
from evolve.operators import CrossoverConfig, crossover

BASE = {"w": torch.zeros(2, 3)}
A = {"w": torch.tensor([[1.0, -2.0, 0.1], [0.0, 3.0, -0.2]])}
B = {"w": torch.tensor([[1.0, 2.0, -0.1], [4.0, -1.0, 0.3]])}


# -- the reference: the merge functions as they were before the registry -------------------------------------
def _old_task_arithmetic(base, models, weights):
    out = {}
    for name, b in base.items():
        acc = b.float().clone()
        for m, w in zip(models, weights, strict=True):
            acc.add_(m[name].float() - b.float(), alpha=float(w))
        out[name] = acc.to(b.dtype)
    return out


def _old_average(base, models):
    return _old_task_arithmetic(base, models, [1.0 / len(models)] * len(models))


def _old_ties(base, models, density, scale, presort):
    vectors = {name: torch.stack([(m[name].float() - b.float()).flatten() for m in models]) for name, b in base.items()}
    srt = {name: tv.abs().sort(dim=1).values for name, tv in vectors.items()} if presort else None
    out = {}
    for name, b in base.items():
        flat = vectors[name]
        n = flat.shape[1]
        k = max(1, round(density * n))
        if srt is not None:
            thresh = srt[name][:, n - k : n - k + 1]
        else:
            thresh = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= thresh)
        agree = trimmed * trimmed.sum(0).sign() > 0
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[name] = (b.float() + scale * merged.reshape(b.shape)).to(b.dtype)
    return out


def _old_dare(base, models, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    sparse = []
    for m in models:
        sd = {}
        for name, b in base.items():
            tv = m[name].float() - b.float()
            keep = (torch.rand(tv.shape, generator=gen) >= drop).to(tv.device)
            sd[name] = b.float() + tv * keep / (1 - drop)
        sparse.append(sd)
    return _old_average(base, sparse)


def _old_crossover(parents, cfg, gen):
    w = torch.normal(1.0 + cfg.mu, cfg.sigma, size=(len(parents),), generator=gen)
    w = w / w.sum()
    child = torch.zeros_like(parents[0])
    for wi, p in zip(w.tolist(), parents, strict=True):
        child.add_(p, alpha=wi)
    return child, w.tolist()


def _family(n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (8, 16), "b": (5,), "c": (3, 4, 7), "d": (1, 1)}
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    models = [
        {k: (v.float() + torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()} for _ in range(n)
    ]
    if n > 1:  # equal magnitudes: ties at the trim threshold are all kept
        models[-1]["a"][0, :4] = (base["a"][0, :4].float() + 0.5).to(dtype)
    return base, models


def _equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


FAMILIES = [(n, dtype) for n in (1, 2, 3) for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize(("n", "dtype"), FAMILIES)
def test_linear_merges_are_bit_identical_to_the_functions_they_replaced(n, dtype):
    base, models = _family(n, dtype)
    _equal(merge("average", base, models), _old_average(base, models))
    weights = [0.3, -0.7, 1.9][:n]
    _equal(merge("task_arithmetic", base, models, weights=weights), _old_task_arithmetic(base, models, weights))


@pytest.mark.parametrize(("n", "dtype"), FAMILIES)
def test_ties_one_shot_and_prepared_are_bit_identical_to_the_old_ties(n, dtype):
    base, models = _family(n, dtype)
    prepared = get_method("ties").prepare(base, models)  # the fast path: magnitudes sorted once
    assert prepared.vectors.sorted is not None
    for density, scale in [(0.2, 1.0), (0.05, 0.5), (0.5, 1.7), (1.0, 1.0), (0.33, 0.0)]:
        want = _old_ties(base, models, density, scale, presort=False)
        _equal(_old_ties(base, models, density, scale, presort=True), want)
        _equal(merge("ties", base, models, density=density, scale=scale), want)
        _equal(prepared(density=density, scale=scale), want)


@pytest.mark.parametrize(("n", "dtype"), FAMILIES)
def test_dare_is_bit_identical_to_the_old_dare(n, dtype):
    base, models = _family(n, dtype)
    for drop, seed in [(0.5, 0), (0.5, 7), (0.0, 1), (0.9, 3)]:
        want = _old_dare(base, models, drop, seed)
        _equal(merge("dare", base, models, drop=drop, seed=seed), want)
        _equal(get_method("dare").prepare(base, models)(drop=drop, seed=seed), want)


def test_task_arithmetic_and_average():
    assert torch.allclose(merge("average", BASE, [A, B])["w"], (A["w"] + B["w"]) / 2)
    assert torch.allclose(merge("task_arithmetic", BASE, [A], weights=[2.0])["w"], 2 * A["w"])
    with pytest.raises(MergeError, match="one weight per model"):
        merge("task_arithmetic", BASE, [A, B], weights=[1.0])
    with pytest.raises(ValueError, match="shape"):  # a MergeError is a ValueError
        merge("average", BASE, [{"w": torch.zeros(3, 2)}])


def test_ties_trims_elects_and_averages_agreeing_entries():
    merged = merge("ties", BASE, [A, B], density=0.5)["w"]
    assert merged[0, 0] == pytest.approx(1.0)  # both +1: mean of agreeing
    assert merged[1, 0] == pytest.approx(4.0)  # only B has it
    assert merged[0, 2] == 0.0 and merged[1, 2] == 0.0  # small entries trimmed away
    full = merge("ties", BASE, [A, A], density=1.0)["w"]
    assert torch.allclose(full, A["w"])  # identical task vectors merge to themselves
    with pytest.raises(MergeError, match="'ties': density"):
        get_method("ties").prepare(BASE, [A])(density=0.0)


def test_dare_is_unbiased_and_seeded():
    big = {"w": torch.ones(200, 200)}
    base = {"w": torch.zeros(200, 200)}
    merged = merge("dare", base, [big], drop=0.5, seed=1)["w"]
    assert set(torch.unique(merged).tolist()) == {0.0, 2.0}
    assert merged.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(merged, merge("dare", base, [big], drop=0.5, seed=1)["w"])
    assert torch.equal(merge("dare", BASE, [A], drop=0.0)["w"], A["w"])
    with pytest.raises(MergeError, match="drop"):
        merge("dare", BASE, [A], drop=1.0)


# -- the registry ----------------------------------------------------------------------------------------------
def test_unknown_method_names_the_known_ones():
    with pytest.raises(MergeError, match="unknown merge method 'slerp': known methods are average, task_arithmetic"):
        get_method("slerp")
    with pytest.raises(MergeError, match="unknown merge method"):
        merge("slerp", BASE, [A])


def test_bad_parameters_name_the_method_and_the_field():
    with pytest.raises(MergeError, match=r"merge method 'ties': density: .*greater than 0"):
        merge("ties", BASE, [A], density=0)
    with pytest.raises(MergeError, match=r"'average': dens.*[Ee]xtra"):
        merge("average", BASE, [A], dens=0.3)
    with pytest.raises(MergeError, match="'task_arithmetic': weights"):
        merge("task_arithmetic", BASE, [A])  # no default weights
    with pytest.raises(MergeError, match="takes TiesParams, not DareParams"):
        get_method("ties").params(get_method("dare").params())
    with pytest.raises(MergeError, match="no genome form"):
        get_method("ties").merge_genomes([torch.ones(3)])
    # the linear methods (no sparsifying, no sign election) are the ones with a genome form
    assert {name for name, m in METHODS.items() if m.linear} == {"average", "task_arithmetic"}


#: Parameters for the registered methods that have no defaults for everything.
REQUIRED_PARAMS = {"task_arithmetic": {"weights": [0.6, 0.4]}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_merges_a_tiny_model(name, tiny_model):
    method = get_method(name)
    assert isinstance(method, MergeMethod) and method.name == name and method.label
    base = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    params = REQUIRED_PARAMS.get(name, {})
    merged = method.merge(base, experts, params)
    assert set(merged) == set(base)
    for k, b in base.items():
        assert merged[k].shape == b.shape and merged[k].dtype == b.dtype and torch.isfinite(merged[k]).all(), k
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # it moved
    for k, v in method.prepare(base, experts)(params).items():
        assert torch.equal(v, merged[k]), k
    tiny_model.load_state_dict(merged)  # a usable model


def test_linear_genome_merges_are_bit_identical_to_the_old_genome_arithmetic():
    # the report's average was sum(experts) / k and the search's task arithmetic sum(w_q * expert_q): on the
    # experts' one-hot genomes, both are exactly the registry's sum
    for k in range(1, 17):
        experts = [torch.zeros(3 * k) for _ in range(k)]
        for q, g in enumerate(experts):
            g[3 * q : 3 * q + 3] = 1.0
        assert torch.equal(get_method("average").merge_genomes(experts), sum(experts) / k)
        w = torch.rand(k, generator=torch.Generator().manual_seed(k)).mul(1.5).tolist()
        old = sum((float(wq) * g for wq, g in zip(w, experts, strict=True)), torch.zeros(3 * k))
        assert torch.equal(get_method("task_arithmetic").merge_genomes(experts, weights=w), old)


def test_crossover_and_the_aggregate_are_task_arithmetic_on_genomes():
    gen = torch.Generator().manual_seed(0)
    parents = [torch.randn(1001, generator=gen) for _ in range(3)]
    cfg = CrossoverConfig(mu=0.1, sigma=0.2)
    for seed in range(5):
        child, w = crossover(parents, cfg, torch.Generator().manual_seed(seed))
        old_child, old_w = _old_crossover(parents, cfg, torch.Generator().manual_seed(seed))
        assert w == old_w and torch.equal(child, old_child)

    from evolve.rundir import aggregate_genome

    archives = {s: SimpleNamespace(stats=SimpleNamespace(best_id=f"e{i}", best=q)) for i, (s, q) in
                enumerate([("code", 0.4), ("os", 0.9), ("db", 0.1)])}  # fmt: skip
    state = SimpleNamespace(archives=archives, genomes={f"e{i}": p for i, p in enumerate(parents)})
    genome, weights = aggregate_genome(state)
    w = torch.softmax(torch.tensor([0.4, 0.9, 0.1]), dim=0).tolist()
    old = torch.zeros_like(parents[0])
    for wi, p in zip(w, parents, strict=True):
        old.add_(p, alpha=wi)
    assert torch.equal(genome, old) and weights == {f"e{i}": wi for i, wi in enumerate(w)}

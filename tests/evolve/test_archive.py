from __future__ import annotations

import pytest

from evolve.archive import AddStatus, SkillArchive, default_ranges


def make() -> SkillArchive:
    return SkillArchive(quality="code", measures=["os", "db"], ranges=[(0.0, 1.0), (0.0, 1.0)], bins=10)


def test_batch_add_returns_a_status_per_item():
    a = make()
    statuses = a.add(
        ["a", "b", "c", "d"],
        [
            {"code": 0.5, "os": 0.31, "db": 0.72},
            {"code": 0.7, "os": 0.33, "db": 0.75},  # same cell as a, better
            {"code": 0.6, "os": 0.35, "db": 0.79},  # same cell, worse than b
            {"code": 0.1, "os": 0.95, "db": 0.05},  # another cell
        ],
    )
    assert statuses == [AddStatus.NEW, AddStatus.IMPROVE_EXISTING, AddStatus.NOT_ADDED, AddStatus.NEW]
    assert [e.id for e in a.elites()] == ["b", "d"]
    assert a.retrieve({"os": 0.3, "db": 0.7}).id == "b"
    assert a.retrieve({"os": 0.5, "db": 0.5}) is None


def test_stats():
    a = make()
    assert a.stats.num_elites == 0 and a.stats.best is None
    a.add(["a", "b"], [{"code": 0.5, "os": 0.1, "db": 0.1}, {"code": 0.9, "os": 0.9, "db": 0.9}])
    s = a.stats
    assert s.num_elites == 2 and s.coverage == pytest.approx(2 / 100)
    assert s.qd_score == pytest.approx(1.4) and s.best == 0.9 and s.best_id == "b"


def test_out_of_range_scores_land_in_edge_cells():
    a = make()
    assert a.index_of({"os": -3.0, "db": 7.0}) == (0, 9)
    assert a.index_of({"os": 1.0, "db": 0.0}) == (9, 0)


def test_round_trip():
    a = make()
    a.add(["x"], [{"code": 0.4, "os": 0.2, "db": 0.6}])
    b = SkillArchive.from_dict(a.to_dict())
    assert b.to_dict() == a.to_dict() and b.elites() == a.elites()


def test_bad_construction_and_input_explain_the_fix():
    with pytest.raises(ValueError, match="cannot also be a measure"):
        SkillArchive(quality="os", measures=["os"], ranges=[(0, 1)])
    with pytest.raises(ValueError, match="upper bound must exceed"):
        SkillArchive(quality="code", measures=["os"], ranges=[(1, 1)])
    with pytest.raises(KeyError, match="lack"):
        make().add(["a"], [{"code": 0.1}])


def test_default_ranges_follow_the_paper():
    experts = {"code": {"os": 0.5, "db": 0.4}, "os": {"os": 0.9, "db": 0.6}, "db": {"os": 0.6, "db": 0.8}}
    assert default_ranges(experts, ["os", "db"]) == [
        pytest.approx((0.85 * 0.5, 1.15 * 0.9)),
        pytest.approx((0.85 * 0.4, 1.15 * 0.8)),
    ]


def test_heatmap_png(tmp_path):
    from evolve.plots import heatmap

    a = make()
    a.add(["a", "b"], [{"code": 0.5, "os": 0.1, "db": 0.1}, {"code": 0.9, "os": 0.9, "db": 0.6}])
    path = heatmap(a, tmp_path / "m.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    one = SkillArchive(quality="code", measures=["os"], ranges=[(0, 1)])
    assert heatmap(one, tmp_path / "x.png") is None and not (tmp_path / "x.png").exists()

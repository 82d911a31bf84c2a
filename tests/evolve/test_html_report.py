"""The HTML report of a run, opened in headless Chromium: one map per archive, the curves, lineage, splits."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from evolve.cli import app
from evolve.html_report import ancestry, curves_from_history, reconstruct_curves, render_html, served_ids
from evolve.run import STATE_FILE, Evolution, RunState
from tests.chromium import Elements, dump_dom, needs_chromium, screenshot
from tests.evolve.minis import mini_evolve_config


def hashed_scores(self: Evolution, genome: torch.Tensor, split: str = "validation") -> dict[str, float]:
    """Scores from a hash of the genome, lower on the other splits than on validation.

    The miniature models score 0 on every skill, so a run over them never fills an archive beyond the experts;
    the page needs archives with many elites, children with parents and splits that differ. Everything else
    (operators, archives, history, the report's merges scored by the real engine) runs for real.
    """
    digest = hashlib.sha256(genome.numpy().tobytes()).digest()
    drop = 0.0 if split == "validation" else 0.15 * digest[15] / 255
    return {s: round(max(0.0, digest[i] / 255 - drop), 4) for i, s in enumerate(self.config.skills)}


@pytest.fixture(scope="module")
def reported_run(mini_models, tmp_path_factory):
    """A short run, then ``cycleqd-evolve report --html`` on it (every elite scored on test)."""
    tmp = tmp_path_factory.mktemp("html")
    run = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evolution, "score", hashed_scores)
        Evolution(run, mini_evolve_config(mini_models, children_per_generation=3)).run()
        result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp / "results"), "--html"])
    assert result.exit_code == 0, result.output
    assert "results.html" in result.output
    return run, tmp / "results.html"


def test_history_records_every_generation_and_ends_at_the_archives(reported_run):
    run, _ = reported_run
    st = RunState.load(run / STATE_FILE)
    assert sum(len(a) for a in st.archives.values()) > 6  # children entered
    assert [r["generation"] for r in st.history] == list(range(-1, st.generation))
    for skill, archive in st.archives.items():
        n, coverage, qd, best = st.history[-1]["archives"][skill]
        s = archive.stats
        assert (n, coverage, best) == (s.num_elites, s.coverage, s.best)
        assert qd == pytest.approx(s.qd_score)
    parents, born = ancestry(st)
    for eid, info in st.elites.items():  # every live elite's recorded parents are its lineage's
        assert parents[eid] == info["lineage"].get("parents", [])
        assert born[eid] == info["lineage"]["generation"]


def test_curves_without_history_are_a_lower_bound_reaching_the_final_archive(reported_run):
    run, _ = reported_run
    st = RunState.load(run / STATE_FILE)
    true = curves_from_history(st.history)
    st.history = []  # a run saved before the history record existed
    rebuilt = reconstruct_curves(st)
    for metric in ("coverage", "qd_score"):
        for skill in st.archives:
            t, r = dict(true[metric][skill]), dict(rebuilt[metric][skill])
            assert set(r) == set(t)
            assert all(r[x] <= t[x] + 1e-9 for x in t)
            assert r[max(r)] == pytest.approx(t[max(t)])  # at the end every survivor has been counted


def test_a_bad_served_manifest_is_refused_with_its_name(reported_run, tmp_path):
    run, _ = reported_run
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["report", str(run), "--html", "--served", str(bad), "--elites", "none"])
    assert result.exit_code == 2
    assert "manifest.json" in result.output and "not a readable serving manifest" in result.output


@needs_chromium
def test_the_report_renders_in_chromium(reported_run, tmp_path):
    run, page = reported_run
    st = RunState.load(run / STATE_FILE)
    report = json.loads((run / "report.json").read_text())
    url = page.resolve().as_uri()
    dom = dump_dom(url, tmp_path)
    els = Elements(dom)

    # the results table: a row per model plus the header
    assert len(els.select("table", "results")) == 1
    assert dom.count("<tr") >= len(report["rows"]) + 1

    # one elite map per archive, one cell per elite, each with its id
    maps = els.select("svg", "elite-map")
    assert sorted(m["data-archive"] for m in maps) == sorted(st.archives)
    cells = els.select("rect", "elite")
    assert len(cells) == sum(len(a) for a in st.archives.values())
    for skill, archive in st.archives.items():
        assert {m["data-elites"] for m in maps if m["data-archive"] == skill} == {str(len(archive))}
    assert {c["data-id"] for c in cells} == {e.id for a in st.archives.values() for e in a.elites()}
    child = next(e for e in st.elites if not e.startswith("expert:"))
    parents = ", ".join(st.elites[child]["lineage"]["parents"])
    assert f"parents: {parents}" in dom  # the hover text names the parents

    # pyribs' three curves, a line per archive, a point per generation (and the start)
    curves = els.select("svg", "curve")
    assert sorted(c["data-metric"] for c in curves) == ["best", "coverage", "qd_score"]
    lines = els.select("polyline", "series")
    assert len(lines) == 3 * len(st.archives)
    assert all(len(line["points"].split()) == st.generation + 1 for line in lines)

    # lineage: the best elites and their ancestors down to the experts
    nodes = {n["data-id"] for n in els.select("circle", "node")}
    best = {a.stats.best_id for a in st.archives.values()}
    assert best <= nodes
    assert {"expert:code", "expert:os", "expert:db"} & nodes
    assert len(els.select("line", "edge")) >= len(nodes - {e for e in nodes if e.startswith("expert:")})

    # validation vs test: one row per kept elite, one point per elite in the scatter
    assert len(els.select("tr", "elite-row")) == len(st.elites)
    assert len(els.select("svg", "scatter", data_split="test")) == 1
    assert len(els.select("circle", "point")) == len(st.elites)

    shot = screenshot(url, tmp_path / "report.png")
    assert shot.stat().st_size > 10_000


def test_served_elites_are_drawn_in_the_lineage(reported_run, tmp_path):
    run, _ = reported_run
    st = RunState.load(run / STATE_FILE)
    report = json.loads((run / "report.json").read_text())
    rows = {name: {k: (v, 0.0) for k, v in cells.items()} for name, cells in report["rows"].items()}
    served = sorted(e for e in st.elites if not e.startswith("expert:"))[-1]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format_version": 1, "elites": [{"id": served}]}))
    page = Elements(render_html([run], rows, served_ids(manifest)))
    assert served in {n["data-id"] for n in page.select("circle", "node")}
    assert served in {n["data-id"] for n in page.select("circle", "node", fill="#e6550d")}  # drawn as a focus

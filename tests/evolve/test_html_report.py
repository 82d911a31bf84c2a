"""The HTML report of a run, opened in headless Chromium: one map per archive, the curves, lineage, splits."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from evolve.cli import app
from evolve.html_report import render_html, served_ids
from evolve.report_data import ancestry, curves_from_history, reconstruct_curves
from evolve.run import Evolution
from evolve.rundir import STATE_FILE, RunState
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


def first_inside(els: Elements, tag: str, cls: str, child: str) -> list[dict[str, str]]:
    """For each ``tag.cls`` element in document order, the first ``child`` start tag after it (its first one)."""
    out = []
    for i, (t, a) in enumerate(els.found):
        if t == tag and cls in a.get("class", "").split():
            out.append(next(b for u, b in els.found[i + 1 :] if u == child))
    return out


def page_rows(run) -> dict:
    report = json.loads((run / "report.json").read_text())
    return {name: {k: (v, 0.0) for k, v in cells.items()} for name, cells in report["rows"].items()}


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

    # one elite map per archive (matplotlib's SVG, inline), one cell per elite, each with its id
    maps = els.select("svg", "elite-map")
    assert sorted(m["data-archive"] for m in maps) == sorted(st.archives)
    cells = els.select("g", "elite")
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
    lines = els.select("g", "series")
    assert len(lines) == 3 * len(st.archives)
    assert {line["data-archive"] for line in lines} == set(st.archives)
    assert all(line["data-points"] == str(st.generation + 1) for line in lines)
    for path in first_inside(els, "g", "series", "path"):  # the drawn line has a vertex per point
        assert len(re.findall(r"[ML]", path["d"])) == st.generation + 1

    # lineage: the best elites and their ancestors down to the experts
    nodes = {n["data-id"] for n in els.select("g", "node")}
    best = {a.stats.best_id for a in st.archives.values()}
    assert best <= nodes
    assert {"expert:code", "expert:os", "expert:db"} & nodes
    assert len(els.select("g", "edge")) >= len(nodes - {e for e in nodes if e.startswith("expert:")})

    # validation vs test: one row per kept elite, one point per elite in the scatter
    assert len(els.select("tr", "elite-row")) == len(st.elites)
    assert len(els.select("svg", "scatter", data_split="test")) == 1
    assert len(els.select("g", "point")) == len(st.elites)

    # self-contained: nothing fetched, and the charts' ids (clip paths, markers) never collide
    assert not re.search(r"""(?:src|href)=["'](?!#|data:)""", dom)
    ids = re.findall(r'\sid="([^"]+)"', dom)
    assert len(ids) == len(set(ids)) > 0

    shot = screenshot(url, tmp_path / "report.png")
    assert shot.stat().st_size > 10_000


def test_served_elites_are_drawn_in_the_lineage(reported_run, tmp_path):
    run, _ = reported_run
    st = RunState.load(run / STATE_FILE)
    served = sorted(e for e in st.elites if not e.startswith("expert:"))[-1]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format_version": 1, "elites": [{"id": served}]}))
    page = Elements(render_html([run], page_rows(run), served_ids(manifest)))
    assert served in {n["data-id"] for n in page.select("g", "node")}
    assert served in {n["data-id"] for n in page.select("g", "node", data_role="focus")}  # drawn as a focus


def test_the_page_is_the_same_for_the_same_run(reported_run):
    """Matplotlib's SVG with a fixed hash salt and no metadata: no date, no random id, byte for byte."""
    run, _ = reported_run
    first = render_html([run], page_rows(run))
    assert render_html([run], page_rows(run)) == first
    assert "<?xml" not in first and "<metadata" not in first and "<!DOCTYPE svg" not in first
    assert first.count("<svg") == len(Elements(first).select("svg"))  # every chart inline


def test_marks_get_class_data_and_title_and_labels_stay_as_they_are():
    from matplotlib.figure import Figure

    from evolve.plots import Marks, inline_svg

    fig = Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    (line,) = ax.plot([0, 1, 2], [1, 0, 1])
    marks = Marks()
    marks.tag(line, "series", 'a <b> & "c"', archive="x&y")
    ax.set_xlabel('label id="kept" url(#kept)')
    svg = inline_svg(fig, marks, cls="curve", data_metric="m")
    els = Elements(svg)
    assert len(els.select("svg", "curve", data_metric="m")) == 1
    (series,) = els.select("g", "series", data_archive="x&y")
    assert '<title>a &lt;b&gt; &amp; "c"</title>' in svg
    assert 'label id="kept" url(#kept)' in svg  # text is not rewritten, only tags
    prefix = series["id"].removesuffix("-mark0")
    assert prefix != series["id"] and all(a["id"].startswith(prefix) for _, a in els.found if "id" in a)
    assert all(ref.startswith(prefix) for ref in re.findall(r"url\(#([^)]+)\)", svg) if ref != "kept")


def test_episode_transcripts_from_report_json_are_shown(tmp_path):
    from evolve.html_report import transcripts_section

    assert transcripts_section(tmp_path) == ""  # no report.json: nothing, no error
    episode = {"item_id": "os/1/0", "score": 0.0, "status": "answered", "turns": 2, "error": "",
               "messages": [{"role": "user", "content": "Count <files>"}, {"role": "assistant", "content": "Act: finish"}]}  # fmt: skip
    kept = {"os": {"elite": "g3-1", "episodes": 12, "shown": [episode, {**episode, "item_id": "os/1/1", "score": 1.0}]}}
    (tmp_path / "report.json").write_text(json.dumps({"rows": {}, "transcripts": kept}))
    html = transcripts_section(tmp_path)
    assert "os: 2 of 12 episodes of g3-1" in html
    assert html.count("<details") == 2 and "os/1/0: failed" in html and "os/1/1: passed" in html
    assert "Count &lt;files&gt;" in html and "Act: finish" in html  # escaped, whole conversation

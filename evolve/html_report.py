"""``cycleqd-evolve report --html``: one self-contained HTML page per report, for reading a run with the eyes.

The page is laid out here from the data of ``evolve.report_data``, with the charts that ``evolve.plots`` draws
with matplotlib as inline SVG (no script, no external file, no network at view time), so the file can be mailed
or opened from a CI artifact. Hovering over any mark shows its title: an elite's id, scores and parents. Per
run directory the page holds:

- the results table (the same rows as the terminal table, on the test split);
- one elite map per archive: quality per cell over the other skills' validation scores (with more than two
  measures, each cell of the first two shows the best elite over the rest, and the caption says so);
- coverage, QD score and best quality per archive over generations (pyribs' standard curves), from the state's
  per-generation history, or reconstructed from the surviving elites for a run saved before that history
  existed (a lower bound, and the page says so);
- the lineage of the best elites (each archive's best, the best by mean validation score, and any served ids
  given) back to the experts, as a graph with one column per generation;
- validation vs calibration vs test per elite: a table with the mean of every split that the run recorded and
  a scatter of validation against each other split, where the winner's curse shows as points below the
  diagonal;
- a few episode transcripts of the best elite, where ``cycleqd-evolve report`` kept them in report.json.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cycleqd.atomic import write_text_atomic
from evolve import report_data as data
from evolve.archive import SkillArchive
from evolve.plots import curve_svg, elite_map_svg, lineage_svg, quality_range, scatter_svg
from evolve.rundir import STATE_FILE, RunError, RunState, load_run_config

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.best td { font-weight: bold; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 420px; }
svg g.elite:hover, svg g.node:hover, svg g.point:hover, svg g.series:hover { opacity: 0.6; }
.note { color: #8a5a00; font-size: 12px; }
details.episode { margin: 4px 0; border-left: 3px solid #ccc; padding-left: 8px; }
details.passed { border-color: #2a8a2a; } details.failed { border-color: #b33; }
.turn pre { white-space: pre-wrap; margin: 2px 0 6px; font-size: 12px; background: #f7f7f7; padding: 4px; }
.turn.assistant pre { background: #eef4ff; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


# -- the pieces ------------------------------------------------------------------------------------------------
def results_table(rows: Mapping[str, Mapping[str, Sequence[float]]], n_runs: int) -> str:
    """The report's rows (mean, std per column, as ``evolve.report.combine`` gives them) as an HTML table."""
    cols = list(next(iter(rows.values())))
    best = max(v["mean"][0] for v in rows.values())
    out = [f'<table class="results"><caption>Test accuracy (%), mean ± std over {n_runs} run(s)</caption><tr>']
    out += ["<th>model</th>", *(f"<th>{esc(c)}</th>" for c in cols), "</tr>"]
    for name, cells in rows.items():
        cls = ' class="best"' if cells["mean"][0] == best else ""
        texts = [f"{100 * m:.1f} ± {100 * s:.1f}" if n_runs > 1 else f"{100 * m:.1f}" for m, s in cells.values()]
        out.append(f"<tr{cls}><td>{esc(name)}</td>" + "".join(f'<td class="num">{t}</td>' for t in texts) + "</tr>")
    return "".join(out) + "</table>"


def elite_map(archive: SkillArchive, elites: Mapping[str, Any]) -> str:
    """One archive's map (``svg.elite-map``, a ``g.elite`` per shown cell) with its caption."""
    ms, st = archive.measures, archive.stats
    lo, hi = quality_range(data.map_cells(archive))
    extra = f"; cells show the best over {', '.join(ms[2:])}" if len(ms) > 2 else ""
    caption = (
        f"archive of <b>{esc(archive.quality)}</b>: {st.num_elites} elites, coverage {100 * st.coverage:.0f}%, "
        f"best {data.pct(st.best)} ({esc(st.best_id)}); colour = {esc(archive.quality)} validation score "
        f"{data.pct(lo)}–{data.pct(hi)}{extra}"
    )
    return f"<figure>{elite_map_svg(archive, elites)}<figcaption>{caption}</figcaption></figure>"


def splits_table(rows: Sequence[data.SplitRow], splits: Sequence[str], skills: Sequence[str]) -> str:
    """One row per live elite: where it sits, then each recorded split's per-skill scores and mean."""
    head = "".join(f'<th colspan="{len(skills) + 1}">{s}</th>' for s in splits)
    sub = "".join(f"<th>{esc(k)}</th>" for _ in splits for k in [*skills, "mean"])
    out = [
        f'<table class="splits"><tr><th rowspan="2">elite</th><th rowspan="2">archives</th>{head}</tr><tr>{sub}</tr>'
    ]
    for row in rows:
        cells = "".join(f'<td class="num">{data.pct(v)}</td>' for s in splits for v in row.scores[s])
        out.append(
            f'<tr class="elite-row" data-id="{esc(row.id)}"><td title="{esc(row.summary)}">{esc(row.id)}</td>'
            f"<td>{esc(', '.join(row.archives))}</td>{cells}</tr>"
        )
    return "".join(out) + "</table>"


def transcripts_section(run_dir: Path) -> str:
    """A few episodes of the best elite per episode skill, as ``cycleqd-evolve report`` kept them in report.json."""
    kept = data.transcripts(run_dir)
    if not kept:
        return ""
    out = ["<h3>Episode transcripts of the best elite (test split)</h3>"]
    for skill, entry in kept.items():
        shown = entry.get("shown", [])
        out.append(
            f"<h4>{esc(skill)}: {len(shown)} of {esc(entry.get('episodes'))} episodes of {esc(entry.get('elite'))}</h4>"
        )
        for t in shown:
            verdict = "passed" if t.get("score", 0) >= 1 else "failed"
            out.append(
                f"<details class='episode {verdict}'><summary>{esc(t.get('item_id'))}: {verdict} "
                f"(score {esc(t.get('score'))}, {esc(t.get('turns'))} turn(s), {esc(t.get('status'))})</summary>"
            )
            for m in t.get("messages", []):
                role = esc(m.get("role"))
                out.append(f"<div class='turn {role}'><b>{role}</b><pre>{esc(m.get('content'))}</pre></div>")
            if t.get("error"):
                out.append(f"<p class='note'>{esc(t['error'])}</p>")
            out.append("</details>")
    return "".join(out)


# -- the page --------------------------------------------------------------------------------------------------
def run_section(run_dir: Path, served: Iterable[str] = ()) -> str:
    cfg = load_run_config(run_dir)
    state = RunState.load(Path(run_dir) / STATE_FILE)
    out = [f'<section class="run" data-run="{esc(run_dir)}"><h2>Run {esc(run_dir)}</h2>']
    out.append(
        f"<p>{state.generation} generations, {cfg.children_per_generation} children each, {len(state.elites)} "
        f"elites kept, skills {esc(', '.join(cfg.skills))}, seed {cfg.seed}.</p>"
    )
    out.append("<h3>Elite maps</h3><div class='row'>")
    out += [elite_map(state.archives[s], state.elites) for s in cfg.skills if s in state.archives]
    out.append("</div><h3>Coverage, QD score and best quality over generations</h3>")
    curves, reconstructed = data.run_curves(state)
    if reconstructed:
        out.append(
            '<p class="note">This run was saved without per-generation history: the curves are reconstructed '
            "from the surviving elites' generations, a lower bound (replaced elites left no record).</p>"
        )
    out.append("<div class='row'>")
    out += [curve_svg(metric, label, curves[metric]) for metric, label, _ in data.CURVES]
    out.append("</div>")
    focus = data.focus_elites(state, served)
    out.append(
        "<h3>Lineage of the best elites back to the experts</h3><p>Orange: "
        f"{esc(', '.join(f'{v} ({k})' for k, v in focus.items()))}; blue: experts; hover a node for its scores.</p>"
    )
    out.append(lineage_svg(data.lineage(state, focus)))
    splits = data.splits_of(state.elites)
    out.append(f"<h3>Validation vs {' vs '.join(s for s in splits if s != 'validation') or 'other splits'}</h3>")
    if "test" not in splits:
        out.append(
            '<p class="note">No test scores stored yet: run cycleqd-evolve report RUN (--elites all or best).</p>'
        )
    out.append("<div class='row'>")
    out += [scatter_svg(data.split_points(state, s), s) for s in splits if s != "validation"]
    out.append("</div>")
    out.append(splits_table(data.split_rows(state, cfg.skills), splits, cfg.skills))
    out.append(transcripts_section(Path(run_dir)))
    return "".join(out) + "</section>"


def served_ids(manifest: Path) -> list[str]:
    """Elite ids in a serving manifest, read as plain JSON (evolve never imports serve)."""
    try:
        manifest_data = json.loads(Path(manifest).read_text())
        return [str(e["id"]) for e in manifest_data["elites"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(
            f"{manifest}: not a readable serving manifest ({type(exc).__name__}: {exc}); pass the manifest.json "
            "that cycleqd-serve wrote (field 'elites', each with an 'id')"
        ) from exc


def render_html(
    run_dirs: Sequence[Path], rows: Mapping[str, Mapping[str, Sequence[float]]], served: Iterable[str] = ()
) -> str:
    served = list(served)
    n = len(run_dirs)
    best_row = max(rows, key=lambda r: rows[r]["mean"][0])
    body = [
        "<h1>CycleQD report</h1>",
        f"<p>{n} run(s): {esc(', '.join(str(d) for d in run_dirs))}. Best row on test: <b>{esc(best_row)}</b>.</p>",
        "<h2>Results on the test split</h2>",
        results_table(rows, n),
        *(run_section(Path(d), served) for d in run_dirs),
    ]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>CycleQD report</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_html(
    path: Path,
    run_dirs: Sequence[Path],
    rows: Mapping[str, Mapping[str, Sequence[float]]],
    served: Iterable[str] = (),
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_html(run_dirs, rows, served))  # a reader never sees half a page
    return path

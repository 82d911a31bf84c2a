"""``cycleqd-evolve report --html``: one self-contained HTML page per report, for reading a run with the eyes.

Everything is drawn here as inline SVG (no script, no chart library, no network at view time), so the file can be
mailed or opened from a CI artifact. Hovering over any mark shows its ``<title>``: an elite's id, scores and
parents. Per run directory the page holds:

- the results table (the same rows as the terminal table, on the test split);
- one elite map per archive: quality per cell over the other skills' validation scores (with more than two
  measures, each cell of the first two shows the best elite over the rest, and the caption says so);
- coverage, QD score and best quality per archive over generations (pyribs' standard curves), read from the
  state's ``history`` (one record per generation, written since the history record was added to the run
  state). A run saved before that has no history: its curves are *reconstructed* from the surviving elites'
  generation numbers, which is a lower bound (a replaced elite left no record), and the page says so;
- the lineage of the best elites (each archive's best, the best by mean validation score, and any served ids
  given) back to the experts, as a graph with one column per generation; parents come from the history's
  record of every child that entered an archive, so ancestors that were later replaced still appear;
- validation vs calibration vs test per elite: a table with the mean of every split that the run recorded
  (calibration appears once runs record it) and a scatter of validation against each other split, where the
  winner's curse shows as points below the diagonal.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evolve.archive import SkillArchive
from evolve.run import STATE_FILE, RunError, RunState, best_mean_elite, load_run_config, mean_score

SPLIT_ORDER = ("validation", "calibration", "test")
CURVES = (("coverage", "coverage (%)", 1), ("qd_score", "QD score", 2), ("best", "best quality (%)", 3))
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.best td { font-weight: bold; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 420px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .elite:hover, svg .node:hover, svg .point:hover { stroke: #000; stroke-width: 2; }
.note { color: #8a5a00; font-size: 12px; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def viridis(t: float) -> str:
    """A colour for ``t`` in [0, 1] from matplotlib's viridis (the paper's figures use it too)."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps["viridis"](min(1.0, max(0.0, t)))
    return f"#{int(255 * r):02x}{int(255 * g):02x}{int(255 * b):02x}"


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


def elite_tooltip(eid: str, elites: Mapping[str, Any], archive: SkillArchive | None = None) -> str:
    info = elites.get(eid, {})
    lines = [eid]
    if archive is not None:
        lines.append(f"archive {archive.quality}")
    for split in SPLIT_ORDER:
        if split in info:
            lines.append(f"{split}: " + ", ".join(f"{k} {pct(v)}" for k, v in info[split].items()))
    lin = info.get("lineage", {})
    if lin.get("parents"):
        lines.append(f"parents: {', '.join(lin['parents'])} (generation {lin.get('generation')})")
    elif "expert" in lin:
        lines.append(f"expert for {lin['expert']}")
    return "\n".join(lines)


def elite_map(archive: SkillArchive, elites: Mapping[str, Any]) -> str:
    """One archive as an SVG grid: colour = quality, one ``rect.elite`` per occupied cell, hover for the elite."""
    bins, ms = archive.bins, archive.measures
    ny = bins if len(ms) >= 2 else 1
    size = max(4, 240 // bins)
    left, top, w, h = 64, 12, size * bins, size * ny
    shown: dict[tuple[int, int], Any] = {}
    for e in archive.elites():  # more than two measures: the best over the others in each (m0, m1) cell
        key = (e.cell[0], e.cell[1] if len(ms) >= 2 else 0)
        if key not in shown or e.quality > shown[key].quality:
            shown[key] = e
    qs = [e.quality for e in shown.values()]
    lo, hi = (min(qs), max(qs)) if qs else (0.0, 1.0)
    span = hi - lo or 1.0
    st = archive.stats
    parts = [
        f'<svg class="elite-map" data-archive="{esc(archive.quality)}" data-elites="{len(shown)}" '
        f'width="{left + w + 70}" height="{top + h + 46}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#f4f4f4" stroke="#999"/>',
    ]
    for (cx, cy), e in sorted(shown.items()):
        x, y = left + cx * size, top + (ny - 1 - cy) * size
        tip = elite_tooltip(e.id, elites, archive)
        parts.append(
            f'<rect class="elite" data-id="{esc(e.id)}" x="{x}" y="{y}" width="{size}" height="{size}" '
            f'fill="{viridis((e.quality - lo) / span)}"><title>{esc(tip)}</title></rect>'
        )
    (x_lo, x_hi), *rest = archive.ranges
    parts.append(f'<text x="{left}" y="{top + h + 14}">{pct(x_lo)}</text>')
    parts.append(f'<text x="{left + w}" y="{top + h + 14}" text-anchor="end">{pct(x_hi)}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{top + h + 32}" text-anchor="middle">{esc(ms[0])} validation (%)</text>')
    if len(ms) >= 2:
        y_lo, y_hi = rest[0]
        parts.append(f'<text x="{left - 4}" y="{top + h}" text-anchor="end">{pct(y_lo)}</text>')
        parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{pct(y_hi)}</text>')
        parts.append(
            f'<text transform="translate({left - 40},{top + h / 2}) rotate(-90)" text-anchor="middle">'
            f"{esc(ms[1])} validation (%)</text>"
        )
    bar_x = left + w + 14
    for i in range(20):  # the colour bar, top = best
        parts.append(
            f'<rect x="{bar_x}" y="{top + i * h / 20}" width="10" height="{h / 20 + 0.5}" '
            f'fill="{viridis(1 - i / 19)}"/>'
        )
    parts.append(f'<text x="{bar_x + 14}" y="{top + 9}">{pct(hi)}</text>')
    parts.append(f'<text x="{bar_x + 14}" y="{top + h}">{pct(lo)}</text>')
    parts.append("</svg>")
    extra = f"; cells show the best over {', '.join(ms[2:])}" if len(ms) > 2 else ""
    caption = (
        f"archive of <b>{esc(archive.quality)}</b>: {st.num_elites} elites, coverage {100 * st.coverage:.0f}%, "
        f"best {pct(st.best)} ({esc(st.best_id)}); colour = {esc(archive.quality)} validation score "
        f"{pct(lo)}–{pct(hi)}{extra}"
    )
    return f"<figure>{''.join(parts)}<figcaption>{caption}</figcaption></figure>"


def curves_from_history(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {archive: [(generations done, value)]}} from the state's per-generation records."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {m: {} for m, _, _ in CURVES}
    for rec in history:
        x = rec["generation"] + 1
        for skill, values in rec["archives"].items():
            for metric, _, index in CURVES:
                if values[index] is not None:
                    out[metric].setdefault(skill, []).append((x, float(values[index])))
    return out


def reconstruct_curves(state: RunState) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """For a run saved without history: curves of the surviving elites only, by the generation each entered.

    A lower bound on the true curves: an elite that was later replaced in its cell left no record.
    """
    out: dict[str, dict[str, list[tuple[int, float]]]] = {m: {} for m, _, _ in CURVES}
    for skill, a in state.archives.items():
        born = [(state.elites.get(e.id, {}).get("lineage", {}).get("generation", -1), e.quality) for e in a.elites()]
        cells = a.bins ** len(a.measures)
        for x in range(state.generation + 1):
            qs = [q for g, q in born if g + 1 <= x]
            out["coverage"].setdefault(skill, []).append((x, len(qs) / cells))
            out["qd_score"].setdefault(skill, []).append((x, sum(qs)))
            if qs:
                out["best"].setdefault(skill, []).append((x, max(qs)))
    return out


def line_chart(metric: str, label: str, series: Mapping[str, list[tuple[int, float]]]) -> str:
    """One pyribs-style curve chart: a ``polyline.series`` per archive over generations."""
    left, top, w, h = 48, 10, 300, 170
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    scale = 1.0 if metric == "qd_score" else 100.0
    ys = [scale * y for pts in series.values() for _, y in pts] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0

    def px(x: float, y: float) -> str:
        return f"{left + (x - x0) / (x1 - x0) * w:.1f},{top + h - (y - y0) / (y1 - y0) * h:.1f}"

    parts = [
        f'<svg class="curve" data-metric="{metric}" width="{left + w + 100}" height="{top + h + 36}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{left - 4}" y="{top + h}" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{left}" y="{top + h + 14}">{x0}</text>',
        f'<text x="{left + w}" y="{top + h + 14}" text-anchor="end">{x1}</text>',
        f'<text x="{left + w / 2}" y="{top + h + 30}" text-anchor="middle">generations · {esc(label)}</text>',
    ]
    for i, (skill, pts) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        tip = f"{skill}: " + ", ".join(f"g{x} {scale * y:.3g}" for x, y in pts[-8:])
        parts.append(
            f'<polyline class="series" data-archive="{esc(skill)}" fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(px(x, scale * y) for x, y in pts)}"><title>{esc(tip)}</title></polyline>'
        )
        parts.append(f'<text x="{left + w + 8}" y="{top + 12 + 14 * i}" style="fill:{colour}">{esc(skill)}</text>')
    return "".join(parts) + "</svg>"


def ancestry(state: RunState) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Parents and generation of every elite that ever entered an archive (as far as the state recorded)."""
    parents: dict[str, list[str]] = {}
    born: dict[str, int] = {}
    for rec in state.history:
        for eid, ps in rec.get("entered", {}).items():
            parents[eid], born[eid] = list(ps), rec["generation"]
    for eid, info in state.elites.items():
        lin = info.get("lineage", {})
        parents.setdefault(eid, list(lin.get("parents", [])))
        born.setdefault(eid, lin.get("generation", -1))
    return parents, born


def id_generation(eid: str) -> int | None:
    m = re.fullmatch(r"g(\d+)c\d+", eid)
    return int(m.group(1)) if m else None


def lineage_graph(state: RunState, focus: Mapping[str, str]) -> str:
    """The focus elites and all their recorded ancestors, one column per generation, experts on the left."""
    parents, born = ancestry(state)
    nodes: set[str] = set()
    todo = list(focus)
    while todo:
        eid = todo.pop()
        if eid in nodes:
            continue
        nodes.add(eid)
        todo += parents.get(eid, [])

    def gen(eid: str) -> int:
        if eid in born:
            return born[eid]
        g = id_generation(eid)
        return -1 if g is None else g

    columns: dict[int, list[str]] = {}
    for eid in sorted(nodes):
        columns.setdefault(gen(eid), []).append(eid)
    order = sorted(columns)
    col_w, row_h, left, top = 74, 26, 30, 24
    height = top + row_h * max(len(c) for c in columns.values()) + 20 if columns else 60
    width = left + col_w * max(1, len(order)) + 120
    pos = {eid: (left + col_w * order.index(g), top + row_h * i) for g in order for i, eid in enumerate(columns[g])}
    parts = [
        f'<svg class="lineage" data-nodes="{len(nodes)}" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    for g in order:
        x = pos[columns[g][0]][0]
        parts.append(f'<text x="{x}" y="12" text-anchor="middle">{"experts" if g < 0 else f"g{g}"}</text>')
    edges = 0
    for eid in sorted(nodes):
        for p in parents.get(eid, []):
            (x1, y1), (x2, y2) = pos[p], pos[eid]
            parts.append(
                f'<line class="edge" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#aaa">'
                f"<title>{esc(p)} → {esc(eid)}</title></line>"
            )
            edges += 1
    for eid in sorted(nodes):
        x, y = pos[eid]
        known = eid in state.elites or eid in born
        colour = "#e6550d" if eid in focus else ("#3182bd" if eid.startswith("expert:") else "#9ecae1")
        tip = elite_tooltip(eid, state.elites) if eid in state.elites else f"{eid}\n(replaced in its cell later)"
        if not known:
            tip = f"{eid}\n(no record: the run predates lineage history)"
        dash = "" if known else ' stroke-dasharray="2,2"'
        label = focus.get(eid, eid.removeprefix("expert:") if eid.startswith("expert:") else "")
        parts.append(
            f'<circle class="node" data-id="{esc(eid)}" cx="{x}" cy="{y}" r="7" fill="{colour}" '
            f'stroke="#555"{dash}><title>{esc(tip)}</title></circle>'
        )
        if label:
            parts.append(f'<text x="{x + 10}" y="{y + 4}">{esc(label)}</text>')
    return "".join(parts) + "</svg>"


def splits_of(elites: Mapping[str, Any]) -> list[str]:
    present = {s for info in elites.values() for s in SPLIT_ORDER if s in info}
    return [s for s in SPLIT_ORDER if s in present]


def splits_table(state: RunState, skills: Sequence[str]) -> str:
    """One row per live elite: where it sits, then each recorded split's per-skill scores and mean."""
    splits = splits_of(state.elites)
    holds: dict[str, list[str]] = {}
    for s, a in state.archives.items():
        for e in a.elites():
            holds.setdefault(e.id, []).append(s)
    head = "".join(f'<th colspan="{len(skills) + 1}">{s}</th>' for s in splits)
    sub = "".join(f"<th>{esc(k)}</th>" for _ in splits for k in [*skills, "mean"])
    out = [
        f'<table class="splits"><tr><th rowspan="2">elite</th><th rowspan="2">archives</th>{head}</tr><tr>{sub}</tr>'
    ]
    for eid in sorted(state.elites, key=lambda e: -mean_score(state.elites[e]["validation"])):
        info = state.elites[eid]
        cells = []
        for split in splits:
            scores = info.get(split)
            vals = [scores.get(k) if scores else None for k in skills]
            vals.append(mean_score(scores) if scores else None)
            cells += [f'<td class="num">{pct(v)}</td>' for v in vals]
        out.append(
            f'<tr class="elite-row" data-id="{esc(eid)}"><td title="{esc(elite_tooltip(eid, state.elites))}">'
            f"{esc(eid)}</td><td>{esc(', '.join(holds.get(eid, [])))}</td>{''.join(cells)}</tr>"
        )
    return "".join(out) + "</table>"


def split_scatter(state: RunState, other: str) -> str:
    """Mean validation score against the mean on ``other`` per elite, with the diagonal."""
    pts = [
        (eid, mean_score(i["validation"]), mean_score(i[other]))
        for eid, i in sorted(state.elites.items())
        if other in i
    ]
    left, top, side = 44, 10, 220
    vals = [v for _, a, b in pts for v in (a, b)] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 0.05
    lo, hi = lo - pad, hi + pad

    def p(v: float, vertical: bool) -> float:
        t = (v - lo) / (hi - lo)
        return top + side - t * side if vertical else left + t * side

    parts = [
        f'<svg class="scatter" data-split="{other}" width="{left + side + 20}" height="{top + side + 36}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{side}" height="{side}" fill="none" stroke="#999"/>',
        f'<line x1="{left}" y1="{top + side}" x2="{left + side}" y2="{top}" stroke="#ccc" stroke-dasharray="4,3"/>',
        f'<text x="{left}" y="{top + side + 14}">{pct(lo)}</text>',
        f'<text x="{left + side}" y="{top + side + 14}" text-anchor="end">{pct(hi)}</text>',
        f'<text x="{left + side / 2}" y="{top + side + 30}" text-anchor="middle">mean validation (%)</text>',
        f'<text transform="translate({left - 30},{top + side / 2}) rotate(-90)" text-anchor="middle">'
        f"mean {other} (%)</text>",
    ]
    for eid, a, b in pts:
        colour = "#3182bd" if eid.startswith("expert:") else "#e6550d"
        parts.append(
            f'<circle class="point" data-id="{esc(eid)}" cx="{p(a, False):.1f}" cy="{p(b, True):.1f}" r="4" '
            f'fill="{colour}" fill-opacity="0.8"><title>{esc(eid)}: validation {pct(a)}, {other} {pct(b)}'
            "</title></circle>"
        )
    return "".join(parts) + "</svg>"


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
    if state.history:
        curves = curves_from_history(state.history)
    else:
        curves = reconstruct_curves(state)
        out.append(
            '<p class="note">This run was saved without per-generation history: the curves are reconstructed '
            "from the surviving elites' generations, a lower bound (replaced elites left no record).</p>"
        )
    out.append("<div class='row'>")
    out += [line_chart(metric, label, curves[metric]) for metric, label, _ in CURVES]
    out.append("</div>")
    focus: dict[str, str] = {}
    for s, a in state.archives.items():
        if a.stats.best_id:
            focus.setdefault(a.stats.best_id, f"best {s}")
    focus.setdefault(best_mean_elite(state), "best mean")
    for eid in served:
        if eid in state.elites:
            focus[eid] = f"served {focus.get(eid, '')}".strip()
    out.append(
        "<h3>Lineage of the best elites back to the experts</h3><p>Orange: "
        f"{esc(', '.join(f'{v} ({k})' for k, v in focus.items()))}; blue: experts; hover a node for its scores.</p>"
    )
    out.append(lineage_graph(state, focus))
    splits = splits_of(state.elites)
    out.append(f"<h3>Validation vs {' vs '.join(s for s in splits if s != 'validation') or 'other splits'}</h3>")
    if "test" not in splits:
        out.append(
            '<p class="note">No test scores stored yet: run cycleqd-evolve report RUN (--elites all or best).</p>'
        )
    out.append("<div class='row'>")
    out += [split_scatter(state, s) for s in splits if s != "validation"]
    out.append("</div>")
    out.append(splits_table(state, cfg.skills))
    return "".join(out) + "</section>"


def served_ids(manifest: Path) -> list[str]:
    """Elite ids in a serving manifest, read as plain JSON (evolve never imports serve)."""
    try:
        data = json.loads(Path(manifest).read_text())
        return [str(e["id"]) for e in data["elites"]]
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(run_dirs, rows, served))
    tmp.replace(path)  # a reader never sees half a page
    return path

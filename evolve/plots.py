"""A run's charts, drawn with matplotlib: elite maps (PNG files like the paper's figures, or inline SVG), and for
the HTML page the curves over generations, the lineage graph and the split scatters as inline SVG.

The data comes from ``evolve.report_data``; this module only draws. The SVG is matplotlib's own
(``savefig(format="svg")``, text kept as text), made deterministic (a fixed ``svg.hashsalt``, no metadata, no
date) and touched in four ways so that it can sit inline in a page next to others:

- the XML prolog goes, and the root ``<svg>`` gets a class and ``data-`` attributes (what the chart shows);
- every id gets a prefix from a hash of the figure, so two charts on one page never share an id;
- each mark (an elite's cell, a curve, a lineage node or edge, a scatter point) is an artist drawn with a
  ``gid``; its ``<g>`` gets a class, ``data-`` attributes (the elite's id) and a ``<title>``, the text a
  browser shows on hover;
- the whitespace between tags (matplotlib's indentation) goes.
"""

from __future__ import annotations

import hashlib
import html
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from evolve.archive import Elite, SkillArchive
from evolve.report_data import Lineage, elite_summary, map_cells, pct

STYLE = {
    "svg.hashsalt": "cycleqd",  # ids from a hash of the content, not of a random salt: the same run, the same file
    "svg.fonttype": "none",  # text as <text>, not as glyph paths
    "path.simplify": False,  # every point of a curve stays a vertex
    "text.parse_math": False,  # a '$' in a skill name is a dollar
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9,
}
NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
NODE_COLOURS = {"focus": "#e6550d", "expert": "#3182bd", "ancestor": "#9ecae1"}


def _figure(figsize: tuple[float, float], layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _attrs(attrs: Mapping[str, Any]) -> str:
    return "".join(f' {k.replace("_", "-")}="{html.escape(str(v), quote=True)}"' for k, v in attrs.items())


class Marks:
    """Artists that become hover marks: each gets a ``gid`` now, and its ``<g>`` a class, data and title later."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[str, str]] = {}

    def tag(self, artist: Artist, cls: str, title: str, **data: Any) -> None:
        gid = f"mark{len(self.marks)}"
        artist.set_gid(gid)
        attrs = _attrs({"class": cls, **{f"data_{k}": v for k, v in data.items()}})
        self.marks[gid] = (attrs, f"<title>{html.escape(title, quote=False)}</title>")


def inline_svg(fig: Figure, marks: Marks | None = None, **root: Any) -> str:
    """The figure as an ``<svg>`` element for an HTML page: ``root`` are the element's attributes (``cls`` is
    ``class``, ``data_x`` is ``data-x``), ids are prefixed to be unique on the page, marks get their attributes."""
    with mpl.rc_context(STYLE):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata=NO_METADATA)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    prefix = "c" + hashlib.sha256(text.encode()).hexdigest()[:8]
    tagged = marks.marks if marks else {}

    def tag(m: re.Match[str]) -> str:  # only inside tags: a label's text is left as it is
        t = m.group(0)
        t = re.sub(r'(?<=\s)id="', f'id="{prefix}-', t)
        t = t.replace("url(#", f"url(#{prefix}-").replace('href="#', f'href="#{prefix}-')
        gid = re.fullmatch(r'<g id="[^"-]+-(mark\d+)">', t)
        if gid and gid.group(1) in tagged:
            attrs, title = tagged[gid.group(1)]
            t = f"{t[:-1]}{attrs}>{title}"
        return t

    text = re.sub(r">\s+<", "><", re.sub(r"<[^>]+>", tag, text))  # matplotlib's indentation goes too
    attrs = _attrs({("class" if k == "cls" else k): v for k, v in root.items()})
    return text.replace("<svg ", f"<svg{attrs} ", 1).rstrip() + "\n"


# -- elite maps ------------------------------------------------------------------------------------------------
def quality_range(cells: Mapping[Any, Elite]) -> tuple[float, float]:
    qs = [e.quality for e in cells.values()]
    return (min(qs), max(qs)) if qs else (0.0, 1.0)


def elite_map_figure(archive: SkillArchive, title: str | None = None) -> tuple[Figure, list[tuple[Rectangle, Elite]]]:
    """One archive as a grid over the first two measures (one row with one measure), colour = quality; with
    more than two measures each cell shows the best elite over the rest. Returns the figure and each cell's
    patch with its elite."""
    cells = map_cells(archive)
    lo, hi = quality_range(cells)
    ms, bins = archive.measures, archive.bins
    (x_lo, x_hi), *rest = [(100 * a, 100 * b) for a, b in archive.ranges]
    y_lo, y_hi = rest[0] if rest else (0.0, 1.0)
    w, h = (x_hi - x_lo) / bins, (y_hi - y_lo) / (bins if rest else 1)
    norm, cmap = Normalize(100 * lo, 100 * hi), colormaps["viridis"]
    with mpl.rc_context(STYLE):
        fig = _figure((4.2, 3.5 if rest else 1.6))
        ax = fig.add_subplot()
        ax.set_facecolor("#f4f4f4")
        drawn = []
        for (cx, cy), e in cells.items():
            patch = Rectangle((x_lo + cx * w, y_lo + cy * h), w, h, facecolor=cmap(norm(100 * e.quality)))
            ax.add_patch(patch)
            drawn.append((patch, e))
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel(f"{ms[0]} validation score (%)")
        if rest:
            ax.set_ylabel(f"{ms[1]} validation score (%)")
        else:
            ax.set_yticks([])
        fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label=f"{archive.quality} validation score (%)")
        if title:
            ax.set_title(title)
    return fig, drawn


def elite_map_svg(archive: SkillArchive, elites: Mapping[str, Any]) -> str:
    """The elite map for the page: ``svg.elite-map`` with ``data-archive``, one ``g.elite`` per shown cell with
    ``data-id`` and the elite's scores and parents as its hover text."""
    fig, drawn = elite_map_figure(archive)
    marks = Marks()
    for patch, e in drawn:
        marks.tag(patch, "elite", elite_summary(e.id, elites, archive.quality), id=e.id)
    return inline_svg(fig, marks, cls="elite-map", data_archive=archive.quality, data_elites=len(drawn))


def heatmap(archive: SkillArchive, path: Path) -> Path | None:
    """Write ``path`` (PNG) for an archive with two measures; archives of other shapes are skipped (None)."""
    if len(archive.measures) != 2:
        return None
    st = archive.stats
    fig, _ = elite_map_figure(
        archive, f"archive of {archive.quality}: {st.num_elites} elites, coverage {100 * st.coverage:.0f}%"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context(STYLE):
        fig.savefig(path, dpi=110)
    return path


def heatmaps(archives: dict[str, SkillArchive], directory: Path) -> list[Path]:
    return [p for s, a in archives.items() if (p := heatmap(a, directory / f"archive-{s}.png")) is not None]


# -- curves, lineage, splits -----------------------------------------------------------------------------------
def curve_svg(metric: str, label: str, series: Mapping[str, Sequence[tuple[int, float]]]) -> str:
    """One pyribs-style chart: ``svg.curve`` with ``data-metric``, a ``g.series`` per archive over generations
    (``data-archive``, ``data-points``), its last values as hover text."""
    scale = 1.0 if metric == "qd_score" else 100.0
    marks = Marks()
    with mpl.rc_context(STYLE):
        fig = _figure((4.4, 2.7))
        ax = fig.add_subplot()
        for i, (skill, pts) in enumerate(sorted(series.items())):
            xs, ys = [x for x, _ in pts], [scale * y for _, y in pts]
            (line,) = ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], linewidth=2, label=skill)
            tip = f"{skill}: " + ", ".join(f"g{x} {y:.3g}" for x, y in zip(xs[-8:], ys[-8:], strict=True))
            marks.tag(line, "series", tip, archive=skill, points=len(pts))
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generations")
        ax.set_ylabel(label)
        if series:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return inline_svg(fig, marks, cls="curve", data_metric=metric)


def lineage_svg(graph: Lineage) -> str:
    """The lineage graph: one column per generation (experts on the left), ``svg.lineage``; a ``g.node`` per
    elite (``data-id``, ``data-role``: focus, expert or ancestor) and a ``g.edge`` per parent link."""
    columns: dict[int, list[str]] = {}
    for n in graph.nodes:
        columns.setdefault(n.generation, []).append(n.id)
    order = sorted(columns)
    pos = {eid: (order.index(g), row) for g in order for row, eid in enumerate(columns[g])}
    n_cols, n_rows = max(1, len(order)), max((len(c) for c in columns.values()), default=1)
    marks = Marks()
    with mpl.rc_context(STYLE):
        fig = _figure((1.0 * n_cols + 1.4, 0.34 * n_rows + 0.45), layout=None)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        ax.set_xlim(-0.45, n_cols - 0.55 + 1.4)  # a column is an inch wide: labels get the last 1.4 inches
        ax.set_ylim(n_rows - 0.4, -1.2)
        for i, g in enumerate(order):
            ax.text(i, -0.8, "experts" if g < 0 else f"g{g}", ha="center", va="center")
        for parent, child in graph.edges:
            (x1, y1), (x2, y2) = pos[parent], pos[child]
            (edge,) = ax.plot([x1, x2], [y1, y2], color="#aaa", linewidth=1, zorder=1)
            marks.tag(edge, "edge", f"{parent} → {child}", parent=parent, child=child)
        for n in graph.nodes:
            x, y = pos[n.id]
            colour = NODE_COLOURS[n.role]
            (node,) = ax.plot(
                [x], [y], "o", markersize=11, markerfacecolor=colour if n.known else "white",
                markeredgecolor=colour if not n.known else "#555", zorder=2,
            )  # fmt: skip
            marks.tag(node, "node", n.summary, id=n.id, role=n.role)
            if n.label:
                ax.text(x + 0.15, y, n.label, va="center")
    return inline_svg(fig, marks, cls="lineage", data_nodes=len(graph.nodes))


def scatter_svg(points: Sequence[tuple[str, float, float]], other: str) -> str:
    """Mean validation score against the mean on ``other`` per elite, with the diagonal: ``svg.scatter`` with
    ``data-split``, a ``g.point`` per elite (``data-id``); points below the diagonal did worse than validated."""
    vals = [100 * v for _, a, b in points for v in (a, b)] or [0.0, 100.0]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 5.0
    lo, hi = lo - pad, hi + pad
    marks = Marks()
    with mpl.rc_context(STYLE):
        fig = _figure((3.4, 3.3))
        ax = fig.add_subplot()
        ax.plot([lo, hi], [lo, hi], color="#bbb", linewidth=1, linestyle=(0, (4, 3)), zorder=1)
        for eid, a, b in points:
            colour = NODE_COLOURS["expert" if eid.startswith("expert:") else "focus"]
            (point,) = ax.plot([100 * a], [100 * b], "o", markersize=6, color=colour, alpha=0.8, markeredgewidth=0)
            marks.tag(point, "point", f"{eid}: validation {pct(a)}, {other} {pct(b)}", id=eid)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("mean validation (%)")
        ax.set_ylabel(f"mean {other} (%)")
    return inline_svg(fig, marks, cls="scatter", data_split=other)

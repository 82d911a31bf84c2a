"""Elite maps: one heatmap per archive, like the paper's figures (quality per cell over two measures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evolve.archive import SkillArchive


def heatmap(archive: SkillArchive, path: Path) -> Path | None:
    """Write ``path`` (PNG) for an archive with two measures; archives of other shapes are skipped (None)."""
    if len(archive.measures) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((archive.bins, archive.bins), np.nan)
    for e in archive.elites():
        grid[e.cell[1], e.cell[0]] = 100 * e.quality
    (x_lo, x_hi), (y_lo, y_hi) = archive.ranges
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=110)
    image = ax.imshow(
        grid, origin="lower", extent=(100 * x_lo, 100 * x_hi, 100 * y_lo, 100 * y_hi), aspect="auto", cmap="viridis"
    )
    fig.colorbar(image, ax=ax, label=f"{archive.quality} validation score (%)")
    ax.set_xlabel(f"{archive.measures[0]} validation score (%)")
    ax.set_ylabel(f"{archive.measures[1]} validation score (%)")
    st = archive.stats
    ax.set_title(f"archive of {archive.quality}: {st.num_elites} elites, coverage {100 * st.coverage:.0f}%")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmaps(archives: dict[str, SkillArchive], directory: Path) -> list[Path]:
    return [p for s, a in archives.items() if (p := heatmap(a, directory / f"archive-{s}.png")) is not None]

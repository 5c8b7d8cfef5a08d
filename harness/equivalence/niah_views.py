"""Needle in a haystack views: the accuracy grid of harness.equivalence.niah's cell scores as a
markdown table and a gkamradt-style heatmap (PNG) the run writes beside its report.
"""

from __future__ import annotations

from pathlib import Path

from harness.equivalence.niah import accuracy


def accuracy_grid(scores, lengths, depths) -> list[list[float]]:
    """[depth][length] mean accuracy over needles (NaN where a cell was not run)."""
    return [[accuracy(s for s in scores if s.length == n and s.depth == d) for n in lengths] for d in depths]


def markdown_table(scores, lengths, depths) -> str:
    grid = accuracy_grid(scores, lengths, depths)
    lines = ["| depth \\ context | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for d, row in zip(depths, grid):
        lines.append(f"| {d:g} % | " + " | ".join("" if v != v else f"{v:.0%}" for v in row) + " |")
    per_length = [accuracy(s for s in scores if s.length == n) for n in lengths]
    lines.append("| **all depths** | " + " | ".join("" if v != v else f"**{v:.0%}**" for v in per_length) + " |")
    return "\n".join(lines) + "\n"


def niah_heatmap(matrix, lengths, depths, title: str | None = None):
    """The heatmap (gkamradt's layout: depth rows, context-length columns, red 0 % to green 100 %, each
    cell labelled; NaN cells blank) as a matplotlib Figure: the suite's PNG and the HTML report's plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.0 * len(lengths), 1.2 + 0.5 * len(depths)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    image = ax.imshow(matrix, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g} %" for d in depths])
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="retrieval accuracy")
    return fig


def render_heatmap(scores, lengths, depths, path: Path, title: str) -> Path:
    """The grid's heatmap saved as a PNG beside the report."""
    fig = niah_heatmap(accuracy_grid(scores, lengths, depths), lengths, depths, title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

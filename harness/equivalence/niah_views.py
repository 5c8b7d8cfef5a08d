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


def render_heatmap(scores, lengths, depths, path: Path, title: str) -> Path:
    """The grid as the report's heatmap (harness.reporting.html_view.niah_heatmap), saved as a PNG."""
    from harness.reporting.html_view import niah_heatmap

    fig = niah_heatmap(accuracy_grid(scores, lengths, depths), lengths, depths, title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

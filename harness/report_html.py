"""report.html: the same content as report.md, plus plots, in one self-contained file.

The Markdown report is converted (tables, lists, headings, code spans), so the two never drift
apart; plots are drawn with matplotlib's Agg canvas (no display, no global backend switch) and
embedded as base64 PNGs, so the file can be mailed or attached to a CI run on its own.

Plots, from the run's data:
- peak memory vs sequence length per attention implementation (results of memory.SCALING_CHECK);
- decode tokens/s vs batch size (benchmarks with extra_info kind == "decode");
- latency distribution: per-token decode latencies of each decode benchmark, or the per-round
  times of every benchmark when no decode benchmark ran.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import defaultdict
from pathlib import Path

from harness.memory import SCALING_CHECK

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#1b1b1b}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.25em 0.6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f3f3f3;padding:0 0.2em}h1{font-size:1.6em}figure{margin:1.5em 0}img{max-width:100%}
.fail{color:#b00020;font-weight:bold}.pass{color:#0a7a0a}
"""


# ---------------------------------------------------------------------------------------------
# Benchmarks as Markdown (appended to report.md; converted like the rest)

_EXTRA_COLUMNS = (("ttft_s", "TTFT ms", 1e3), ("tpot_s", "TPOT ms", 1e3), ("prefill_tokens_per_s", "prefill tok/s", 1),
                  ("decode_tokens_per_s", "decode tok/s", 1), ("mbu", "MBU", 1), ("mfu", "MFU", 1))


def benchmarks_markdown(document: dict | None) -> str:
    """A '## Benchmarks' section from pytest-benchmark's JSON document ('' when none ran)."""
    benches = (document or {}).get("benchmarks") or []
    if not benches:
        return ""
    lines = ["", "## Benchmarks", "",
             "Times are pytest-benchmark statistics of the device-synchronised timer; MBU is bytes a decode step must "
             "move / time / measured copy bandwidth, MFU is prefill FLOPs / time / measured matmul peak "
             "(`benchmarks.json` holds every round).", "",
             "| benchmark | median ms | IQR ms | rounds | " + " | ".join(c[1] for c in _EXTRA_COLUMNS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(_EXTRA_COLUMNS)]
    for b in benches:
        stats, extra = b.get("stats", {}), b.get("extra_info", {})
        cells = [f"`{b.get('name', b.get('fullname', '?'))}`", _num(stats.get("median"), 1e3), _num(stats.get("iqr"), 1e3),
                 str(stats.get("rounds", ""))]
        cells += [_num(extra.get(key), scale) for key, _, scale in _EXTRA_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value, scale=1.0) -> str:
    if not isinstance(value, (int, float)):
        return ""
    v = value * scale
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


# ---------------------------------------------------------------------------------------------
# Markdown subset -> HTML


def markdown_to_html(text: str) -> str:
    """Headings, '-' lists, pipe tables, paragraphs, `code` and **bold**: what report.md uses."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    header = _cells(rows[0])
    body = rows[1:]
    align = ["left"] * len(header)
    if body and set(body[0].replace("|", "").strip()) <= set("-: "):
        align = ["right" if c.endswith(":") else "left" for c in _cells(body[0])]
        body = body[1:]
    parts = ["<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in body:
        cells = _cells(row)
        aligns = align + ["left"] * (len(cells) - len(align))
        parts.append("<tr>" + "".join(f"<td{_cell_class(c, a)}>{_inline(c)}</td>" for c, a in zip(cells, aligns)) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _cell_class(cell: str, align: str) -> str:
    classes = (["num"] if align == "right" else []) + (["fail"] if cell == "FAIL" else ["pass"] if cell == "pass" else [])
    return f' class="{" ".join(classes)}"' if classes else ""


def _inline(text: str) -> str:
    pieces = re.split(r"(`[^`]*`)", text)
    out = []
    for piece in pieces:
        if piece.startswith("`") and piece.endswith("`") and len(piece) >= 2:
            out.append(f"<code>{html.escape(piece[1:-1])}</code>")
        else:
            escaped = html.escape(piece)
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Plots


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(111)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_memory_vs_length(results: list[dict]) -> str | None:
    series: dict[tuple, list] = defaultdict(list)
    for r in results:
        if r.get("check") != SCALING_CHECK:
            continue
        d = r.get("details", {})
        if "seq_len" in d:
            series[(d.get("model", ""), d.get("attn", r.get("where", "")))].append(
                (d["seq_len"], d.get("increase_bytes"), bool(d.get("out_of_memory"))))
    if not series:
        return None
    fig, ax = _figure()
    for (model, attn), points in sorted(series.items()):
        points.sort()
        fits = [(n, b / 2**20) for n, b, oom in points if not oom and b is not None and b > 0]
        if fits:
            line, = ax.plot(*zip(*fits), marker="o", label=f"{attn} ({model})")
            ooms = [n for n, _, oom in points if oom]
            if ooms:
                top = max(b for _, b in fits)
                ax.scatter(ooms, [top * 1.5] * len(ooms), marker="x", s=80, color=line.get_color(),
                           label=f"{attn} out of memory")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill peak memory increase (MiB)")
    ax.set_title("Peak memory vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


_VARIANT_KEYS = ("model", "attn", "dtype", "cache", "quantization")


def plot_tokens_per_second_vs_batch(benches: list[dict]) -> str | None:
    series: dict[tuple, list] = defaultdict(list)
    for b in benches:
        extra = b.get("extra_info", {})
        if extra.get("kind") == "decode" and "batch" in extra and "decode_tokens_per_s" in extra:
            series[tuple(extra.get(k, "") for k in _VARIANT_KEYS)].append((extra["batch"], extra["decode_tokens_per_s"]))
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = _figure()
    for key, points in sorted(series.items()):
        ax.plot(*zip(*sorted(points)), marker="o", label=" ".join(str(k) for k in key if k))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title("Decode throughput vs batch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_latency_distribution(benches: list[dict]) -> str | None:
    labels, data = [], []
    for b in benches:
        latencies = b.get("extra_info", {}).get("token_latencies_ms")
        if latencies:
            labels.append(b.get("name", "?"))
            data.append(latencies)
    what = "per-token decode latency (ms)"
    if not data:
        for b in benches:
            rounds = b.get("stats", {}).get("data")
            if rounds:
                labels.append(b.get("name", "?"))
                data.append([t * 1e3 for t in rounds])
        what = "time per round (ms)"
    if not data:
        return None
    fig, ax = _figure()
    fig.set_size_inches(7.5, max(2.5, 0.32 * len(data) + 1.2))
    ax.boxplot(data, vert=False, showfliers=True)
    ax.set_yticks(range(1, len(labels) + 1), [_short(label) for label in labels], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(what)
    ax.set_title("Latency distribution")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return _png(fig)


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------


def render_html(summary: dict, markdown: str, benchmarks: dict | None = None, figures=()) -> str:
    """The full page: report.md's content (its image links replaced by the embedded ``figures``,
    PNG files of the run directory), then the plots that the run's data supports."""
    benches = (benchmarks or {}).get("benchmarks") or []
    plots = [("Peak memory vs sequence length, per attention implementation", plot_memory_vs_length(summary.get("results", []))),
             ("Decode tokens/s vs batch size", plot_tokens_per_second_vs_batch(benches)),
             ("Latency distribution", plot_latency_distribution(benches))]
    body = [markdown_to_html("\n".join(line for line in markdown.splitlines() if not line.startswith("![")))]
    for path in figures:
        encoded = base64.b64encode(Path(path).read_bytes()).decode()
        body.append(f'<figure><img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{encoded}">'
                    f"<figcaption>{html.escape(Path(path).name)}</figcaption></figure>")
    body.append("<h2>Plots</h2>")
    drawn = [(title, png) for title, png in plots if png]
    for title, png in drawn:
        body.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
                    f"<figcaption>{html.escape(title)}</figcaption></figure>")
    missing = [title for title, png in plots if not png]
    if missing:
        body.append("<p>Not drawn, because this run measured nothing for them: " + "; ".join(html.escape(m) for m in missing) + ".</p>")
    title = html.escape(f"Inference validation report: {summary.get('verdict', '')}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

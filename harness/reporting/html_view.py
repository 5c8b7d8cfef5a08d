"""report.html: the report view (harness.reporting.view) with its plots, in one self-contained file.

Rendered from harness/reporting/templates/report.html.j2 with autoescape, so whatever a test recorded is
text, never markup. Plots are drawn with matplotlib's Agg canvas (no display, no global backend
switch) and embedded as base64 PNGs, so the file can be mailed or attached to a CI run on its own;
each sits beside the table it draws:
- prefill peak memory vs prompt length per attention implementation (the memory table);
- decode tokens/s vs batch for configurations measured at several batch sizes, and tokens/s per
  configuration at batch 1 (bars: single-batch configurations do not stack on one x position);
- the latency distribution per configuration (per-token decode latencies; per-round times when no
  decode benchmark ran), labelled and ordered by configuration;
- the needle-in-a-haystack heatmap (the PNG the suite wrote, else drawn from the cells).
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path

import jinja2

from harness.reporting.text import BYTE_UNITS, byte_unit, is_number
from harness.reporting.elements import ReportView
from harness.reporting.speed import config_key, config_label

TEMPLATES = Path(__file__).resolve().parent / "templates"
_MAX_ROWS_PLOTTED = 40  # configurations per bar or box plot (the tables list every one)
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
            "#bcbd22"]


def environment(autoescape: bool, **kwargs) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=autoescape,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined, **kwargs)


def summary_of(section) -> str:
    """The summary line of a collapsed section: what is inside, in numbers."""
    if section.folds:
        names = ", ".join(f.summary for f in section.folds[:6]) + (" …" if len(section.folds) > 6 else "")
        return f"{len(section.folds)} table{'s' * (len(section.folds) != 1)}: {names}"
    rows = sum(len(t.rows) + t.omitted for t in section.tables)
    return f"{rows} row{'s' * (rows != 1)}"


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.08)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _powers_of_two_axis(ax, values) -> None:
    """A log2 x axis ticked at exactly the measured values, labelled as plain integers."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = sorted({v for v in values if is_number(v) and v > 0})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [f"{int(t):,}" if float(t).is_integer() else f"{t:g}" for t in ticks],
                  rotation=45 if len(ticks) > 6 else 0)
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)


def plot_memory(points: list[dict]) -> str | None:
    series: dict[tuple, list] = defaultdict(list)
    for p in points:
        series[(p["model"], p["attn"])].append(p)
    unit = byte_unit(p["bytes"] for p in points if not p["oom"])
    scale = BYTE_UNITS[unit]
    fits_all = [p["bytes"] / scale for p in points if not p["oom"] and is_number(p["bytes"]) and p["bytes"] > 0]
    if not fits_all:
        return None
    top = max(fits_all) * 2
    several = len({m for m, _ in series}) > 1
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot(111)
    for i, ((model, attn), pts) in enumerate(sorted(series.items(), key=lambda kv: (kv[0][1] != "eager", kv[0]))):
        pts.sort(key=lambda p: p["seq_len"])
        color = _PALETTE[i % len(_PALETTE)]
        label = f"{attn} ({model})" if several else attn
        fits = [(p["seq_len"], p["bytes"] / scale) for p in pts
                if not p["oom"] and is_number(p["bytes"]) and p["bytes"] > 0]
        if fits:
            ax.plot(*zip(*fits), marker="o", color=color, label=label)
        ooms = [p["seq_len"] for p in pts if p["oom"]]
        if ooms:
            ax.scatter(ooms, [top] * len(ooms), marker="x", s=90, color=color, label=f"{label}: out of memory")
    _powers_of_two_axis(ax, [p["seq_len"] for p in points])
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"prefill peak increase ({unit})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _benchmark_function(row: dict) -> str:
    """'test_decode_dtype[m-float16]' -> 'dtype' (the benchmark, without its parameters and kind)."""
    name = str(row.get("name") or "").split("[")[0].removeprefix("test_")
    return name.removeprefix(f"{row.get('kind')}_")


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def _labels(rows: list[dict], *, with_batch: bool = True) -> list[str]:
    """Plot labels of configurations: short dtypes; the benchmark's name added where two rows
    would otherwise read the same."""
    several = _several_models(rows)
    plain = []
    for r in rows:
        short = {**r, "dtype": _SHORT_DTYPES.get(str(r.get("dtype")), r.get("dtype"))}
        plain.append(config_label(short, with_batch=with_batch, with_model=several))
    counts = {label: plain.count(label) for label in plain}
    return [label + (f" ({_benchmark_function(r)})" if counts[label] > 1 else "") for label, r in zip(plain, rows)]


def _plain_log_axis(axis) -> None:
    """Log-scale tick labels as plain numbers (1, 10, 100, 1,000), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_throughput_vs_batch(rows: list[dict]) -> str | None:
    """Lines for configurations one benchmark measured at two or more batch sizes (None when none)."""
    series: dict[tuple, list] = OrderedDict()
    for r in sorted(rows, key=config_key):
        if is_number(r.get("batch")) and is_number(r.get("decode_tokens_per_s")):
            series.setdefault(config_key(r)[:-1] + (_benchmark_function(r),), []).append(r)
    series = {_labels(pts[:1], with_batch=False)[0]: sorted((r["batch"], r["decode_tokens_per_s"]) for r in pts)
              for pts in series.values() if len({r["batch"] for r in pts}) > 1}
    series = dict(list(series.items())[:len(_PALETTE)])
    if not series:
        return None
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot(111)
    for i, (label, pts) in enumerate(series.items()):
        ax.plot(*zip(*pts), marker="o", color=_PALETTE[i % len(_PALETTE)], label=label)
    _powers_of_two_axis(ax, [b for pts in series.values() for b, _ in pts])
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tok/s (all sequences)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_throughput_per_config(rows: list[dict]) -> str | None:
    """Horizontal bars: decode tok/s of every configuration at the smallest batch it ran."""
    chosen: dict[tuple, dict] = OrderedDict()
    for r in sorted(rows, key=config_key):
        if is_number(r.get("decode_tokens_per_s")):
            chosen.setdefault(config_key(r)[:-1] + (_benchmark_function(r),), r)  # its smallest batch
    if not chosen:
        return None
    picked = list(chosen.values())[:_MAX_ROWS_PLOTTED]
    labels = _labels(picked)
    values = [r["decode_tokens_per_s"] for r in picked]
    fig = _figure(5.0, 0.9 + 0.3 * len(labels))
    ax = fig.add_subplot(111)
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color="#1f77b4")
    ax.set_yticks(y, labels, fontsize=8)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,.0f}" if v >= 100 else f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.18)
    ax.set_xlabel("decode tok/s (all sequences)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def _several_models(rows) -> bool:
    return len({r.get("model") for r in rows}) > 1


def plot_latency(rows: list[dict]) -> str | None:
    """Box plots, one per configuration, in configuration order (top to bottom)."""
    chosen = sorted((r for r in rows if r["kind"] == "decode" and r["latencies_ms"]), key=config_key)
    data = list(zip(_labels(chosen), (r["latencies_ms"] for r in chosen)))
    what = "decode latency per token (ms)"
    if not data:
        chosen = sorted((r for r in rows if r["round_ms"]), key=lambda r: (r["kind"], config_key(r)))
        data = [(f"{r['kind']} · {label}", r["round_ms"]) for label, r in zip(_labels(chosen), chosen)]
        what = "time per round (ms)"
    if not data:
        return None
    data = data[:_MAX_ROWS_PLOTTED]
    from matplotlib.ticker import LogLocator

    fig = _figure(5.0, 1.0 + 0.28 * len(data))
    ax = fig.add_subplot(111)
    ax.boxplot([d for _, d in data][::-1], vert=False, showfliers=True, widths=0.6,
               flierprops={"markersize": 3, "alpha": 0.5})
    ax.set_yticks(range(1, len(data) + 1), [label for label, _ in data][::-1], fontsize=8)
    values = [v for _, d in data for v in d if is_number(v) and v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
        decades = math.log10(max(values) / min(values))  # 1-3 ticks a decade would collide beyond two decades
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0) if decades <= 2 else (1.0,), numticks=8))
        _plain_log_axis(ax.xaxis)
    else:
        ax.locator_params(axis="x", nbins=6)
    ax.set_xlabel(what)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    return _png(fig)


def plot_niah(cells, png_path: str | None) -> str | None:
    if png_path and Path(png_path).is_file():
        return base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
    if not cells:
        return None
    lengths = sorted({c[0] for c in cells})
    depths = sorted({c[1] for c in cells})
    grid = {(n, d): v for n, d, v in cells}
    from harness.equivalence.niah_views import niah_heatmap

    return _png(niah_heatmap([[grid.get((n, d), float("nan")) for n in lengths] for d in depths], lengths, depths))


_DRAW = {"memory": lambda p: plot_memory(p.data), "throughput_batch": lambda p: plot_throughput_vs_batch(p.data),
         "throughput_config": lambda p: plot_throughput_per_config(p.data), "latency": lambda p: plot_latency(p.data),
         "niah": lambda p: plot_niah(p.data, p.png_path)}


_FONTS = {"font.size": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8}


def draw_plots(view: ReportView) -> dict[str, str]:
    """{'kind:title': base64 PNG} for every plot of the view that the run's data supports."""
    import matplotlib

    out = {}
    with matplotlib.rc_context(_FONTS), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # emoji/CJK in labels: drawn as boxes
        for section in view.sections:
            for plot in section.plots:
                png = _DRAW[plot.kind](plot)
                if png:
                    out[f"{plot.kind}:{plot.title}"] = png
    return out


def render_html(view: ReportView) -> str:
    plots = draw_plots(view)
    env = environment(autoescape=True)
    return env.get_template("report.html.j2").render(v=view, plots=plots, summary_of=summary_of)

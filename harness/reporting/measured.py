"""The report's measured sections: prefill memory per length, quantization vs reference, needle in
a haystack."""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from pathlib import Path

from harness.performance.predictions import SCALING_CHECK
from harness.reporting.elements import Cell, Limits, Plot, Section, Table, cap_rows, model_of, parse_md_table, threshold_text, value_text, verdict_cell, where_text, why_empty
from harness.reporting.text import byte_unit, fmt_bytes, fmt_int, fmt_num, fmt_pct, is_number


# ---------------------------------------------------------------------------------------------
# Prefill memory per length


def memory_points(summary: dict) -> list[dict]:
    out = []
    for r in summary.get("results", []):
        d = r.get("details", {})
        if r.get("check") == SCALING_CHECK and "seq_len" in d:
            out.append({"model": d.get("model", ""), "attn": d.get("attn") or str(r.get("where", "")).split(" ")[0],
                        "seq_len": d["seq_len"], "bytes": d.get("increase_bytes"),
                        "oom": bool(d.get("out_of_memory")) or r.get("value") == "out of memory",
                        "method": d.get("method", "")})
    return out


def memory_section(summary: dict, limits: Limits) -> Section:
    section = Section("Prefill peak memory vs prompt length",
                      intro="Peak memory increase of one prefill forward pass, per attention implementation: "
                            "eager materialises the N×N score matrices, fused kernels (SDPA/flash) should not.")
    points = memory_points(summary)
    if not points:
        section.empty = why_empty(summary, "suites/test_memory.py", "test_prefill_peak_memory")
        return section
    models = list(OrderedDict.fromkeys(p["model"] for p in points))
    impls = sorted({p["attn"] for p in points}, key=lambda a: (a != "eager", a))
    fused = [a for a in impls if a != "eager"]
    unit = byte_unit(p["bytes"] for p in points if not p["oom"])
    grid = {(p["model"], p["seq_len"], p["attn"]): p for p in points}
    cols = (["model"] if len(models) > 1 else []) + ["prompt tokens"] + [f"{a} {unit}" for a in impls]
    if "eager" in impls and fused:
        cols.append(f"eager ÷ {fused[0]}" if len(fused) == 1 else "eager ÷ best fused")
    cols.append("out of memory")
    body = []
    for model in models:
        for n in sorted({p["seq_len"] for p in points if p["model"] == model}):
            cells = ([Cell(model)] if len(models) > 1 else []) + [Cell(fmt_int(n))]
            values = {}
            for a in impls:
                p = grid.get((model, n, a))
                if p is None:
                    cells.append(Cell("n/a", "muted"))
                elif p["oom"]:
                    cells.append(Cell("OOM", "fail"))
                else:
                    values[a] = p["bytes"]
                    cells.append(Cell(fmt_bytes(p["bytes"], unit)))
            if "eager" in impls and fused:
                best = [values[a] for a in fused if is_number(values.get(a)) and values[a] > 0]
                eager = values.get("eager")
                cells.append(Cell(f"{eager / min(best):.1f}×" if best and is_number(eager) else "n/a"))
            ooms = [a for a in impls if (grid.get((model, n, a)) or {}).get("oom")]
            cells.append(Cell(", ".join(ooms) if ooms else "none", "fail" if ooms else "muted"))
            body.append(cells)
    methods = sorted({p["method"] for p in points if p["method"]})
    caption = (f"Peak increase over the loaded model, in {unit}" + (f", model {models[0]}" if len(models) == 1 else "")
               + (f"; measured by {', '.join(methods)}." if methods else "."))
    lead = len(models) > 1
    section.tables.append(Table(cols, body, ["l"] * lead + ["r"] * (len(cols) - lead - 1) + ["l"], caption))
    for r in summary.get("results", []):
        if r.get("check") == SCALING_CHECK + " (fit)":
            section.notes.append(f"Fit, {where_text(r.get('where'))}: {value_text(r.get('value'))} {r.get('metric')} "
                                 f"(limit {threshold_text(r.get('threshold'))}): {verdict_cell(r.get('passed')).text}")
    section.plots.append(Plot("memory", "Peak memory vs prompt length", points))
    return section


# ---------------------------------------------------------------------------------------------
# Quantization


_QUANT_COLUMNS = (  # metric, header, stderr metric
    ("top-1 agreement", "top-1 ↑", "top-1 stderr"),
    ("top-5 overlap", "top-5 overlap ↑", None),
    ("KLD mean", "KLD mean ↓", "KLD stderr"),
    ("KLD p99", "KLD p99 ↓", None),
    ("mean ln(PPL ratio)", "ln(PPL ratio) →0", "ln(PPL ratio) stderr"),
    ("delta p mean", "Δp mean →0", "delta p stderr"),
)
_QUANT_SCHEME_COLUMNS = (  # recorded once per scheme (no evaluation window)
    ("footprint ratio", "weights ÷ reference ↓"),
    ("greedy common prefix (mean tokens)", "greedy prefix ↑"),
    ("max |layer gain - 1|", "max |layer gain − 1| ↓"),
)


_SCHEME_METRICS = {m for m, _ in _QUANT_SCHEME_COLUMNS}


def _stat_cell(r: dict | None, err: dict | None) -> Cell:
    if r is None:
        return Cell("n/a", "muted")
    value = r.get("value")
    text = fmt_num(value, 3) if is_number(value) else value_text(value)
    if err is not None and is_number(err.get("value")):
        text += f" ± {fmt_num(err['value'], 2)}"
    sub = ""
    if r.get("threshold") is not None:
        text = {True: "✅ ", False: "❌ "}.get(r.get("passed"), "") + text
        sub = threshold_text(r["threshold"])
    return Cell(text, {True: "pass", False: "fail"}.get(r.get("passed")), title=where_text(r.get("where")) or None, sub=sub)


def quantization_section(summary: dict, limits: Limits) -> Section:
    section = Section("Quantization vs reference",
                      intro="Per scheme, llama.cpp-style statistics against the reference's logits; ↑ higher is better, "
                            "↓ lower is better, →0 closer to zero is better; ± one standard error; "
                            "✅/❌ against the threshold given with each value.")
    records = [r for r in summary.get("results", []) if r.get("suite") == "test_quantization" and r.get("check") != "table"
               and not r.get("details", {}).get("section")]
    if not records:
        section.empty = why_empty(summary, "suites/test_quantization.py", "test_agreement")
        return section
    models = [m["name"] for m in summary.get("models", [])]
    by_row: dict[tuple, dict] = OrderedDict()
    scheme_level: dict[tuple, dict] = defaultdict(dict)
    for r in records:
        model = model_of(r.get("details", {}).get("test", ""), models)
        if r.get("where") and r["metric"] not in _SCHEME_METRICS:
            by_row.setdefault((model, r["check"], r["where"]), {})[r["metric"]] = r
        else:
            scheme_level[(model, r["check"])][r["metric"]] = r
    for model, scheme in scheme_level:
        if not any(k[:2] == (model, scheme) for k in by_row):
            by_row[(model, scheme, "")] = {}
    several = len({k[0] for k in by_row}) > 1
    cols = (["model"] if several else []) + ["scheme", "evaluated on"] + [c[1] for c in _QUANT_COLUMNS] + \
        [c[1] for c in _QUANT_SCHEME_COLUMNS] + ["verdict"]
    body = []
    for (model, scheme, where), stats in by_row.items():
        extra = scheme_level.get((model, scheme), {})
        cells = ([Cell(model or "n/a")] if several else []) + [Cell(scheme), Cell(where_text(where) or "n/a")]
        cells += [_stat_cell(stats.get(m), stats.get(e) if e else None) for m, _, e in _QUANT_COLUMNS]
        cells += [_stat_cell(extra.get(m), None) for m, _ in _QUANT_SCHEME_COLUMNS]
        judged = [r.get("passed") for r in list(stats.values()) + list(extra.values()) if r.get("passed") is not None]
        cells.append(verdict_cell(all(judged) if judged else None))
        body.append(cells)
    body, omitted = cap_rows(body, limits.rows_per_table)
    section.tables.append(Table(cols, body, ["l"] * (2 + several) + ["r"] * (len(cols) - 3 - several) + ["l"],
                                "Every statistic of every scheme (percentiles, PPL, footprints) is under "
                                "Measurements by suite → test_quantization.", omitted))
    return section


# ---------------------------------------------------------------------------------------------
# Needle in a haystack


_NIAH_CELL = re.compile(r"(\d+) tokens, depth ([\d.]+) %")


def niah_cells(summary: dict) -> list[tuple[int, float, float]]:
    cells = []
    for r in summary.get("results", []):
        m = _NIAH_CELL.match(str(r.get("where", "")))
        if r.get("check") == "niah cell" and m and is_number(r.get("value")):
            cells.append((int(m.group(1)), float(m.group(2)), float(r["value"])))
    return cells


def _heat_style(fraction: float) -> str:
    """Red (0 %) to yellow to green (100 %), light enough for black text."""
    hue = 120 * max(0.0, min(1.0, fraction))
    return f"background:hsl({hue:.0f},70%,78%)"


def niah_section(summary: dict, run_dir: Path | None) -> Section:
    section = Section("Needle in a haystack",
                      intro="Retrieval accuracy of needles hidden at each depth of prompts of each length.")
    cells = niah_cells(summary)
    heatmaps = [r for r in summary.get("results", []) if r.get("check") == "niah heatmap"]
    per_length = [r for r in summary.get("results", []) if r.get("check") == "niah"]
    if not cells and not heatmaps and not per_length:
        section.empty = why_empty(summary, "suites/test_long_context.py", "test_niah")
        return section
    if cells:
        lengths = sorted({c[0] for c in cells})
        depths = sorted({c[1] for c in cells})
        grid = {(n, d): v for n, d, v in cells}
        body = []
        for d in depths:
            row = [Cell(f"{d:g} %")]
            for n in lengths:
                v = grid.get((n, d))
                row.append(Cell("n/a", "muted") if v is None else
                           Cell(f"{_heat_mark(v)} {fmt_pct(v, 0)}", style=_heat_style(v)))
            body.append(row)
        section.tables.append(Table(["needle depth ↓ / prompt tokens →"] + [fmt_int(n) for n in lengths], body,
                                    ["l"] + ["r"] * len(lengths), "🟩 ≥ 90 %, 🟨 ≥ 50 %, 🟥 below."))
    elif heatmaps:
        table = parse_md_table(str(heatmaps[-1].get("details", {}).get("table", "")))
        if table:
            section.tables.append(table)
    judged = []
    for r in per_length:
        accuracy = r.get("metric") == "retrieval accuracy"
        value, limit = r.get("value"), r.get("threshold")
        judged.append([Cell(where_text(r.get("where"))), Cell(r.get("metric", "")),
                       Cell(fmt_pct(value, 0) if accuracy and is_number(value) else value_text(value)),
                       Cell(f"≥ {fmt_pct(limit)}" if accuracy and is_number(limit) else threshold_text(limit)),
                       verdict_cell(r.get("passed"))])
    if judged:
        section.tables.append(Table(["prompts", "metric", "value", "threshold", "verdict"], judged,
                                    ["l", "l", "r", "r", "l"], "Per length, and the effective context length."))
    png = None
    for r in heatmaps:
        name = Path(str(r.get("where", ""))).name
        if run_dir is not None and name and (Path(run_dir) / name).is_file():
            png = str(Path(run_dir) / name)
    if png or cells:
        section.plots.append(Plot("niah", "Needle retrieval heatmap", cells, png_path=png))
    return section


def _heat_mark(v: float) -> str:
    return "🟩" if v >= 0.9 else "🟨" if v >= 0.5 else "🟥"



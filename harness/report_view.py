"""The report as a view model: what report.md and report.html show, built once from the run's data.

    build_view(summary, benchmarks, comparisons) -> ReportView

`summary` is results.json, `benchmarks` pytest-benchmark's document (benchmarks.json) and
`comparisons` harness.regression.Comparison objects against a baseline (optional). The view holds
plain text; report.md and report.html escape it as they render it (harness.report_text,
the HTML template's autoescape).

Layout, for an engineer with one minute: the verdict and the failure triage first
(harness.report_triage), then the seed questions as tables beside their plots (prefill memory
per length, decode speed per configuration, quantization, needle in a haystack, capabilities),
then everything else collapsed: measurements by suite, other tables, skips, all benchmarks,
tracebacks, the run's environment.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from harness.memory import SCALING_CHECK
from harness.results import INCONCLUSIVE
from harness.report_text import (NOISE_LIMIT, byte_unit, clean_reason, fmt_bytes, fmt_int, fmt_ms, fmt_num, fmt_pct,
                                 fmt_rate, fmt_signed_pct, fmt_threshold, is_number, one_line, shorten, slug,
                                 strip_paths)
from harness.report_triage import KINDS, MEANING, NEXT_STEP, Failure, counts, failures


CELL_CHARS = 300


@dataclass
class Cell:
    text: str
    status: str | None = None      # "pass", "fail", "warn", "muted" (HTML colour; Markdown shows the text)
    code: bool = False             # a node id: code span
    href: str | None = None        # an anchor in the report
    title: str | None = None       # HTML tooltip
    style: str | None = None       # HTML inline style (heatmap cells)
    sub: str = ""                  # secondary text (a threshold): a second line in HTML, in brackets in Markdown

    def __post_init__(self):  # every cell one line, and short: long messages live in the folded details
        self.text = shorten(one_line(self.text), CELL_CHARS)
        self.sub = shorten(one_line(self.sub), CELL_CHARS // 2)
        self.title = shorten(one_line(self.title), 1000) if self.title else None

    @property
    def full_text(self) -> str:
        return f"{self.text} ({self.sub})" if self.sub else self.text


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    align: list[str] = field(default_factory=list)   # "l" / "r" per column
    caption: str = ""
    omitted: int = 0               # rows left out (size limits), said under the table

    def __post_init__(self):
        self.align = self.align or ["l"] * len(self.columns)


@dataclass
class Plot:
    kind: str                      # "memory", "throughput_batch", "throughput_config", "latency", "niah"
    title: str
    data: object = None
    png_path: str | None = None    # an image the run wrote (NIAH heatmap)


@dataclass
class Fold:
    """A collapsed part of a section: a summary line; inside, tables and/or preformatted text."""
    summary: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pre: str = ""
    id: str = ""
    command: str = ""              # a shell command (to reproduce)


@dataclass
class Section:
    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    empty: str = ""                # why the section has nothing (shown instead of content)
    collapsed: bool = False
    layout: str = "side"           # HTML: plots beside the tables, or "stack": below them (wide tables)
    fold_style: str = "details"    # each fold collapsed on its own, or "headings" (one collapsed block)
    summary: str = ""              # the collapsed block's summary line
    id: str = ""

    def __post_init__(self):
        self.id = self.id or slug(self.title)  # GitHub's anchor of the '## title' heading


@dataclass
class Limits:
    """Size limits: report.md must fit a GitHub job summary (1 MiB); report.html only needs to open."""
    rows_per_table: int = 2000
    traceback_chars: int = 20000
    skip_reason_chars: int = 240


@dataclass
class ReportView:
    title: str
    verdict: str
    headline: str
    facts: list[str]
    kind_counts: dict
    failures: list[Failure]
    key_sections: list[Section]
    detail_sections: list[Section]
    meaning: dict = field(default_factory=lambda: dict(MEANING))
    next_step: dict = field(default_factory=lambda: dict(NEXT_STEP))
    kinds: tuple = KINDS
    html_url: str = ""

    @property
    def failure_groups(self) -> list[tuple[str, list[Failure]]]:
        """Failures grouped by kind, in KINDS order."""
        return [(kind, [f for f in self.failures if f.kind == kind])
                for kind in self.kinds if self.kind_counts.get(kind)]

    @property
    def sections(self) -> list[Section]:
        return self.key_sections + self.detail_sections


PASS, FAIL, RECORDED = "pass", "FAIL", "recorded"


def _verdict_cell(passed) -> Cell:
    return {True: Cell(PASS, "pass"), False: Cell(FAIL, "fail")}.get(passed, Cell(RECORDED, "muted"))


def _params(nodeid: str) -> str:
    """'suite.py::test[a-b]' -> 'a-b' (the test's parameters)."""
    m = re.search(r"\[(.*)\]$", nodeid or "")
    return m.group(1) if m else ""


def _model_of(nodeid: str, models: list[str]) -> str:
    params = _params(nodeid)
    for name in sorted(models, key=len, reverse=True):
        if name and name in params:
            return name
    return models[0] if len(models) == 1 else ""


def _where(text) -> str:
    return shorten(strip_paths(one_line(text)), 160)


def _value_text(value) -> str:
    return shorten(one_line(fmt_num(value)), 200)


def _threshold_text(threshold) -> str:
    return shorten(fmt_threshold(threshold), 160)


def _cap(rows: list, limit: int) -> tuple[list, int]:
    return (rows, 0) if len(rows) <= limit else (rows[:limit], len(rows) - limit)


# ---------------------------------------------------------------------------------------------
# Benchmarks: one row per configuration


_VARIANT = ("model", "attn", "cache", "dtype", "quantization", "batch")


def benchmark_rows(document: dict | None, summary: dict) -> list[dict]:
    """Decode and prefill benchmarks as rows, from pytest-benchmark's document, else from the
    `speed (...)` results (older runs, or results.json alone: batch and shape then read n/a)."""
    rows = []
    for b in (document or {}).get("benchmarks") or []:
        extra, stats = b.get("extra_info") or {}, b.get("stats") or {}
        if extra.get("kind") not in ("decode", "prefill"):
            continue
        median, iqr = stats.get("median"), stats.get("iqr")
        rows.append({**{k: extra.get(k) for k in _VARIANT}, "kind": extra["kind"], "name": b.get("name", ""),
                     "fullname": b.get("fullname", b.get("name", "")),
                     "prompt_tokens": extra.get("prompt_tokens"), "new_tokens": extra.get("new_tokens"),
                     "ttft_s": extra.get("ttft_s"), "tpot_s": extra.get("tpot_s"),
                     "tpot_p90_s": extra.get("tpot_p90_s"), "tpot_p99_s": extra.get("tpot_p99_s"),
                     "decode_tokens_per_s": extra.get("decode_tokens_per_s"),
                     "prefill_tokens_per_s": extra.get("prefill_tokens_per_s"),
                     "mbu": extra.get("mbu"), "mfu": extra.get("mfu"), "median_s": median, "rounds": stats.get("rounds"),
                     "noise": iqr / median if is_number(iqr) and is_number(median) and median > 0 else None,
                     "latencies_ms": extra.get("token_latencies_ms") or [],
                     "round_ms": [t * 1e3 for t in stats.get("data") or [] if is_number(t)]})
    if rows:
        return _sorted_rows(rows)
    grouped: dict[tuple, dict] = OrderedDict()
    models = [m["name"] for m in summary.get("models", [])]
    for r in summary.get("results", []):
        m = re.match(r"speed \((decode|prefill)\)$", r.get("check", ""))
        if not m:
            continue
        test = r.get("details", {}).get("test", "")
        key = (test, r.get("where", ""))
        if key not in grouped:
            variant = dict(part.split("=", 1) for part in str(r.get("where", "")).split(", ") if "=" in part)
            grouped[key] = {**{k: variant.get(k) for k in _VARIANT}, "kind": m.group(1), "name": test.split("::")[-1],
                            "fullname": test, "latencies_ms": [], "round_ms": [], "noise": None}
            grouped[key]["model"] = grouped[key]["model"] or _model_of(test, models)
        grouped[key][r["metric"]] = r.get("value") if is_number(r.get("value")) else None
    return _sorted_rows(list(grouped.values()))


def _sorted_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (config_key(r), r["kind"], r.get("name", "")))


def config_key(row: dict) -> tuple:
    """Sort key of a configuration: model, attn, cache, dtype, quantization, then batch as a number."""
    batch = row.get("batch")
    return tuple(str(row.get(k) or "") for k in _VARIANT[:-1]) + (batch if is_number(batch) else -1,)


def config_label(row: dict, *, with_batch: bool = True, with_model: bool = False) -> str:
    parts = [str(row.get(k)) for k in ("attn", "cache", "dtype") if row.get(k)]
    if row.get("quantization") not in (None, "", "none"):
        parts.append(str(row["quantization"]))
    if with_batch:
        parts.append(f"batch {row['batch']}" if row.get("batch") is not None else "batch n/a")
    if with_model and row.get("model"):
        parts.insert(0, str(row["model"]))
    return " · ".join(parts)


def _noise_cell(noise) -> Cell:
    if not is_number(noise):
        return Cell("n/a", "muted")
    return Cell(("⚠ " if noise > NOISE_LIMIT else "") + fmt_pct(noise, 0), "warn" if noise > NOISE_LIMIT else None)


def _delta_cell(row: dict, comparisons: dict) -> Cell:
    c = comparisons.get(row.get("fullname"))
    if c is None:
        return Cell("no baseline", "muted")
    limit = f"{c.rule.limit * 100:g}%" if c.rule.relative else f"{c.rule.limit:g}"
    mark = "❌ " if c.regressed else ""
    return Cell(f"{mark}{fmt_signed_pct(c.change)} (limit {limit})", "fail" if c.regressed else "pass",
                title=c.describe())


def speed_tables(rows: list[dict], comparisons: dict, limits: Limits) -> list[Table]:
    several_models = len({r.get("model") for r in rows}) > 1
    lead = (["model"] if several_models else []) + ["attn", "cache", "dtype", "quant", "batch", "prompt tok", "new tok"]
    tables = []
    base = comparisons and "Δ median vs baseline (positive is slower)"
    for kind in ("decode", "prefill"):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        if kind == "decode":
            cols = lead + ["tok/s", "TTFT ms", "TPOT p50 ms", "TPOT p90 ms", "TPOT p99 ms", "MBU", "IQR / median"]
        else:
            cols = lead + ["prefill tok/s", "TTFT ms", "MFU", "IQR / median"]
        if base:
            cols.append(base)
        cols.append("benchmark")
        body = []
        for r in chosen:
            cells = ([Cell(str(r.get("model") or "n/a"))] if several_models else []) + [
                *(Cell(str(r.get(k) or "n/a")) for k in ("attn", "cache", "dtype", "quantization")),
                Cell(fmt_int(r.get("batch"))),
                Cell(fmt_int(r.get("prompt_tokens"))), Cell(fmt_int(r.get("new_tokens")))]
            if kind == "decode":
                cells += [Cell(fmt_rate(r.get("decode_tokens_per_s"))), Cell(fmt_ms(r.get("ttft_s"))),
                          Cell(fmt_ms(r.get("tpot_s"))), Cell(fmt_ms(r.get("tpot_p90_s"))),
                          Cell(fmt_ms(r.get("tpot_p99_s"))), Cell(fmt_pct(r.get("mbu")))]
            else:
                cells += [Cell(fmt_rate(r.get("prefill_tokens_per_s"))), Cell(fmt_ms(r.get("ttft_s"))),
                          Cell(fmt_pct(r.get("mfu")))]
            cells.append(_noise_cell(r.get("noise")))
            if base:
                cells.append(_delta_cell(r, comparisons))
            short = str(r.get("name") or "").split("[")[0].removeprefix("test_").removeprefix(f"{kind}_")
            cells.append(Cell(short or "n/a", "muted", title=r.get("fullname")))
            body.append(cells)
        body, omitted = _cap(body, limits.rows_per_table)
        caption = ("Decode: tok/s = batch / TPOT (all sequences); TPOT percentiles over every generated token of the "
                   "timed rounds; MBU = bytes a decode step must move / TPOT / measured copy bandwidth."
                   if kind == "decode" else
                   "Prefill: time to first token of a forced 1-token generate(); MFU = prefill FLOPs / TTFT / "
                   "measured matmul peak.")
        caption += f" ⚠ marks noisy rows: IQR above {NOISE_LIMIT:.0%} of the median over rounds."
        if not several_models and chosen[0].get("model"):
            caption += f" Model {chosen[0]['model']}."
        align = ["l"] * (len(lead) - 3) + ["r"] * (len(cols) - len(lead) + 2) + ["l"]
        tables.append(Table(cols, body, align, caption, omitted))
    return tables


# ---------------------------------------------------------------------------------------------
# Prefill memory per length


def why_empty(summary: dict, suite_file: str, *tests: str) -> str:
    """Why a section has no data: the skip reasons of the tests that feed it, or that none ran."""
    fed = [o for o in summary.get("outcomes", []) if o.get("nodeid", "").startswith(suite_file)
           and any(f"::{t}" in o["nodeid"] for t in tests)]
    if not fed:
        return f"Not measured: {suite_file} ({', '.join(t + '*' for t in tests)}) was not part of this run."
    reasons = Counter(clean_reason(o.get("reason"), 160) for o in fed if o.get("outcome") in ("skipped", INCONCLUSIVE))
    if not reasons:
        return f"Not measured: {len(fed)} test(s) of {suite_file} ran but recorded nothing for this table."
    listed = "; ".join(f"{reason} ({n}×)" for reason, n in reasons.most_common(3))
    more = f"; {len(reasons) - 3} more reasons under Skipped or inconclusive, and why" if len(reasons) > 3 else ""
    return f"Not measured: the tests that feed this table skipped: {listed}{more}."


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
            section.notes.append(f"Fit, {_where(r.get('where'))}: {_value_text(r.get('value'))} {r.get('metric')} "
                                 f"(limit {_threshold_text(r.get('threshold'))}): {_verdict_cell(r.get('passed')).text}")
    section.plots.append(Plot("memory", "Peak memory vs prompt length", points))
    return section


# ---------------------------------------------------------------------------------------------
# Decode speed


def speed_section(summary: dict, rows: list[dict], comparisons: dict, limits: Limits, has_baseline: bool) -> Section:
    section = Section("Decode speed per configuration",
                      intro="One row per attention × cache × dtype × quantization × batch; times in ms, rates in tok/s.")
    if not rows:
        section.empty = why_empty(summary, "suites/test_benchmarks.py", "test_decode", "test_prefill")
        return section
    section.tables = speed_tables(rows, comparisons, limits)
    section.layout = "stack"
    if not has_baseline:
        section.notes.append("No baseline given: deltas are shown when the report is rendered with one "
                             "(python -m harness.report RUN_DIR --baseline FILE --max-regression 10%).")
    decode = [r for r in rows if r["kind"] == "decode" and is_number(r.get("decode_tokens_per_s"))]
    batches: dict[tuple, set] = defaultdict(set)
    for r in decode:
        batches[tuple(r.get(k) for k in _VARIANT[:-1])].add(r.get("batch"))
    if any(len(b) > 1 for b in batches.values()):
        section.plots.append(Plot("throughput_batch", "Decode tok/s vs batch size", decode))
    if decode:
        section.plots.append(Plot("throughput_config", "Decode tok/s per configuration, at its smallest batch", decode))
    if any(r["latencies_ms"] or r["round_ms"] for r in rows):
        section.plots.append(Plot("latency", "Latency distribution per configuration", rows))
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
    text = fmt_num(value, 3) if is_number(value) else _value_text(value)
    if err is not None and is_number(err.get("value")):
        text += f" ± {fmt_num(err['value'], 2)}"
    sub = ""
    if r.get("threshold") is not None:
        text = {True: "✅ ", False: "❌ "}.get(r.get("passed"), "") + text
        sub = _threshold_text(r["threshold"])
    return Cell(text, {True: "pass", False: "fail"}.get(r.get("passed")), title=_where(r.get("where")) or None, sub=sub)


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
        model = _model_of(r.get("details", {}).get("test", ""), models)
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
        cells = ([Cell(model or "n/a")] if several else []) + [Cell(scheme), Cell(_where(where) or "n/a")]
        cells += [_stat_cell(stats.get(m), stats.get(e) if e else None) for m, _, e in _QUANT_COLUMNS]
        cells += [_stat_cell(extra.get(m), None) for m, _ in _QUANT_SCHEME_COLUMNS]
        judged = [r.get("passed") for r in list(stats.values()) + list(extra.values()) if r.get("passed") is not None]
        cells.append(_verdict_cell(all(judged) if judged else None))
        body.append(cells)
    body, omitted = _cap(body, limits.rows_per_table)
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
        judged.append([Cell(_where(r.get("where"))), Cell(r.get("metric", "")),
                       Cell(fmt_pct(value, 0) if accuracy and is_number(value) else _value_text(value)),
                       Cell(f"≥ {fmt_pct(limit)}" if accuracy and is_number(limit) else _threshold_text(limit)),
                       _verdict_cell(r.get("passed"))])
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


# ---------------------------------------------------------------------------------------------
# Capabilities, generic measurements, skips, benchmarks, tracebacks, environment


def capability_section(summary: dict) -> Section:
    section = Section("Capability matrix",
                      intro="What really runs on this device and dtype, and what the model under test refused "
                            "(category \"model …\"); tests needing what does not skip with this reason.")
    body = [[Cell(c.get("name", "")), Cell(c.get("category", "")),
             Cell("yes", "pass") if c.get("available") else Cell("no", "muted"),
             Cell(clean_reason(c.get("reason", ""), 300))] for c in summary.get("capabilities", [])]
    if body:
        section.tables.append(Table(["backend", "category", "available", "detail / reason"], body))
    else:
        section.empty = "No capability probe recorded."
    return section


def _consumed(r: dict) -> bool:
    """Rows shown by a table above instead of the generic measurement tables."""
    check = r.get("check", "")
    return (check.startswith("speed (") or check in (SCALING_CHECK, "niah", "niah cell", "niah heatmap")
            or bool(r.get("details", {}).get("section")))


def measurement_section(summary: dict, limits: Limits) -> Section:
    section = Section("Measurements by suite", collapsed=True,
                      intro="Every recorded result not shown in a table above, one table per suite; failing rows first. "
                            "Speed rows are in Decode speed, prefill memory rows in Prefill peak memory, NIAH cells in "
                            "Needle in a haystack.")
    by_suite: dict[str, list[dict]] = OrderedDict()
    for r in summary.get("results", []):
        if not _consumed(r):
            by_suite.setdefault(r.get("suite", "?"), []).append(r)
    for suite, rows in by_suite.items():
        repeats = Counter((r["check"], r["metric"], str(r.get("where", ""))) for r in rows)
        rows = sorted(rows, key=lambda r: r.get("passed") is not False)
        body = []
        for r in rows:
            where = _where(r.get("where", ""))
            if repeats[(r["check"], r["metric"], str(r.get("where", "")))] > 1:
                params = _params(r.get("details", {}).get("test", ""))
                where = f"{where} [{params}]" if params else where
            body.append([Cell(shorten(one_line(r["check"]), 120)), Cell(shorten(one_line(r["metric"]), 160)),
                         Cell(_value_text(r.get("value"))), Cell(_threshold_text(r.get("threshold"))),
                         _verdict_cell(r.get("passed")), Cell(where)])
        failed = sum(r.get("passed") is False for r in rows)
        body, omitted = _cap(body, limits.rows_per_table)
        title = f"{suite}: {len(rows)} row{'s' * (len(rows) != 1)}" + (f", {failed} failed" if failed else "")
        section.folds.append(Fold(title,
                                  [Table(["check", "metric", "value", "threshold", "verdict", "where"], body,
                                         ["l", "l", "r", "r", "l", "l"], omitted=omitted)], id=f"suite-{suite}"))
    if not section.folds:
        section.empty = "No other results were recorded."
    return section


def parse_md_table(text: str) -> Table | None:
    """A Markdown pipe table (a suite's `table` detail) as a Table; None when `text` holds none."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return None

    def cells(line: str) -> list[str]:
        line = line.strip()[1:]
        if line.endswith("|") and not line.endswith("\\|"):
            line = line[:-1]
        return [p.strip().replace("\\|", "|").replace("**", "") for p in re.split(r"(?<!\\)\|", line)]

    header = cells(lines[0])
    body = lines[1:]
    align = ["l"] * len(header)
    if body and set(body[0].replace("|", "").strip()) <= set("-: "):
        align = ["r" if c.endswith(":") else "l" for c in cells(body[0])]
        body = body[1:]
    rows = []
    for line in body:
        row = cells(line)
        row = (row + [""] * len(header))[: max(len(header), 1)]
        rows.append([Cell(c) for c in row])
    return Table(header, rows, (align + ["l"] * len(header))[: len(header)])


def tables_section(summary: dict) -> Section:
    section = Section("Tables recorded by suites", collapsed=True, fold_style="headings")
    sections: dict[str, dict] = OrderedDict()
    for r in summary.get("results", []):
        if r.get("details", {}).get("section"):
            sections[str(r["details"]["section"])] = r  # re-recorded as it grows: the last one holds every row
    for title, r in sections.items():
        table = parse_md_table(str(r["details"].get("table", "")))
        note = one_line(r["details"].get("note", ""))
        section.folds.append(Fold(title, [table] if table else [], [note] if note else [],
                                  pre="" if table else str(r["details"].get("table", "")),
                                  id=f"table-{_anchor(title)}"))
    if not section.folds:
        section.empty = "No suite recorded a whole table."
    return section


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def suites_section(summary: dict) -> Section:
    """Outcomes and where the time went, per suite (harness.run_times: set-up / compile / measure)."""
    section = Section("Suites", collapsed=True)
    times = {row["suite"]: row for row in summary.get("suite_times", [])}
    names = list(summary.get("suites", {})) + [n for n in times if n not in summary.get("suites", {}) and n != "total"]
    names.sort(key=lambda n: -times.get(n, {}).get("total_s", 0))
    body = []
    for name in names + (["total"] if "total" in times else []):
        c, t = summary.get("suites", {}).get(name, {}), times.get(name, {})
        if name == "total":
            c = Counter()
            for counts_ in summary.get("suites", {}).values():
                c.update(counts_)
        body.append([Cell(name), Cell(str(c.get("passed", 0))), Cell(str(c.get("failed", 0)), "fail" if c.get("failed") else None),
                     Cell(str(c.get("skipped", 0) + c.get(INCONCLUSIVE, 0))), Cell(str(c.get("error", 0)), "fail" if c.get("error") else None)]
                    + [Cell(f"{t[k]:.1f}" if is_number(t.get(k)) else "n/a") for k in ("setup_s", "compile_s", "measure_s", "total_s")])
    section.tables.append(Table(["suite", "passed", "failed", "skipped", "errors", "set-up s", "compile s", "measure s",
                                 "total s"], body, ["l"] + ["r"] * 8,
                                caption="Time: fixture set-up and teardown, torch.compile inside any phase "
                                        "(inductor, flex_attention, CUDA graphs), and the tests' own calls."
                                        + (" Summed over the processes below (process seconds, not wall time)."
                                           if summary.get("phases") else "")))
    if summary.get("phases"):  # harness.gate ran shards side by side, then the exclusive tests alone
        section.tables.append(Table(
            ["process", "selection", "exit", "wall s", "tests"],
            [[Cell(p["name"]), Cell(p.get("selection", "")), Cell(str(p.get("exit_status")), "fail" if p.get("exit_status") not in (0, 5) else None),
              Cell(f"{p['wall_time_s']:.1f}" if is_number(p.get("wall_time_s")) else "n/a"), Cell(str(p.get("tests", 0)))]
             for p in summary["phases"]], ["l", "l", "r", "r", "r"],
            caption="The gate's processes: the shards ran side by side, then the exclusive tests (speed, device "
                    "memory) alone on the device (harness.sharding). The exclusive process started with the "
                    "shards and waited for them, so its wall time includes that wait."))
    return section


def skips_section(summary: dict, limits: Limits) -> Section:
    section = Section("Skipped or inconclusive, and why", collapsed=True)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for o in summary.get("outcomes", []):
        if o.get("outcome") in ("skipped", INCONCLUSIVE):  # an inconclusive reason starts with the word
            reasons[clean_reason(o.get("reason"), limits.skip_reason_chars)][o.get("suite", "?")] += 1
    ordered = sorted(reasons.items(), key=lambda kv: -sum(kv[1].values()))
    body = [[Cell(str(sum(c.values()))), Cell(reason), Cell(", ".join(sorted(c)))] for reason, c in ordered]
    body, omitted = _cap(body, limits.rows_per_table)
    if body:
        section.tables.append(Table(["tests", "reason", "suites"], body, ["r", "l", "l"], omitted=omitted))
    else:
        section.empty = "Nothing was skipped."
    return section


def benchmarks_section(document: dict | None, limits: Limits) -> Section:
    section = Section("Benchmarks", collapsed=True,
                      intro="Every pytest-benchmark benchmark of the run (benchmarks.json holds every round); "
                            f"⚠ marks IQR above {NOISE_LIMIT:.0%} of the median.")
    benches = (document or {}).get("benchmarks") or []
    body = []
    for b in benches:
        stats, extra = b.get("stats") or {}, b.get("extra_info") or {}
        median, iqr = stats.get("median"), stats.get("iqr")
        noise = iqr / median if is_number(iqr) and is_number(median) and median > 0 else None
        body.append([Cell(b.get("name", "?"), code=True), Cell(str(extra.get("kind", "n/a"))),
                     Cell(fmt_int(extra.get("batch"))), Cell(fmt_int(extra.get("prompt_tokens"))),
                     Cell(fmt_int(extra.get("new_tokens"))), Cell(fmt_ms(median)), _noise_cell(noise),
                     Cell(fmt_int(stats.get("rounds")))])
    body, omitted = _cap(body, limits.rows_per_table)
    if body:
        section.tables.append(Table(["benchmark", "kind", "batch", "prompt tok", "new tok", "median ms", "IQR / median",
                                     "rounds"], body, ["l", "l", "r", "r", "r", "r", "r", "r"], omitted=omitted))
    else:
        error = (document or {}).get("error")
        section.empty = "No benchmark ran." + (f" ({one_line(error)})" if error else "")
    return section


def tracebacks_section(found: list[Failure], limits: Limits) -> Section:
    section = Section("Failure details and tracebacks", collapsed=True)
    for f in found:
        text = f.traceback or f.message or f.reason
        if len(text) > limits.traceback_chars:
            cut = len(text) - limits.traceback_chars
            text = f"[… {cut:,} characters cut; the end follows]\n" + text[cut:]
        notes = [f"{f.kind} ({f.when} phase): {f.reason}"]
        section.folds.append(Fold(f"{f.anchor}: {f.nodeid}", notes=notes, pre=text, id=f.anchor, command=f.command))
    if not found:
        section.empty = "No failures."
    return section


def environment_section(summary: dict) -> Section:
    env = summary.get("environment", {})
    section = Section("Run", collapsed=True)
    facts = [[Cell("started"), Cell(str(summary.get("started", "n/a")))],
             [Cell("wall time"), Cell(f"{summary.get('wall_time_s', 'n/a')} s")],
             [Cell("pytest exit status"), Cell(str(summary.get("exit_status", "n/a")))]]
    for m in summary.get("models", []):
        facts.append([Cell("model"), Cell(f"{m['name']} ({m.get('kind', '')}; "
                                          f"{'trained weights' if m.get('trained_weights') else 'random weights'})")])
    for key in ("gpu", "device", "dtype", "torch", "cuda", "transformers", "python"):
        if env.get(key):
            facts.append([Cell(key), Cell(str(env[key]))])
    for key, value in (summary.get("run") or {}).items():
        if value not in (None, "", [], ()):
            facts.append([Cell(f"option {key}"), Cell(strip_paths(one_line(value)))])
    section.tables.append(Table(["item", "value"], facts))
    return section


# ---------------------------------------------------------------------------------------------


def _weights_fact(model: dict, summary: dict) -> str:
    """What the run learnt about the weights (the plugin's "weights" row, harness.weights) beats what
    the model's kind implies: a user's checkpoint can be untrained."""
    if not model.get("trained_weights"):
        return "random weights (equivalence, memory and speed only)"
    evidence = next((r for r in summary.get("results", []) if r.get("check") == "weights"
                     and r.get("where") == model["name"]), None)
    if evidence is None:
        return "trained weights"
    if evidence.get("details", {}).get("looks_untrained"):
        return (f"weights look UNTRAINED: next-token entropy on the bundled prose is {evidence['value']:.2f} of "
                "a uniform distribution's; its quality checks are expected failures, equivalence, memory and "
                "speed still apply")
    return f"trained weights (next-token entropy {evidence['value']:.2f} of uniform)"


def build_view(summary: dict, benchmarks: dict | None = None, comparisons=(), *, run_dir: Path | None = None,
               limits: Limits | None = None, html_url: str = "") -> ReportView:
    limits = limits or Limits()
    comparisons = list(comparisons)
    found = failures(summary, comparisons)
    outcomes = Counter("error" if o.get("outcome") == "failed" and o.get("when", "call") != "call" else o.get("outcome")
                       for o in summary.get("outcomes", []))
    verdict = "FAIL" if summary.get("exit_status", 0) not in (0, None) or found else "PASS"
    kind_counts = counts(found)
    total = sum(outcomes.values())
    if found:
        by_kind = ", ".join(f"{n} {k}" for k, n in kind_counts.items())
        headline = f"{len(found)} failure{'s' * (len(found) != 1)}: {by_kind}."
    else:
        headline = "No failures: every check passed or was skipped with its reason."
    errors = outcomes.get("error", 0)
    headline += (f" {outcomes.get('passed', 0)} passed, {outcomes.get('failed', 0)} failed, "
                 f"{errors} error{'s' * (errors != 1)}, {outcomes.get('skipped', 0)} skipped"
                 + (f", {outcomes[INCONCLUSIVE]} inconclusive" if outcomes.get(INCONCLUSIVE) else "")
                 + (f", {outcomes['xfailed']} expected to fail" if outcomes.get("xfailed") else "") + f" ({total} test phases).")
    env = summary.get("environment", {})
    facts = []
    for m in summary.get("models", []):
        facts.append(f"Model {m['name']} ({m.get('kind', '')}; {_weights_fact(m, summary)})")
    get = lambda key: env.get(key, "n/a")  # noqa: E731
    facts.append(f"Device {env.get('gpu', get('device'))} ({get('device')}), dtype {get('dtype')}; "
                 f"torch {get('torch')}, transformers {get('transformers')}, Python {get('python')}")
    facts.append(f"Started {summary.get('started', 'n/a')}, wall time {summary.get('wall_time_s', 'n/a')} s, "
                 f"pytest exit status {summary.get('exit_status', 'n/a')}")
    if (summary.get("run") or {}).get("planted_fault"):
        facts.append(f"PLANTED FAULT ACTIVE: {summary['run']['planted_fault']} (HARNESS_PLANTED_FAULT): "
                     "this run is expected to fail")
    rows = benchmark_rows(benchmarks, summary)
    by_name = {c.name: c for c in comparisons if c.rule.field == "median"} or {c.name: c for c in comparisons}
    key = [memory_section(summary, limits), speed_section(summary, rows, by_name, limits, bool(comparisons)),
           quantization_section(summary, limits), niah_section(summary, run_dir), capability_section(summary)]
    details = [measurement_section(summary, limits), tables_section(summary), skips_section(summary, limits),
               benchmarks_section(benchmarks, limits), tracebacks_section(found, limits), suites_section(summary),
               environment_section(summary)]
    return ReportView(title=f"Inference validation report: {verdict}", verdict=verdict, headline=headline, facts=facts,
                      kind_counts=kind_counts, failures=found, key_sections=key, detail_sections=details,
                      html_url=html_url)

"""The report's speed view: one row per benchmarked configuration (pytest-benchmark's document and
the results suites recorded), with baseline deltas and noise, and the decode-speed section."""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict

from harness.reporting.elements import Cell, Limits, Plot, Section, Table, cap_rows, model_of, noise_cell, why_empty
from harness.reporting.text import NOISE_LIMIT, fmt_int, fmt_ms, fmt_pct, fmt_rate, fmt_signed_pct, is_number


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
            grouped[key]["model"] = grouped[key]["model"] or model_of(test, models)
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
            cells.append(noise_cell(r.get("noise")))
            if base:
                cells.append(_delta_cell(r, comparisons))
            short = str(r.get("name") or "").split("[")[0].removeprefix("test_").removeprefix(f"{kind}_")
            cells.append(Cell(short or "n/a", "muted", title=r.get("fullname")))
            body.append(cells)
        body, omitted = cap_rows(body, limits.rows_per_table)
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
                             "(python -m harness.reporting RUN_DIR --baseline FILE --max-regression 10%).")
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



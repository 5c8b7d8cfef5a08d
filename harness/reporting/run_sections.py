"""The report's run sections: capabilities, measurements by suite, recorded tables, suites and
their time, skips, benchmarks, tracebacks, the environment."""

from __future__ import annotations

import re
from collections import Counter, OrderedDict, defaultdict

from harness.performance.predictions import SCALING_CHECK
from harness.reporting.elements import Cell, Fold, Limits, Section, Table, cap_rows, noise_cell, params_of, parse_md_table, threshold_text, value_text, verdict_cell, where_text
from harness.reporting.text import (NOISE_LIMIT, clean_reason, fmt_int, fmt_ms, is_number, one_line, shorten,
                                    strip_paths)
from harness.reporting.triage import Failure
from harness.results import INCONCLUSIVE


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
            where = where_text(r.get("where", ""))
            if repeats[(r["check"], r["metric"], str(r.get("where", "")))] > 1:
                params = params_of(r.get("details", {}).get("test", ""))
                where = f"{where} [{params}]" if params else where
            body.append([Cell(shorten(one_line(r["check"]), 120)), Cell(shorten(one_line(r["metric"]), 160)),
                         Cell(value_text(r.get("value"))), Cell(threshold_text(r.get("threshold"))),
                         verdict_cell(r.get("passed")), Cell(where)])
        failed = sum(r.get("passed") is False for r in rows)
        body, omitted = cap_rows(body, limits.rows_per_table)
        title = f"{suite}: {len(rows)} row{'s' * (len(rows) != 1)}" + (f", {failed} failed" if failed else "")
        section.folds.append(Fold(title,
                                  [Table(["check", "metric", "value", "threshold", "verdict", "where"], body,
                                         ["l", "l", "r", "r", "l", "l"], omitted=omitted)], id=f"suite-{suite}"))
    if not section.folds:
        section.empty = "No other results were recorded."
    return section


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
    """Outcomes and where the time went, per suite (harness.performance.run_times: set-up / compile / measure)."""
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
        seconds = lambda value: Cell(f"{value:.1f}" if is_number(value) else "n/a")  # noqa: E731
        section.tables.append(Table(
            ["process", "selection", "exit", "start-up s", "waited s", "wall s", "tests"],
            [[Cell(p["name"]), Cell(p.get("selection", "")), Cell(str(p.get("exit_status")), "fail" if p.get("exit_status") not in (0, 5) else None),
              seconds(p.get("startup_s")), seconds(p.get("waited_s")), seconds(p.get("wall_time_s")), Cell(str(p.get("tests", 0)))]
             for p in summary["phases"]], ["l", "l", "r", "r", "r", "r", "r"],
            caption="The gate's processes: the shards ran side by side, then the exclusive tests (speed, device "
                    "memory) alone on the device (harness.sharding). Start-up: from the gate starting the "
                    "process to pytest's configure (imports, the model's files). The exclusive process started "
                    "with the shards, set up its beside_shards tests (compile warm-ups) and waited for them, so "
                    "its wall time includes that wait; its tests' times do not."))
    return section


def skips_section(summary: dict, limits: Limits) -> Section:
    section = Section("Skipped or inconclusive, and why", collapsed=True)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for o in summary.get("outcomes", []):
        if o.get("outcome") in ("skipped", INCONCLUSIVE):  # an inconclusive reason starts with the word
            reasons[clean_reason(o.get("reason"), limits.skip_reason_chars)][o.get("suite", "?")] += 1
    ordered = sorted(reasons.items(), key=lambda kv: -sum(kv[1].values()))
    body = [[Cell(str(sum(c.values()))), Cell(reason), Cell(", ".join(sorted(c)))] for reason, c in ordered]
    body, omitted = cap_rows(body, limits.rows_per_table)
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
                     Cell(fmt_int(extra.get("new_tokens"))), Cell(fmt_ms(median)), noise_cell(noise),
                     Cell(fmt_int(stats.get("rounds")))])
    body, omitted = cap_rows(body, limits.rows_per_table)
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
    for key in ("gpu", "cpu", "cpus", "device", "dtype", "torch", "cuda", "transformers", "python"):
        if env.get(key):
            facts.append([Cell(key), Cell(str(env[key]))])
    for key, value in (summary.get("run") or {}).items():
        if value not in (None, "", [], ()):
            facts.append([Cell(f"option {key}"), Cell(strip_paths(one_line(value)))])
    section.tables.append(Table(["item", "value"], facts))
    return section



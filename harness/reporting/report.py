"""The run's report: results.json (the data), capabilities.json, report.md and report.html (views).

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written report; `reports/latest` is a symlink swapped atomically.

report.md and report.html are two renderings of one view (harness.reporting.view) through the
templates in harness/reporting/templates/; report.md is sized for a GitHub job summary (under 1 MiB, no
images: plots are replaced by their tables and live in report.html). Re-render a run directory,
e.g. with a benchmark baseline, with

    python -m harness.reporting reports/latest --baseline reports/baseline.json --max-regression 10%
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from harness.reporting import text
from harness.backends.capabilities import dtype_name
from harness.performance.hardware import run_hardware
from harness.session import RunSession
from harness.sharding import gate_started, process_timeline
from harness.reporting.elements import Limits, ReportView
from harness.reporting.view import build_view

# GitHub rejects a job summary over 1 MiB; keep report.md under this many bytes.
MD_LIMIT_BYTES = 1_000_000
# Tighter limits tried in turn until report.md fits (the HTML report always gets the first).
_MD_LIMITS = (Limits(), Limits(rows_per_table=300, traceback_chars=4000),
              Limits(rows_per_table=60, traceback_chars=1200, skip_reason_chars=160),
              Limits(rows_per_table=15, traceback_chars=400, skip_reason_chars=120))
_MAX_FAILURES_IN_TRIAGE = 100
# Kept per failure in results.json: the message whole, the traceback's end.
_TRACEBACK_CHARS = 60000


def new_run_dir(report_root: Path, specs) -> Path:
    """reports/<UTC time>-<first model>/ (never an existing directory), with a `latest` link."""
    report_root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", specs[0].name if specs else "run")
    run_dir = report_root / f"{stamp}-{model}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = report_root / f"{stamp}-{model}-{n}"
    run_dir.mkdir(parents=True)
    link = report_root / "latest"
    tmp = report_root / f".latest-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass  # filesystems without symlinks: the newest directory is still the newest name
    return run_dir


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment(state) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(state.device),
           "dtype": dtype_name(state.dtype), "host": platform.node()}
    machine = run_hardware(state.device)
    env.update(cpu=machine["cpu"], cpus=machine["cpus"])
    if state.device.type == "cuda":
        env["gpu"] = machine["accelerator"]
        env["cuda"] = torch.version.cuda
    return env


def build_summary(state: RunSession, caps, exitstatus: int) -> dict:
    outcomes = state.outcomes
    per_suite: dict[str, Counter] = defaultdict(Counter)
    for row in outcomes:
        per_suite[row["suite"]][row["outcome"]] += 1
    run = state.run
    return {
        "exit_status": exitstatus,
        "verdict": "PASS" if exitstatus == 0 else "FAIL",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.started)),
        "wall_time_s": round(time.time() - state.started, 1),
        "models": [{"name": s.name, "kind": s.kind, "location": s.location, "trained_weights": s.trained}
                   for s in state.specs],
        "environment": _environment(state),
        "run": _run_options(run),
        "suites": {suite: dict(counts) for suite, counts in sorted(per_suite.items())},
        "suite_times": state.run_times.rows(),
        "outcomes": outcomes,
        "results": [r.to_dict() for r in state.records],
        "capabilities": [c.to_dict() for c in caps] + [c.to_dict() for rows in state.model_capabilities.values()
                                                        for c in rows],
        "tracebacks": state.failure_texts,
        **({"process": timeline} if (timeline := process_timeline(state.started, state.seconds_waited())) else {}),
    }


def _run_options(run) -> dict:
    if run is None:
        return {}
    return {"seed": run.seed, "attn": list(run.attn), "memory_budget_bytes": run.memory_budget_bytes,
            "thresholds_file": run.thresholds_file,
            "planted_fault": os.environ.get("HARNESS_PLANTED_FAULT") or None}  # harness.plugin's switch


def failure_texts(config) -> dict:
    """{'nodeid::when': {'message', 'traceback'}} of every failed or errored phase, whole, from the
    terminal reporter (called at session end; the outcome rows keep one line each)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", None) or {}
    out = {}
    for key in ("failed", "error"):
        for report in stats.get(key, []):
            nodeid = getattr(report, "nodeid", "") or "(collection)"
            longrepr = getattr(report, "longrepr", None)
            crash = getattr(longrepr, "reprcrash", None)
            message = crash.message if crash is not None and getattr(crash, "message", None) else ""
            try:
                traceback = report.longreprtext
            except Exception:  # a report type without a text form: the message will do
                traceback = str(longrepr or "")
            if len(traceback) > _TRACEBACK_CHARS:
                traceback = traceback[-_TRACEBACK_CHARS:]
            out[f"{nodeid}::{getattr(report, 'when', None) or 'collect'}"] = {
                "message": message or (traceback.strip().splitlines() or [""])[-1], "traceback": traceback}
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


class Raw(str):
    """Text already in Markdown form (built by the helpers below): not escaped again."""


def _finalize(value):
    if isinstance(value, Raw):
        return value
    return text.md_cell("" if value is None else value)


def md_table(table) -> Raw:
    if not table.columns:
        return Raw("")
    lines = ["| " + " | ".join(text.md_cell(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in table.align) + "|"]
    width = len(table.columns)
    for row in table.rows:
        cells = [(text.md_code(c.text) if c.code else text.md_cell(c.full_text)) for c in row]
        cells = (cells + [""] * width)[:width]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", text.md_cell(table.caption)]
    if table.omitted:
        lines += ["", f"{table.omitted:,} more rows are in report.html and results.json."]
    return Raw("\n".join(lines) + "\n")


def _link(label, target, external: bool = False) -> Raw:
    href = target if external else f"#{target}"
    return Raw(f"[{text.md_cell(label)}]({href.replace(' ', '%20').replace(')', '%29')})")


def _kind_line(view) -> Raw:
    counts = view.kind_counts
    return Raw(" · ".join(f"**{k} {counts[k]}**" if counts.get(k) else f"{k} 0" for k in view.kinds))


def _markdown_env():
    from harness.reporting.html_view import environment, summary_of

    env = environment(autoescape=False, finalize=_finalize)
    env.filters.update(mdtable=md_table, h=lambda s: Raw(html.escape(text.one_line(s))),
                       fenced=lambda s, lang="text": Raw(text.md_block(s, lang=lang)))
    env.globals.update(kind_line=_kind_line, link=_link, code=lambda s: Raw(text.md_code(s)), summary_of=summary_of,
                       links=lambda sections: Raw(" · ".join(_link(s.title, s.id) for s in sections)))
    return env


def render_markdown(view: ReportView, max_failures: int = _MAX_FAILURES_IN_TRIAGE) -> str:
    out = _markdown_env().get_template("report.md.j2").render(v=view, max_failures=max_failures)
    return re.sub(r"\n{3,}", "\n\n", out)


def markdown_within_limit(build, limit: int = MD_LIMIT_BYTES) -> str:
    """report.md from `build(limits) -> ReportView`, with tighter limits until it fits `limit` bytes;
    at the last resort the collapsed details are left to report.html."""
    for limits in _MD_LIMITS:
        md = render_markdown(build(limits), _MAX_FAILURES_IN_TRIAGE if limits is _MD_LIMITS[0] else 30)
        if len(md.encode()) <= limit:
            return md
    view = build(_MD_LIMITS[-1])
    for section in view.detail_sections:
        section.tables, section.folds, section.notes = [], [], []
        section.empty = "Left out of report.md to keep it under GitHub's 1 MiB job-summary limit: see report.html."
    md = render_markdown(view, 30)
    return md if len(md.encode()) <= limit else md.encode()[: limit - 200].decode(errors="ignore") + \
        "\n\n(cut at GitHub's 1 MiB job-summary limit: see report.html)\n"


# ---------------------------------------------------------------------------------------------
# Writing a run directory


def _comparisons(summary: dict, benchmarks: dict | None, baseline, max_regression: str):
    """Baseline comparisons (harness.performance.regression) of the run's benchmarks: computed when a baseline
    is given, else those stored in results.json by an earlier render."""
    from harness.performance.regression import Comparison, compare, parse_rule

    if baseline is not None and benchmarks and benchmarks.get("benchmarks"):
        found = compare(baseline, benchmarks, [f"median:{max_regression}"])
        summary["baseline"] = {"source": Path(str(baseline)).name if not isinstance(baseline, dict) else "document",
                               "rule": f"median:{max_regression}",
                               "comparisons": [{"name": c.name, "baseline": c.baseline, "current": c.current,
                                                "change": c.change, "regressed": c.regressed} for c in found]}
        return found
    stored = summary.get("baseline") or {}
    if stored.get("comparisons"):
        rule = parse_rule(stored["rule"])
        return [Comparison(c["name"], rule, c["baseline"], c["current"]) for c in stored["comparisons"]]
    return []


def render_run(run_dir: Path, summary: dict, benchmarks: dict | None = None, *, baseline=None,
               max_regression: str = "10%", html_url: str = "") -> dict:
    """Write report.md and report.html of `run_dir` from its data (and results.json when a
    baseline adds comparisons); returns the summary."""
    from harness.reporting.html_view import render_html

    comparisons = _comparisons(summary, benchmarks, baseline, max_regression)
    if any(c.regressed for c in comparisons):
        summary["verdict"] = "FAIL"
    if baseline is not None:
        atomic_write(run_dir / "results.json", json.dumps(summary, indent=1, default=str))

    def build(limits):
        return build_view(summary, benchmarks, comparisons, run_dir=run_dir, limits=limits, html_url=html_url)

    atomic_write(run_dir / "report.md", markdown_within_limit(build))
    atomic_write(run_dir / "report.html", render_html(build(Limits())))
    return summary


def write_report(run_dir: Path, state: RunSession, caps, exitstatus: int) -> dict:
    """The run's data files, and report.md / report.html from them unless the process is one part
    of a gate's run (harness.sharding.GATE_STARTED_VARIABLE: the gate renders the merged report)."""
    summary = build_summary(state, caps, exitstatus)
    atomic_write(run_dir / "results.json", json.dumps(summary, indent=1, default=str))
    atomic_write(run_dir / "capabilities.json", json.dumps(summary["capabilities"], indent=1))
    benchmarks = state.benchmarks  # pytest-benchmark's JSON document, when benchmarks ran
    if benchmarks:
        atomic_write(run_dir / "benchmarks.json", json.dumps(benchmarks, indent=1, default=str))
    if gate_started() is not None:
        return summary
    return render_run(run_dir, summary, benchmarks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.reporting",
                                     description="Re-render report.md and report.html of a run directory.")
    parser.add_argument("run_dir", type=Path, help="a run directory (reports/latest) holding results.json")
    parser.add_argument("--baseline", default=None, help="pytest-benchmark JSON of a baseline run: adds deltas and "
                        "speed-regression triage (results.json records the comparison)")
    parser.add_argument("--max-regression", default="10%",
                        help="allowed median slowdown vs the baseline (default 10%%)")
    parser.add_argument("--html-url", default="", help="where report.html will be published (linked from report.md)")
    args = parser.parse_args(argv)
    from harness.errors import HarnessUsageError

    try:
        summary = json.loads((args.run_dir / "results.json").read_text())
        bench_path = args.run_dir / "benchmarks.json"
        benchmarks = json.loads(bench_path.read_text()) if bench_path.is_file() else None
        render_run(args.run_dir, summary, benchmarks, baseline=args.baseline, max_regression=args.max_regression,
                   html_url=args.html_url)
    except (OSError, json.JSONDecodeError, HarnessUsageError) as exc:
        print(f"harness.reporting: {exc}", file=sys.stderr)
        return 2
    print(f"harness.reporting: wrote {args.run_dir / 'report.md'} and {args.run_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

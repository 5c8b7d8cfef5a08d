"""The run's report: results.json (the data), capabilities.json, report.md (a view of the data).

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written report; `reports/latest` is a symlink swapped atomically.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections import Counter, defaultdict
from pathlib import Path


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
           "transformers": transformers.__version__, "device": str(state["device"]),
           "dtype": str(state["dtype"]).removeprefix("torch."), "host": platform.node()}
    if state["device"].type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(state["device"])
        env["cuda"] = torch.version.cuda
    return env


def build_summary(state, caps, exitstatus: int) -> dict:
    outcomes = state["outcomes"]
    per_suite: dict[str, Counter] = defaultdict(Counter)
    for row in outcomes:
        per_suite[row["suite"]][row["outcome"]] += 1
    return {
        "exit_status": exitstatus,
        "verdict": "PASS" if exitstatus == 0 else "FAIL",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state["started"])),
        "wall_time_s": round(time.time() - state["started"], 1),
        "models": [{"name": s.name, "kind": s.kind, "location": s.location, "trained_weights": s.trained}
                   for s in state["specs"]],
        "environment": _environment(state),
        "suites": {suite: dict(counts) for suite, counts in sorted(per_suite.items())},
        "outcomes": outcomes,
        "results": [r.to_dict() for r in state["records"]],
        "capabilities": [c.to_dict() for c in caps],
    }


def render_markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"# Inference validation report: {summary['verdict']}", ""]
    lines.append(f"- Started {summary['started']}, wall time {summary['wall_time_s']} s, pytest exit status {summary['exit_status']}")
    for m in summary["models"]:
        weights = "trained weights" if m["trained_weights"] else "**random weights** (equivalence, memory and speed only)"
        lines.append(f"- Model `{m['name']}` ({m['kind']}; {weights})")
    device = env.get("gpu", env["device"])
    lines.append(f"- Device {device} ({env['device']}), dtype {env['dtype']}; torch {env['torch']}, "
                 f"transformers {env['transformers']}, Python {env['python']}")
    lines += ["", "## Suites", "", "| suite | passed | failed | skipped | errors |", "|---|---:|---:|---:|---:|"]
    for suite, c in summary["suites"].items():
        lines.append(f"| {suite} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('skipped', 0)} | {c.get('error', 0)} |")
    failures = [o for o in summary["outcomes"] if o["outcome"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- `{o['nodeid']}` ({o['when']}): {o['reason']}" for o in failures]
    if summary["results"]:
        lines += ["", "## Measurements", "", "| suite | check | metric | value | threshold | verdict | where |",
                  "|---|---|---|---:|---:|---|---|"]
        for r in summary["results"]:
            if r["details"].get("section"):
                continue  # a whole table, rendered in its own section below
            verdict = {True: "pass", False: "FAIL", None: "recorded"}[r["passed"]]
            lines.append(f"| {r['suite']} | {r['check']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['threshold'])} | {verdict} | {r['where']} |")
    heatmaps = [r for r in summary["results"] if r["check"] == "niah heatmap"]
    if heatmaps:
        lines += ["", "## Needle in a haystack", ""]
        for r in heatmaps:
            image = Path(str(r["where"])).name
            lines += [f"![needle retrieval heatmap]({image})", "", r["details"].get("table", ""), ""]
    sections: dict[str, dict] = {}
    for r in summary["results"]:
        if r["details"].get("section"):
            sections[r["details"]["section"]] = r  # re-recorded as it grows: the last one holds every row
    for title, r in sections.items():
        lines += ["", f"## {title}", "", r["details"].get("note", ""), "", r["details"]["table"]]
    lines += ["", "## Capability matrix", "", "| backend | category | available | detail / reason |", "|---|---|---|---|"]
    for c in summary["capabilities"]:
        lines.append(f"| {c['name']} | {c['category']} | {'yes' if c['available'] else 'no'} | {c['reason'].replace('|', '/')} |")
    skips = Counter(o["reason"] for o in summary["outcomes"] if o["outcome"] == "skipped")
    if skips:
        lines += ["", "## Skipped, and why", "", "| tests | reason |", "|---:|---|"]
        lines += [f"| {n} | {reason} |" for reason, n in skips.most_common()]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(run_dir: Path, state, caps, exitstatus: int) -> dict:
    summary = build_summary(state, caps, exitstatus)
    atomic_write(run_dir / "results.json", json.dumps(summary, indent=1, default=str))
    atomic_write(run_dir / "capabilities.json", json.dumps(summary["capabilities"], indent=1))
    from harness.report_html import benchmarks_markdown, render_html

    benchmarks = state.get("benchmarks")  # pytest-benchmark's JSON document, when benchmarks ran
    if benchmarks:
        atomic_write(run_dir / "benchmarks.json", json.dumps(benchmarks, indent=1, default=str))
    markdown = render_markdown(summary) + benchmarks_markdown(benchmarks)
    atomic_write(run_dir / "report.md", markdown)
    figures = sorted(run_dir.glob("niah-*.png"))  # written by the long-context suite into the run directory
    atomic_write(run_dir / "report.html", render_html(summary, markdown, benchmarks, figures))
    return summary

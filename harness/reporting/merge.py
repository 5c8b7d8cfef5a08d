"""One report from the run directories of several pytest processes (the gate's shards and its
exclusive phase, harness.sharding): results.json, benchmarks.json and junit.xml merged, the other
files (NIAH tables and plots) copied, report.md and report.html rendered from the merged data.

The merged results.json is what one process would have written, plus ``phases``: each process's
selection, exit status, start-up and wait (harness.sharding.process_timeline), wall time and test
count, so the report can say how the time was spent. The parts render no report of their own.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

from harness.reporting.report import atomic_write, render_run
from harness.performance.run_times import SuiteTime

# pytest's "no tests collected": a shard whose share was empty, not a failure of the run
NO_TESTS_COLLECTED = 5
_MERGED_FILES = {"results.json", "benchmarks.json", "junit.xml", "capabilities.json", "report.md", "report.html"}


def merged_exit_status(statuses: list[int]) -> int:
    """The run's status: the worst of the processes that ran tests (pytest's codes grow with
    severity: 1 tests failed, 2 interrupted, 3 internal error, 4 usage error)."""
    ran = [s for s in statuses if s != NO_TESTS_COLLECTED]
    return max(ran) if ran else NO_TESTS_COLLECTED


def merge_suite_times(row_lists: list[list[dict]]) -> list[dict]:
    """Per-suite set-up/compile/measure seconds summed over processes (process seconds, not wall)."""
    suites: dict[str, SuiteTime] = defaultdict(SuiteTime)
    for rows in row_lists:
        for row in rows:
            if row["suite"] == "total":
                continue
            times = suites[row["suite"]]
            times.setup_s += row["setup_s"]
            times.compile_s += row["compile_s"]
            times.measure_s += row["measure_s"]
            times.tests += row["tests"]
    ordered = sorted(suites.items(), key=lambda item: -item[1].total_s)
    total = SuiteTime(*(sum(getattr(t, name) for t in suites.values())
                        for name in ("setup_s", "compile_s", "measure_s", "tests")))
    return [{"suite": name, **times.to_dict()} for name, times in ordered] + [{"suite": "total", **total.to_dict()}]


def merge_summaries(parts: list[tuple[dict, dict]], wall_time_s: float) -> dict:
    """parts: (results.json of one process, its phase description) in run order."""
    summaries = [summary for summary, _ in parts]
    first = summaries[0]
    status = merged_exit_status([s["exit_status"] for s in summaries])
    outcomes = [row for s in summaries for row in s.get("outcomes", [])]
    per_suite: dict[str, Counter] = defaultdict(Counter)
    for row in outcomes:
        per_suite[row["suite"]][row["outcome"]] += 1
    tracebacks = {}
    for s in summaries:
        tracebacks.update(s.get("tracebacks") or {})
    return {
        **{key: value for key, value in first.items() if key != "process"},  # each part's timeline: in phases
        "exit_status": status,
        "verdict": "PASS" if status == 0 else "FAIL",
        "started": min(s["started"] for s in summaries if s.get("started")),
        "wall_time_s": round(wall_time_s, 1),
        "suites": {suite: dict(counts) for suite, counts in sorted(per_suite.items())},
        "suite_times": merge_suite_times([s.get("suite_times") or [] for s in summaries]),
        "outcomes": outcomes,
        "results": [row for s in summaries for row in s.get("results", [])],
        "capabilities": next((s["capabilities"] for s in summaries if s.get("capabilities")), []),
        "tracebacks": tracebacks,
        "phases": [{**phase, "exit_status": s["exit_status"], **(s.get("process") or {}), "wall_time_s": s.get("wall_time_s"),
                    "tests": len([r for r in s.get("outcomes", []) if r.get("when") == "call"])}
                   for s, phase in parts],
    }


def merge_benchmarks(documents: list[dict]) -> dict | None:
    documents = [d for d in documents if d]
    if not documents:
        return None
    merged = dict(documents[0])
    merged["benchmarks"] = [b for d in documents for b in d.get("benchmarks", [])]
    return merged


def merge_junit(paths: list[Path], out: Path) -> None:
    """One <testsuites> with one <testsuite> holding every process's test cases and their counts."""
    suites = [suite for path in paths if path.is_file() for suite in ET.parse(path).getroot().iter("testsuite")]
    if not suites:
        return
    merged = ET.Element("testsuite", dict(suites[0].attrib))
    for name in ("tests", "errors", "failures", "skipped"):
        merged.set(name, str(sum(int(s.get(name, 0)) for s in suites)))
    merged.set("time", f"{sum(float(s.get('time', 0)) for s in suites):.3f}")
    for suite in suites:
        merged.extend(list(suite))
    root = ET.Element("testsuites")
    root.append(merged)
    tmp = out.with_name(f".{out.name}.tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(out)


def merge_run_dirs(parts: list[tuple[Path, dict]], out_dir: Path, wall_time_s: float) -> dict:
    """Merge the run directories of `parts` ((directory, phase description), in run order) into
    `out_dir` and render its report; returns the merged summary. Parts without results.json (a
    process that died before writing it) are listed in ``phases`` with exit status 3."""
    loaded = []
    for directory, phase in parts:
        path = directory / "results.json"
        if path.is_file():
            loaded.append((json.loads(path.read_text()), phase))
        else:
            loaded.append(({"exit_status": 3, "started": "", "outcomes": [], "results": []},
                           {**phase, "note": "the process wrote no results.json"}))
    complete = [item for item in loaded if "environment" in item[0]]
    if not complete:
        raise FileNotFoundError(f"no process of this run wrote results.json under {[str(d) for d, _ in parts]}")
    ordered = complete + [item for item in loaded if item not in complete]  # the first summary gives the run's header
    summary = merge_summaries(ordered, wall_time_s)
    benchmarks = merge_benchmarks([json.loads((d / "benchmarks.json").read_text())
                                   for d, _ in parts if (d / "benchmarks.json").is_file()])
    for directory, _ in parts:
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if path.is_file() and path.name not in _MERGED_FILES and not (out_dir / path.name).exists():
                shutil.copy2(path, out_dir / path.name)
    merge_junit([d / "junit.xml" for d, _ in parts], out_dir / "junit.xml")
    atomic_write(out_dir / "results.json", json.dumps(summary, indent=1, default=str))
    atomic_write(out_dir / "capabilities.json", json.dumps(summary["capabilities"], indent=1))
    if benchmarks:
        atomic_write(out_dir / "benchmarks.json", json.dumps(benchmarks, indent=1, default=str))
    return render_run(out_dir, summary, benchmarks)

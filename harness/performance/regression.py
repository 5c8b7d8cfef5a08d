"""Regression gate over pytest-benchmark JSON: a later run against a saved baseline.

For time statistics pytest-benchmark's own options are the gate, and CI should use them:

    # once, on the reference commit, on the GPU runner (same machine type as every later run):
    pytest suites/test_benchmarks.py --model random:llama-7b \\
        --benchmark-storage=file://perf --benchmark-save=h100-baseline
    # on every change (fails the job when a benchmark's median is more than 10 % slower):
    pytest suites/test_benchmarks.py --model random:llama-7b \\
        --benchmark-storage=file://perf --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Keep perf/ (or the file it writes, perf/<machine id>/0001_h100-baseline.json) as a CI artifact or
commit it. Baselines are only comparable on the same hardware: pytest-benchmark's machine id names
the OS and Python alone, so the harness writes the CPU and device into machine_info
(harness.performance.hardware) and this module refuses a baseline from other hardware.

This module adds what those options cannot do: compare the figures the benchmarks put in
`extra_info` (tokens/s, MBU, MFU: higher is better), and compare two JSON files that live
anywhere (a committed baseline with a run's reports/<run>/benchmarks.json):

    python -m harness.performance.regression perf/.../0001_h100-baseline.json reports/latest/benchmarks.json \\
        --fail median:10% --fail extra_info.decode_tokens_per_s:10%

Rule syntax is pytest-benchmark's `FIELD:PERCENT%` or `FIELD:ABSOLUTE`: fail when FIELD got worse
by more than that. Stats fields (min, max, mean, median, stddev, iqr, ...) are times, so worse
is larger; `extra_info.NAME` figures are rates, so worse is smaller.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessUsageError
from harness.performance.hardware import check_same_hardware

STATS_FIELDS = ("min", "max", "mean", "median", "stddev", "iqr", "q1", "q3", "ld15iqr", "hd15iqr")
# What a benchmark times, as its extra_info records it: a baseline that generated another number of
# tokens, from other prompts or at another batch times other work, and its median says nothing
# about this run (e.g. a baseline recorded before the GPU decode benchmarks went from 32 to 16 tokens).
WORKLOAD_FIELDS = ("prompt_tokens", "new_tokens", "batch", "concurrency", "prompt_lengths", "workload",
                   "copy_buffer_bytes", "matmul_size")
_RULE = re.compile(r"^(?P<field>[A-Za-z_][\w.]*):(?P<value>[0-9]*\.?[0-9]+)(?P<percent>%?)$")


@dataclass(frozen=True)
class Rule:
    field: str           # "median" or "extra_info.decode_tokens_per_s"
    limit: float         # fraction (0.10) when relative, else absolute units of the field
    relative: bool

    @property
    def higher_is_better(self) -> bool:
        return self.field.startswith("extra_info.")

    def __str__(self) -> str:
        return f"{self.field}:{self.limit * 100:g}%" if self.relative else f"{self.field}:{self.limit:g}"


def parse_rule(text: str) -> Rule:
    match = _RULE.match(text.strip())
    if not match:
        raise HarnessUsageError(f"regression rule {text!r}: use FIELD:PERCENT% or FIELD:ABSOLUTE, e.g. median:10%")
    field = match["field"]
    if field not in STATS_FIELDS and not field.startswith("extra_info."):
        raise HarnessUsageError(f"regression rule {text!r}: field must be one of {', '.join(STATS_FIELDS)} or extra_info.NAME")
    value = float(match["value"])
    return Rule(field, value / 100 if match["percent"] else value, bool(match["percent"]))


@dataclass(frozen=True)
class Comparison:
    name: str
    rule: Rule
    baseline: float
    current: float

    @property
    def change(self) -> float:
        """Relative change, signed so that positive is worse."""
        if self.baseline == 0:
            return math.inf if self.current != self.baseline else 0.0
        delta = (self.current - self.baseline) / abs(self.baseline)
        return -delta if self.rule.higher_is_better else delta

    @property
    def regressed(self) -> bool:
        if self.rule.relative:
            return self.change > self.rule.limit
        worse = self.baseline - self.current if self.rule.higher_is_better else self.current - self.baseline
        return worse > self.rule.limit

    def describe(self) -> str:
        verdict = "REGRESSED" if self.regressed else "ok"
        return (f"{self.name}: {self.rule.field} {self.baseline:.6g} -> {self.current:.6g} "
                f"({self.change * 100:+.1f}% worse, limit {self.rule}) {verdict}")


def load_document(source) -> dict:
    """pytest-benchmark JSON (a path or the parsed document), checked to hold a benchmarks list."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise HarnessUsageError(f"{path}: not a readable pytest-benchmark JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise HarnessUsageError(f"{source if not isinstance(source, dict) else 'document'}: no 'benchmarks' list (not pytest-benchmark JSON)")
    return data


def load_benchmarks(source) -> dict[str, dict]:
    """pytest-benchmark JSON (a path or the parsed document) -> {fullname: benchmark}."""
    return {b["fullname"]: b for b in load_document(source)["benchmarks"]}


def _value(bench: dict, field: str):
    if field.startswith("extra_info."):
        return bench.get("extra_info", {}).get(field.removeprefix("extra_info."))
    return bench.get("stats", {}).get(field)


def workload_differences(base: dict, cur: dict) -> list[str]:
    """'FIELD baseline -> current' for every WORKLOAD_FIELDS entry the two benchmarks record differently."""
    before, after = base.get("extra_info", {}), cur.get("extra_info", {})
    return [f"{field} {before.get(field)!r} -> {after.get(field)!r}" for field in WORKLOAD_FIELDS
            if before.get(field) != after.get(field)]


def compare(baseline, current, rules) -> list[Comparison]:
    """Every (benchmark present in both, rule whose field both have) pair. A baseline from other
    hardware (harness.performance.hardware), or a benchmark that timed other work in it
    (WORKLOAD_FIELDS), is a usage error: no verdict can come from it."""
    rules = [parse_rule(r) if isinstance(r, str) else r for r in rules]
    base_doc, cur_doc = load_document(baseline), load_document(current)
    check_same_hardware(base_doc, cur_doc)
    base, cur = load_benchmarks(base_doc), load_benchmarks(cur_doc)
    shared = sorted(base.keys() & cur.keys())
    other_work = {name: diff for name in shared if (diff := workload_differences(base[name], cur[name]))}
    if other_work:
        name, diff = next(iter(other_work.items()))
        raise HarnessUsageError(
            f"the baseline timed other work in {len(other_work)} benchmark(s), e.g. {name}: {'; '.join(diff)}; "
            "record a new baseline with this version and profile (python -m harness.gate --save-baseline FILE)")
    found = []
    for name in shared:
        for rule in rules:
            before, after = _value(base[name], rule.field), _value(cur[name], rule.field)
            if isinstance(before, (int, float)) and isinstance(after, (int, float)):
                found.append(Comparison(name, rule, float(before), float(after)))
    return found


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harness.performance.regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="pytest-benchmark JSON of the baseline run")
    parser.add_argument("current", help="pytest-benchmark JSON of the run to judge")
    parser.add_argument("--fail", action="append", default=None, metavar="RULE",
                        help="FIELD:PERCENT%% or FIELD:ABSOLUTE (repeatable); default median:10%%")
    args = parser.parse_args(argv)
    try:
        comparisons = compare(args.baseline, args.current, args.fail or ["median:10%"])
    except HarnessUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not comparisons:
        print("error: the two files share no benchmark with the compared fields", file=sys.stderr)
        return 2
    for c in comparisons:
        print(c.describe())
    regressed = [c for c in comparisons if c.regressed]
    print(f"{len(regressed)} regression(s) in {len(comparisons)} comparison(s)")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())

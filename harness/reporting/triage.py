"""Failure triage: every failure of a run gets one kind, its one-line reason, the number that
decided it against its limit, and a next step.

The classification is the table below and nothing else: a failure is classified by the exception
that ended it, then by the check name of its failing result (harness.results.Result.check), then
by the suite file of its node id. Speed regressions come from comparing the run's benchmarks with
a baseline (harness.performance.regression), not from pytest outcomes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.reporting.text import clean_reason, fmt_num, fmt_threshold, one_line
from harness.results import suite_of

KINDS = ("equivalence", "agreement", "memory", "speed regression", "harness self-check", "error")

# What each kind means and what to do first. One line each: the report shows them beside every failure.
MEANING = {
    "equivalence": "an optimised path computed different outputs than its reference beyond the tolerance",
    "agreement": "a quality/agreement statistic (quantisation, retrieval, chat answer) crossed its threshold",
    "memory": "a peak exceeded its budget or prediction, or the device ran out of memory",
    "speed regression": "a benchmark got slower than the baseline by more than the gate's limit",
    "harness self-check": "the harness's own measurement (timer, reference, planted-fault control) is off: "
                          "numbers of that suite are not trustworthy until it is fixed",
    "error": "the test crashed (setup, teardown or an unexpected exception): no verdict was reached",
}
NEXT_STEP = {
    "equivalence": "Re-run the node alone (command in its traceback); fix the implementation at the first "
                   "diverging layer/step, not the tolerance.",
    "agreement": "Read the threshold's reason (harness/config.py); override it with --thresholds only if the "
                 "model legitimately differs.",
    "memory": "Compare measured and predicted peaks; raise --memory-budget only if the prediction grew too.",
    "speed regression": "Re-run on an idle machine; if it persists and the row is not noisy, bisect.",
    "harness self-check": "Fix the harness first: this suite's numbers are not trustworthy until then.",
    "error": "Read the traceback; fix the environment or the test, then re-run.",
}

# Exceptions that decide the kind by themselves (matched against the failure message's first word).
EXCEPTION_KIND = {
    "OutOfMemoryError": "memory", "torch.OutOfMemoryError": "memory", "torch.cuda.OutOfMemoryError": "memory",
    "MemoryBudgetExceeded": "memory",
}
# Check names (Result.check, matched as a prefix) whose failure decides the kind; they win over the suite.
CHECK_KIND = {
    "memory budget": "memory", "long prompt memory": "memory",
    "niah": "agreement", "chat": "agreement",
    "timer vs do_bench": "harness self-check", "device peak": "harness self-check",
    "speed regression": "speed regression",
}
# Suite file (stem of the node id's path) -> kind of an assertion failing there.
SUITE_KIND = {
    "test_attention_kernels": "equivalence", "test_attention_model": "equivalence",
    "test_attention_dispatch": "equivalence", "test_cache_equivalence": "equivalence",
    "test_decoding_shortcuts": "equivalence", "test_tensor_parallel": "equivalence",
    "test_long_context": "equivalence",
    "test_quantization": "agreement", "test_acceptance": "agreement",
    "test_memory": "memory", "test_kv_cache_memory": "memory",
    "test_benchmarks": "harness self-check",
}
# Node ids under these directories are the harness's own tests.
SELF_TEST_DIRS = ("tests/",)
# A failure message starting with one of these is an assertion (a verdict), not a crash.
ASSERTION_EXCEPTIONS = ("AssertionError", "Failed", "_pytest.outcomes.Failed")

_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exceeded|Failed|Interrupt|Exit)|Failed)\b:?")


@dataclass
class Failure:
    kind: str
    nodeid: str
    when: str
    reason: str                    # one line
    metric: str = ""
    value: str = ""                # the deciding number, formatted
    limit: str = ""
    anchor: str = ""               # of its folded traceback
    message: str = ""              # the full failure message
    traceback: str = ""
    command: str = ""              # to reproduce
    details: dict = field(default_factory=dict)

    @property
    def next_step(self) -> str:
        return NEXT_STEP[self.kind]

    @property
    def deciding(self) -> str:
        """'metric = value (limit L)', or '' when the failure recorded no number."""
        if not self.value:
            return ""
        number = f"{self.metric} = {self.value}" if self.metric else self.value
        return f"{number} (limit {self.limit or 'n/a'})"


def exception_name(message: str) -> str | None:
    match = _EXCEPTION.match(message.strip())
    return match.group(1) if match else None


def classify(outcome: dict, failing_checks: list[str], message: str = "") -> str:
    """The kind of one failed outcome row (see the tables above, applied in that order)."""
    text = message or outcome.get("reason", "")
    exc = exception_name(text)
    if exc in EXCEPTION_KIND or "out of memory" in text.lower():
        return "memory"
    for check in failing_checks:
        for prefix, kind in CHECK_KIND.items():
            if check.startswith(prefix):
                return kind
    if outcome.get("when", "call") != "call" or outcome.get("outcome") == "error":
        return "error"
    if exc and exc not in ASSERTION_EXCEPTIONS and not exc.endswith(".AssertionError"):
        return "error"
    nodeid = outcome.get("nodeid", "")
    if nodeid.startswith(SELF_TEST_DIRS):
        return "harness self-check"
    suite = outcome.get("suite") or suite_of(nodeid)
    return SUITE_KIND.get(suite, "error")


def reproduce_command(nodeid: str, summary: dict) -> str:
    env = summary.get("environment", {})
    run = summary.get("run", {})
    names = [m["name"] for m in summary.get("models", [])]
    params = nodeid.rpartition("[")[2] if nodeid.endswith("]") else ""
    named = [n for n in names if n and n in params]  # the test's own model, when its id names one
    models = ",".join(named[:1] or names) or "smollm2-135m"
    fault = [f"HARNESS_PLANTED_FAULT={run['planted_fault']}"] if run.get("planted_fault") else []
    parts = fault + ["pytest", f"'{nodeid}'", "--model", models, "--device", str(env.get("device", "auto")),
             "--dtype", str(env.get("dtype", "auto")), "-p", "no:cacheprovider"]
    if run.get("seed"):
        parts += ["--seed", str(run["seed"])]
    if run.get("thresholds_file"):
        parts += ["--thresholds", Path(str(run["thresholds_file"])).name]
    return " ".join(parts)


def failures(summary: dict, regressions=()) -> list[Failure]:
    """Every failure of the run, in KINDS order (stable within a kind)."""
    by_test: dict[str, list[dict]] = {}
    for r in summary.get("results", []):
        if r.get("passed") is False:
            by_test.setdefault(r.get("details", {}).get("test", ""), []).append(r)
    texts = summary.get("tracebacks", {})
    found: list[Failure] = []
    seen = set()
    for o in summary.get("outcomes", []):
        if o.get("outcome") not in ("failed", "error"):
            continue
        key = f"{o['nodeid']}::{o.get('when', 'call')}"
        seen.add(key)
        text = texts.get(key, {})
        message = text.get("message") or o.get("reason", "")
        results = by_test.get(o["nodeid"], [])
        kind = classify(o, [r["check"] for r in results], message)
        failure = Failure(kind=kind, nodeid=o["nodeid"], when=o.get("when", "call"),
                          reason=_one_line_reason(message),
                          message=message, traceback=text.get("traceback", ""),
                          command=reproduce_command(o["nodeid"], summary))
        if results:
            r = results[0]
            failure.metric, failure.value = r["metric"], fmt_num(r["value"])
            failure.limit = fmt_threshold(r["threshold"])
        else:
            failure.value, failure.limit = _numbers_from_message(message)
        found.append(failure)
    for key, text in texts.items():  # collection errors and others no outcome row holds
        if key not in seen:
            nodeid, _, when = key.rpartition("::")
            found.append(Failure(kind="error", nodeid=nodeid or key, when=when,
                                 reason=_one_line_reason(text.get("message", "")),
                                 message=text.get("message", ""), traceback=text.get("traceback", "")))
    for c in regressions:
        if c.regressed:
            found.append(Failure(kind="speed regression", nodeid=c.name, when="baseline",
                                 reason=one_line(f"{c.rule.field}: {c.baseline:.4g} -> {c.current:.4g}"),
                                 metric=f"{c.rule.field} change (positive is worse)", value=f"{c.change * 100:+.1f}%",
                                 limit=f"{c.rule.limit * 100:g}%" if c.rule.relative else f"{c.rule.limit:g}"))
    if not found and summary.get("exit_status", 0) not in (0, None):
        found.append(Failure(kind="error", nodeid="(session)", when="session",
                             reason=f"pytest exited with status {summary['exit_status']} without a failing test "
                                    "(collection error, interruption or usage error): see the console output"))
    order = {k: i for i, k in enumerate(KINDS)}
    found.sort(key=lambda f: order[f.kind])
    for i, f in enumerate(found, 1):
        f.anchor = f"failure-{i}"
    return found


def _one_line_reason(message: str) -> str:
    """The first non-empty line of a failure message, without the 'AssertionError:' prefix."""
    first = next((line for line in str(message).splitlines() if line.strip()), "")
    return clean_reason(re.sub(r"^(AssertionError|Failed): ", "", first.strip()), 160)


_LIMIT = re.compile(r"\(([^()]*?),?\s*(limit|threshold|allowed)\s*([^()]*?)\)")


def _numbers_from_message(message: str) -> tuple[str, str]:
    """'(+13.18%, limit ±3%)' -> ('+13.18%', '±3%'), when a failure recorded no result."""
    match = _LIMIT.search(one_line(message))
    if not match:
        return "", ""
    return match.group(1).strip(" ,"), match.group(3).strip()


def counts(found: list[Failure]) -> dict[str, int]:
    out = {k: 0 for k in KINDS}
    for f in found:
        out[f.kind] += 1
    return {k: n for k, n in out.items() if n}

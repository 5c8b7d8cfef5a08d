"""What the test runner says about the tests, as the report's data: one outcome row per test
phase and pytest-benchmark's JSON document. Read from the runner's objects by their attributes
(a test report, the run's config); no pytest import.
"""

from __future__ import annotations


from harness.results import skip_outcome, suite_of


def decides_outcome(report) -> bool:
    """The phase that decided a test's outcome: its call, or a set-up/teardown that did not pass."""
    return report.when == "call" or report.outcome != "passed"


def outcome_row(report, compile_s: float = 0.0) -> dict:
    """One results.json outcome row of a test phase's report: passed / failed / skipped, xfailed,
    or inconclusive (harness.results.skip_outcome), with its one-line reason, its duration and the
    part of it torch.compile took (harness.performance.run_times)."""
    reason, outcome = "", report.outcome
    if getattr(report, "wasxfail", None) is not None:  # pytest reports an expected failure as "skipped"
        reason, outcome = str(report.wasxfail), "xfailed"
    elif report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        outcome = skip_outcome(reason)
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = crash.message.splitlines()[0] if crash is not None and crash.message else str(report.longrepr).splitlines()[-1]
    return {"nodeid": report.nodeid, "suite": suite_of(report.nodeid), "when": report.when,
            "outcome": outcome, "duration_s": round(report.duration, 4),
            "compile_s": round(compile_s, 4), "reason": reason[:500]}


def benchmark_document(config) -> dict | None:
    """pytest-benchmark's JSON document for this run's benchmarks (None when none ran)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return None
    try:
        return config.hook.pytest_benchmark_generate_json(
            config=config, benchmarks=session.benchmarks, include_data=True,
            machine_info=session.get_machine_info(),
            commit_info=config.hook.pytest_benchmark_generate_commit_info(config=config))
    except Exception as exc:  # a report without benchmarks beats no report
        return {"benchmarks": [], "error": f"{type(exc).__name__}: {exc}"}


def benchmark_off_reason(config) -> str | None:
    """Why pytest-benchmark times nothing in this run (None when it does): --benchmark-disable, or it
    turned itself off (it does under pytest-xdist). It then runs each benchmark once with no
    statistics, from which no speed figure can be computed."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.disabled:
        return None
    if config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False):
        return "pytest-benchmark is disabled in this run (--benchmark-disable): the speed benchmarks need its timings"
    return ("pytest-benchmark turned itself off in this run (it does under pytest-xdist): run the speed "
            "benchmarks in one process (no -n)")

"""Memory budgets (issue 6): which budget holds for a test, and the block that holds it to it.

A budget comes from @pytest.mark.memory_budget("12GiB") on the test, else --memory-budget for the
whole run; it covers the test's call (fixtures load models beforehand, and what they hold counts:
the budget is for memory in use). harness.performance.memory says how each device is measured.
The plugin's pytest_runtest_call hook and memory_budget fixture are thin wrappers around these.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from harness.config import format_bytes, parse_bytes
from harness.errors import HarnessUsageError
from harness.results import Result, suite_of


def budget_for_test(nodeid: str, marker_args: tuple | None, run_budget: int | None) -> int | None:
    """The budget in bytes for the test `nodeid`: its memory_budget marker's arguments (None
    without a marker: the run's --memory-budget holds), or None for no budget. A malformed marker
    is a HarnessUsageError naming the test."""
    if marker_args is None:
        return run_budget
    if len(marker_args) != 1:
        raise HarnessUsageError(f"{nodeid}: memory_budget takes one size, e.g. memory_budget('12GiB')")
    if marker_args[0] is None:  # the test measures memory itself (e.g. runs eager over a budget on purpose)
        return None
    try:
        return parse_bytes(str(marker_args[0]))
    except HarnessUsageError as exc:
        raise HarnessUsageError(f"{nodeid}: memory_budget: {exc}") from None


def budget_bytes(size) -> int:
    """The memory_budget fixture's argument: a size as users write it ('2GiB') or a number of bytes."""
    return parse_bytes(size) if isinstance(size, str) else int(size)


def budget_result(nodeid: str, peak, budget: int, passed: bool) -> Result:
    """The report row of one budgeted block: its peak (a harness.performance.memory.MemoryPeak)
    against the budget."""
    return Result(
        suite=suite_of(nodeid), check="memory budget", metric="peak MiB",
        value=round(peak.peak_bytes / 2**20, 1), threshold=round(budget / 2**20, 1), passed=passed,
        where=peak.method, details={"test": nodeid, "budget": format_bytes(budget), **peak.to_dict()})


@contextlib.contextmanager
def budgeted(device, nodeid: str, budget: int, record: Callable[[Result], object], fail: Callable[[str], object]):
    """Measure the block on `device` (yields its MemoryPeak) and `record` its budget_result; over
    the budget, or out of memory inside it, call `fail(message)`, which must raise (the plugin's
    fails the test with the one message)."""
    from harness.performance.memory import MemoryBudgetExceeded, measure_peak

    try:
        with measure_peak(device, budget_bytes=budget) as peak:
            yield peak
    except MemoryBudgetExceeded as exc:
        record(budget_result(nodeid, exc.peak, budget, passed=False))
        message = str(exc)
    else:
        record(budget_result(nodeid, peak, budget, passed=True))
        return
    fail(message)  # outside the except: the OOM's frames (and tensors) are released

"""The conftest a pytester run gets to plant one fault from a tests/ module's FAULTS table.

Session-scoped and autouse, so the fault is active before the suites' own session fixtures run.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEMPLATE = '''
import sys
sys.path.insert(0, {repo!r})
import pytest
from tests.{module} import FAULTS

@pytest.fixture(scope="session", autouse=True)  # session: active before the suites' session fixtures run
def planted_fault():
    with FAULTS[{fault!r}]():
        yield
'''


def planted_fault_conftest(module: str, fault: str) -> str:
    """conftest.py text that activates ``FAULTS[fault]`` of ``tests/<module>.py`` for the whole run."""
    return TEMPLATE.format(repo=str(REPO), module=module, fault=fault)


def run_suite_with_fault(pytester, suite: str, *, model: str, selection: str, module: str, fault: str | None = None):
    """Run suites/<suite>.py in-process on `model` (``-k selection``), with ``FAULTS[fault]`` of
    ``tests/<module>.py`` planted (none: the control run)."""
    # another basename than the suite's own (the same process may have imported suites/ already),
    # next to the suites' shared fixtures, which the planted fault (if any) joins
    pytester.makepyfile(**{f"{suite}_under_test": (REPO / "suites" / f"{suite}.py").read_text()})
    conftest = (REPO / "suites" / "conftest.py").read_text()
    if fault:
        conftest += "\n" + planted_fault_conftest(module, fault)
    pytester.makeconftest(conftest)
    return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", model,
                                        "-k", selection, "-q")

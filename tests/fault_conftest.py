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

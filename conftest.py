"""Root conftest: loads the harness plugin in checkouts that are not pip-installed, and provides the
checkout's planted faults (HARNESS_PLANTED_FAULT) through the plugin's hook.

When the package is installed, pytest has already loaded the plugin through its pytest11 entry
point under the same name, and the pytest_plugins line is a no-op.
"""

pytest_plugins = ["harness.plugin"]


def pytest_harness_planted_fault(name):
    """tests/planted_faults.py's fault `name`, registered as transformers' "sdpa" attention."""
    from tests.planted_faults import activate_planted_fault

    activate_planted_fault(name)
    return True

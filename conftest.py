"""Root conftest: loads the harness plugin in checkouts that are not pip-installed.

When the package is installed, pytest has already loaded the plugin through its pytest11 entry
point under the same name, and this line is a no-op.
"""

pytest_plugins = ["harness.plugin"]

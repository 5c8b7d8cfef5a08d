"""Registries: one record per thing the harness can validate, read by the capability matrix, the
suites' parametrisation, the benchmarks and the report.

- ``harness.backends.attention``: attention backends (kernel, transformers name and context,
  capability probe, input limits per device and dtype);
- ``harness.backends.quantization``: quantization schemes (transformers config, weight and
  statistics bytes, capability row and probe, whether the memory and speed suites measure it);
- ``harness.backends.cache``: KV-cache types (builder, where it does not apply, lossy or not).

Adding a backend is one ``register(...)`` call in its registry module (plus its own test); no
suite file changes.
"""

from __future__ import annotations


from harness.errors import HarnessUsageError


class Registry(dict):
    """Records by name, in registration order; ``what`` names them in errors ("attention backend")."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, record):
        if record.name in self:
            raise ValueError(f"{self.what} {record.name!r} registered twice")
        self[record.name] = record
        return record

    def copy(self) -> "Registry":
        new = Registry(self.what)
        new.update(self)
        return new

    def get_record(self, name: str):
        """The record, or a one-line usage error listing the known names."""
        if name not in self:
            raise HarnessUsageError(f"unknown {self.what} {name!r}; known: {', '.join(self)}")
        return self[name]

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

"""Performance: does it fit and is it faster. Peak ``memory`` (its counters in ``memory_counters``),
device ``timing``, MBU/MFU against the device's measured peaks (``utilisation``),
the ``predictions`` measurements are held to (weight bytes, one KV-cache formula), the bytes a real
KV cache holds (``kv_cache``), serving memory and speed, the benchmark ``regression`` gate (against
a baseline from the same ``hardware`` only), where a run's time goes (``run_times``), per-test
``memory_budget``s and the persistent ``compile_cache``.
"""

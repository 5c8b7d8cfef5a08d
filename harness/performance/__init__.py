"""Performance: does it fit and is it faster. Peak ``memory`` and device ``timing`` (with MBU/MFU),
the ``predictions`` measurements are held to (weight bytes, one KV-cache formula), the bytes a real
KV cache holds (``kv_cache``), serving memory and speed, the benchmark ``regression`` gate, where a
run's time goes (``run_times``) and the persistent ``compile_cache``.
"""

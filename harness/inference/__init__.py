"""The inference paths under test, each returning plain data the equivalence rules compare:
greedy ``generation`` with every cache type, ``speculative`` (assisted and prompt-lookup) decoding,
continuous-batching ``serving``, and tensor-parallel runs (``tensor_parallel``'s session launches
``distributed``'s torchrun job, one ``tp_worker`` per rank).
"""

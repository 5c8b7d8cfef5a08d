"""Results one pytest-xdist run computes once for all its workers.

The workers of `pytest -n N` are separate processes, so a session fixture runs in every worker that
has a test needing it: the no-cache reference of the cache suite, the NIAH scores of one context
length, the tensor-parallel torchrun launch. On the 2-core CI machine each duplicate costs the
seconds the other worker needed for its own tests. `computed_once` lets the first worker that asks
compute and save the result in a folder only this run's workers share; the others wait for it
and load it.

Only an xdist worker gets a folder (`share_folder`): a plain run, a nested pytester run and
a subprocess (a planted fault, a gate shard) compute for themselves, so a result can never cross
into a run with other code, options or faults. Keys name what was computed; within one run every
worker has the same options, so the fixture and the model under test identify a result.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def share_folder(config) -> Path | None:
    """The folder the workers of this xdist run share (created), or None outside an xdist worker.
    A worker's base temp is ``<the run's base temp>/gwN``; the run id keeps runs apart."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput or "testrunuid" not in workerinput:
        return None
    base = getattr(config, "_tmp_path_factory", None)
    if base is None:
        return None
    folder = Path(base.getbasetemp()).parent / f"shared-{workerinput['testrunuid']}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def computed_once(folder: Path | None, key: str, compute):
    """compute(), once per run: the first worker to ask saves its result under ``folder``, later
    ones (waiting while it computes) load it. Without a folder, just compute(). A compute() that
    raises saves nothing: each asker then raises for itself."""
    if folder is None:
        return compute()
    import torch
    from filelock import FileLock

    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = Path(folder) / f"{name}.pt"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return torch.load(path, weights_only=False)["value"]
        value = compute()
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        torch.save({"key": key, "value": value}, partial)
        os.replace(partial, path)
        return value

"""One pytest-xdist worker per GPU: worker gwN sees only the N-th visible GPU, `-n auto` starts one
worker per GPU, and more workers than GPUs stop the run with one line (the plugin's
pytest_configure and pytest_xdist_auto_num_workers hooks). Workers inherit NVLink multicast off
(harness.inference.distributed).
"""

from __future__ import annotations

import os
import re

from harness.errors import HarnessUsageError
from harness.inference.distributed import force_multicast_off

# Set in a pinned xdist worker so that a second pytest_configure in the same process (pytester's
# in-process runs) keeps the first assignment instead of pinning within the already-pinned list.
PINNED_GPU_ENV = "LLM_HARNESS_PINNED_GPU"
_WORKER_ID = re.compile(r"^gw(\d+)$")


def xdist_worker_index(worker_id: str) -> int:
    """'gw3' -> 3."""
    match = _WORKER_ID.match(worker_id or "")
    if not match:
        raise HarnessUsageError(f"unexpected pytest-xdist worker id {worker_id!r}; expected gw<N>")
    return int(match.group(1))


def visible_gpu_ids(environ, gpu_count=None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs).

    With CUDA_VISIBLE_DEVICES set its entries are the answer, read without touching CUDA; otherwise
    `gpu_count()` (default torch.cuda.device_count, which asks NVML and so leaves CUDA uninitialised
    and CUDA_VISIBLE_DEVICES still effective) gives 0..n-1.
    """
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count
    return [str(i) for i in range(gpu_count())]


def gpu_for_worker(worker_id: str, worker_count: int, gpu_ids: list[str]) -> str:
    """The one GPU xdist worker `worker_id` of `worker_count` owns."""
    index = xdist_worker_index(worker_id)
    if worker_count > len(gpu_ids):
        raise HarnessUsageError(
            f"pytest-xdist started {worker_count} workers but {len(gpu_ids)} GPUs are visible "
            f"({','.join(gpu_ids)}); run with -n {len(gpu_ids)} so that each worker owns one GPU")
    return gpu_ids[index]


def setup_xdist_gpus(planned_workers: int = 0, environ=None, gpu_count=None) -> str | None:
    """The plugin's pytest_configure hook for `pytest -n N`. In an xdist worker: pin it to its GPU
    (pin_xdist_worker_to_gpu). In the controller, before any worker starts: refuse more workers
    than visible GPUs with a one-line error instead of N worker tracebacks. CPU hosts: no-op."""
    environ = os.environ if environ is None else environ
    if environ.get("PYTEST_XDIST_WORKER"):
        return pin_xdist_worker_to_gpu(environ, gpu_count)
    if planned_workers > 0:
        gpu_ids = visible_gpu_ids(environ, gpu_count)
        if gpu_ids:
            force_multicast_off(environ)  # workers inherit the controller's environment
            gpu_for_worker("gw0", planned_workers, gpu_ids)
    return None


def auto_worker_count(environ=None, gpu_count=None) -> int | None:
    """Workers for `pytest -n auto`: one per visible GPU, or None (xdist's default, one per CPU)
    on a host without GPUs. For the plugin's pytest_xdist_auto_num_workers hook."""
    gpu_ids = visible_gpu_ids(os.environ if environ is None else environ, gpu_count)
    return len(gpu_ids) or None


def pin_xdist_worker_to_gpu(environ=None, gpu_count=None) -> str | None:
    """In a pytest-xdist worker, make exactly one GPU visible: worker gwN gets the N-th visible GPU.

    Call before anything initialises CUDA (the plugin's pytest_configure): CUDA reads
    CUDA_VISIBLE_DEVICES once, at initialisation. Returns the GPU given to this worker, or None
    outside xdist or on a host without GPUs (workers then share the CPU).
    """
    environ = os.environ if environ is None else environ
    worker = environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return None
    force_multicast_off(environ)
    if environ.get(PINNED_GPU_ENV):
        return environ[PINNED_GPU_ENV]
    gpu_ids = visible_gpu_ids(environ, gpu_count)
    if not gpu_ids:
        return None
    worker_count = int(environ.get("PYTEST_XDIST_WORKER_COUNT") or xdist_worker_index(worker) + 1)
    gpu = gpu_for_worker(worker, worker_count, gpu_ids)
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    environ[PINNED_GPU_ENV] = gpu
    return gpu

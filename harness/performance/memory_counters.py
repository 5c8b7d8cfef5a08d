"""The counters harness.performance.memory's meters read: the exact CPU tensor-storage count
(`_StorageTracker`, a TorchDispatchMode), the process's resident set from /proc, the device's
used memory from NVML, and the thread that polls a reading for its maximum (`_Sampler`).
"""

from __future__ import annotations

import functools
import os
import re
import threading
import weakref


class _StorageTracker:
    """Exact count of CPU tensor storage created by aten ops while a CPU measurement runs.

    A `TorchDispatchMode` sees every aten op the block runs (composite ops arrive decomposed, so
    eager attention's matmul/softmax outputs are seen one by one). A returned tensor whose schema
    says it does not alias an input is a new storage: its bytes are added to the running count and
    a finaliser on the storage object subtracts them when it is freed (torch keeps one Python
    object per live storage, so the finaliser runs exactly when the memory goes back). Storage
    resized in place (out= kernels) is counted by its change in size. The count is a pure function
    of the ops the block runs: the same code gives the same peak, to the byte, in any process and
    under any load.

    Not counted: buffers a kernel allocates and frees inside one op (oneDNN/BLAS workspaces, the
    fused SDPA kernel's blocks), tensors made outside the dispatcher (torch.frombuffer, numpy,
    memory-mapped checkpoint files) and work on other threads; the method string says so."""

    METHOD = ("CPU: peak of live tensor storage created by aten ops in the block (TorchDispatchMode storage "
              "tracker, exact and repeatable; kernel-internal workspaces and memory-mapped files not counted); "
              "process resident set recorded, not compared")
    live = 0               # bytes of tracked storages alive now (only differences are meaningful)
    _sizes: dict = {}      # id(storage object) -> bytes counted for it
    _meters: list = []     # CPU measurements in progress, outermost first
    _mode = None

    @classmethod
    def enter(cls, meter) -> int:
        if not cls._meters:
            cls._mode = _dispatch_mode_class()(cls)
            cls._mode.__enter__()
        cls._meters.append(meter)
        return cls.live

    @classmethod
    def exit(cls, meter) -> int:
        cls._meters.remove(meter)
        if not cls._meters:
            mode, cls._mode = cls._mode, None
            mode.__exit__(None, None, None)
        return cls.live

    @classmethod
    def observe(cls, func, out) -> None:
        import torch

        outputs = out if isinstance(out, (tuple, list)) and len(func._schema.returns) > 1 else (out,)
        for ret, value in zip(func._schema.returns, outputs):
            fresh = ret.alias_info is None
            for tensor in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.layout == torch.strided:
                    cls._count(tensor.untyped_storage(), fresh)

    @classmethod
    def _count(cls, storage, fresh: bool) -> None:
        key, size = id(storage), storage.nbytes()
        known = cls._sizes.get(key)
        if known is None:
            if not fresh:
                return  # a view of, or a write into, storage made before the measurement
            weakref.finalize(storage, cls._free, key)
            known = 0
        elif known == size:
            return
        cls._sizes[key] = size
        cls.live += size - known
        if size > known:
            for meter in cls._meters:
                meter.note(cls.live)

    @classmethod
    def _free(cls, key) -> None:
        cls.live -= cls._sizes.pop(key, 0)


@functools.lru_cache(maxsize=1)
def _dispatch_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class _TrackingMode(TorchDispatchMode):
        def __init__(self, tracker):
            super().__init__()
            self.tracker = tracker

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.tracker.observe(func, out)
            return out

    return _TrackingMode


class _Sampler:
    """Polls read() on a daemon thread and keeps the maximum."""

    def __init__(self, read, interval: float):
        self.read, self.interval = read, interval
        self.first = self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="harness-memory-sampler")
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        return self.peak


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) * 1024


def _proc_rss() -> int:
    try:
        return _proc_status("VmRSS")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


@functools.lru_cache(maxsize=1)
def _can_reset_hwm() -> bool:
    """Whether this kernel lets the process reset its own high-water mark (checked without
    resetting it, so a measurement in progress keeps its peak)."""
    try:
        _proc_status("VmHWM")
    except (OSError, AttributeError):
        return False
    return os.access("/proc/self/clear_refs", os.W_OK)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _nvml_handle(device):
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:  # CUDA and NVML can number devices differently (CUDA_VISIBLE_DEVICES)
            text = str(uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:
        return None


def _nvml_used(handle) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

"""Peak memory of a block of code, and the predictions to compare it with.

Measurement (`measure_peak`), per device:
- CUDA: the PyTorch allocator's own peak counters (reset at the start of the block) *and* the
  device's used memory from NVML, polled every 10 ms by a thread (as optimum-benchmark does), so
  memory allocated outside PyTorch's allocator (cuBLAS workspaces, NCCL, other libraries, the CUDA
  context) counts too. The number compared with a budget is the larger of the two.
- CPU: the live bytes of tensor storage the block's aten ops create, counted exactly by a
  TorchDispatchMode with a finaliser on each new storage (`_StorageTracker`): the same code gives
  the same peak to the byte in any process, under any load. The process's resident set (kernel
  high-water mark, reset through /proc/self/clear_refs) is recorded beside it and decides nothing:
  it moved with the allocator's history and the machine's load (CI failed 2 of 2 runs on it).
Measurements nest: an inner block folds its peak into the blocks around it. What the
measurements are compared with: harness.performance.predictions; the counters the meters read
(storage tracker, /proc, NVML): harness.performance.memory_counters.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

from harness.config import format_bytes
from harness.performance.memory_counters import (_can_reset_hwm, _nvml_handle, _nvml_used, _proc_rss, _proc_status,
                                                 _reset_hwm, _Sampler, _StorageTracker)

NVML_POLL_S = 0.010


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class MemoryPeak:
    """What a measured block used. `start/peak/end_bytes` are the budgeted quantity: device memory
    in use (CUDA: max of allocator reserved and NVML used) or, on CPU, the process's resident set
    at the start plus the block's exact tensor-storage peak. `torch_allocated_*` is the exact count
    that increase/retained come from: the CUDA allocator's, or the CPU storage tracker's."""

    device: str
    method: str
    start_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0
    torch_allocated_start: int | None = None
    torch_allocated_peak: int | None = None
    torch_allocated_end: int | None = None
    torch_reserved_peak: int | None = None
    nvml_used_peak: int | None = None
    rss_start_bytes: int | None = None  # CPU: the process's resident set, recorded for reference only
    rss_peak_bytes: int | None = None
    rss_end_bytes: int | None = None
    out_of_memory: str | None = None

    @property
    def increase_bytes(self) -> int:
        """Peak extra memory of the block, from the most precise counter available."""
        if self.torch_allocated_peak is not None:
            return self.torch_allocated_peak - self.torch_allocated_start
        return self.peak_bytes - self.start_bytes

    @property
    def retained_bytes(self) -> int:
        """Memory still held at the end of the block (e.g. loaded weights, a filled cache)."""
        if self.torch_allocated_end is not None:
            return self.torch_allocated_end - self.torch_allocated_start
        return self.end_bytes - self.start_bytes

    def describe(self) -> str:
        parts = [f"peak {format_bytes(self.peak_bytes)}", f"at start {format_bytes(self.start_bytes)}",
                 f"increase {format_bytes(self.increase_bytes)}"]
        if self.torch_reserved_peak is not None:
            parts.append(f"torch allocated peak {format_bytes(self.torch_allocated_peak)}, "
                         f"reserved peak {format_bytes(self.torch_reserved_peak)}")
        if self.nvml_used_peak is not None:
            parts.append(f"NVML device used peak {format_bytes(self.nvml_used_peak)}")
        if self.rss_peak_bytes is not None:
            parts.append(f"resident set high-water {format_bytes(self.rss_peak_bytes)} (not compared)")
        return "; ".join(parts) + f" [method: {self.method}]"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "increase_bytes": self.increase_bytes, "retained_bytes": self.retained_bytes}


class MemoryBudgetExceeded(Exception):
    """A budgeted block's peak went over its budget, or it ran out of memory."""

    def __init__(self, peak: MemoryPeak, budget_bytes: int):
        self.peak, self.budget_bytes = peak, budget_bytes
        if peak.out_of_memory:
            head = (f"memory budget {format_bytes(budget_bytes)}: out of memory inside the budgeted block "
                    f"({peak.out_of_memory})")
        else:
            head = (f"memory budget exceeded: peak {format_bytes(peak.peak_bytes)} > budget "
                    f"{format_bytes(budget_bytes)} (over by {format_bytes(peak.peak_bytes - budget_bytes)})")
        super().__init__(f"{head}; {peak.describe()}")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    if isinstance(exc, oom_types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)


_ACTIVE: list["_Meter"] = []  # measurements in progress, outermost first


@contextlib.contextmanager
def measure_peak(device, budget_bytes: int | None = None):
    """Measure the block's peak memory on `device`; yields a MemoryPeak filled in at exit.

    With `budget_bytes`, a peak above it, or an out-of-memory error inside the block, raises
    MemoryBudgetExceeded (chained to the OOM). Without, an OOM is recorded in the MemoryPeak's
    `out_of_memory` and re-raised."""
    import torch

    device = torch.device(device)
    meter = _CudaMeter(device) if device.type == "cuda" else _CpuMeter()
    if _ACTIVE:  # the reset below would erase the outer blocks' peaks so far: hand them over first
        snapshot = meter.peaks_before_reset()
        for outer in _ACTIVE:
            outer.fold(*snapshot)
    meter.start()
    _ACTIVE.append(meter)
    try:
        yield meter.result
    except BaseException as exc:
        _ACTIVE.remove(meter)
        meter.stop()
        _fold_into_outer(meter)
        if is_out_of_memory(exc):
            meter.result.out_of_memory = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if budget_bytes is not None:
                raise MemoryBudgetExceeded(meter.result, budget_bytes) from exc
        raise
    _ACTIVE.remove(meter)
    meter.stop()
    _fold_into_outer(meter)
    if budget_bytes is not None and meter.result.peak_bytes > budget_bytes:
        raise MemoryBudgetExceeded(meter.result, budget_bytes)


def _fold_into_outer(meter) -> None:
    for outer in _ACTIVE:
        outer.fold(meter.result.peak_bytes, meter.result.torch_allocated_peak, meter.result.torch_reserved_peak,
                   meter.result.nvml_used_peak)


class _Meter:
    result: MemoryPeak

    def __init__(self):
        self._folded = [0, None, None, None]  # peaks seen by inner blocks (before their resets)

    def fold(self, peak, allocated=None, reserved=None, nvml=None) -> None:
        for i, value in enumerate((peak, allocated, reserved, nvml)):
            if value is not None:
                self._folded[i] = max(self._folded[i] or 0, value)

    def _max(self, i, value):
        return value if self._folded[i] is None or value is None else max(value, self._folded[i])


class _CpuMeter(_Meter):
    """The block's live tensor storage, counted exactly by `_StorageTracker`; the process's resident
    set is recorded beside it (`rss_*`), but decides nothing: it depends on the allocator's history
    and on what else the machine does (CI: the same prefill measured 0.86 and -1.10 score matrices)."""

    def __init__(self):
        super().__init__()
        self.result = MemoryPeak(device="cpu", method=_StorageTracker.METHOD)
        self._rss_resettable = _can_reset_hwm()

    def peaks_before_reset(self):
        return (None,)  # the tracker keeps one running count; an inner block resets nothing

    def start(self) -> None:
        r = self.result
        # Frees decided by the cycle collector would land inside the block at a moment that depends
        # on the whole process's allocation history: off for the block, so the count is repeatable.
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        r.rss_start_bytes = _proc_rss()
        if self._rss_resettable:
            _reset_hwm()
        r.torch_allocated_start = _StorageTracker.enter(self)
        r.torch_allocated_peak = r.torch_allocated_start

    def note(self, live: int) -> None:
        """Called by the tracker after each allocation while this block runs."""
        if live > self.result.torch_allocated_peak:
            self.result.torch_allocated_peak = live

    def stop(self) -> None:
        r = self.result
        r.torch_allocated_end = _StorageTracker.exit(self)
        r.rss_peak_bytes = _proc_status("VmHWM") if self._rss_resettable else None
        r.rss_end_bytes = _proc_rss()
        if self._gc_was_enabled:
            gc.enable()
        # What a budget compares: the process as it was at the start plus the block's tensor peak.
        r.start_bytes = r.rss_start_bytes
        r.peak_bytes = r.rss_start_bytes + max(0, r.increase_bytes)
        r.end_bytes = r.rss_start_bytes + r.retained_bytes


class _CudaMeter(_Meter):
    def __init__(self, device):
        super().__init__()
        import torch

        self.torch, self.device = torch, device
        from harness.sharding import SHARED_DEVICE_VARIABLE, device_is_shared

        shared = device_is_shared()
        self.nvml = None if shared else _nvml_handle(device)
        method = "CUDA: torch allocator peaks (reset at start) + NVML device used memory polled every 10 ms"
        if shared:  # NVML reads the whole device, so the other processes' memory too
            method = (f"CUDA: torch allocator peaks (reset at start); NVML not read: other processes share "
                      f"the device (${SHARED_DEVICE_VARIABLE})")
        elif self.nvml is None:
            method = "CUDA: torch allocator peaks (reset at start); NVML unavailable, so memory outside PyTorch is not counted"
        self.result = MemoryPeak(device=str(device), method=method)
        self._sampler = None

    def peaks_before_reset(self):
        t = self.torch
        reserved = t.cuda.max_memory_reserved(self.device)
        return reserved, t.cuda.max_memory_allocated(self.device), reserved, None

    def start(self) -> None:
        t, r = self.torch, self.result
        t.cuda.synchronize(self.device)
        gc.collect(1)
        t.cuda.reset_peak_memory_stats(self.device)
        r.torch_allocated_start = t.cuda.memory_allocated(self.device)
        used = t.cuda.memory_reserved(self.device)
        if self.nvml is not None:
            self._sampler = _Sampler(lambda: _nvml_used(self.nvml), NVML_POLL_S)
            used = max(used, self._sampler.first)
        r.start_bytes = used

    def stop(self) -> None:
        t, r = self.torch, self.result
        with contextlib.suppress(RuntimeError):  # a device error already raised is the one to report
            t.cuda.synchronize(self.device)
        r.torch_allocated_peak = self._max(1, t.cuda.max_memory_allocated(self.device))
        r.torch_reserved_peak = self._max(2, t.cuda.max_memory_reserved(self.device))
        r.torch_allocated_end = t.cuda.memory_allocated(self.device)
        end = t.cuda.memory_reserved(self.device)
        if self._sampler is not None:
            r.nvml_used_peak = self._max(3, self._sampler.stop())
            end = max(end, _nvml_used(self.nvml))
        r.end_bytes = end
        r.peak_bytes = max(self._max(0, r.torch_reserved_peak), r.nvml_used_peak or 0, r.start_bytes, end)


MODEL_STORAGE_METHOD = ("unique storage bytes of the model's parameters and buffers (checkpoints are memory-mapped "
                        "on CPU, so no allocation counter sees them)")


def model_storage_bytes(model) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers: tied weights count
    once, a dtype or layout other than the one predicted shows in full."""
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def release_device_memory(device) -> None:
    """Drop garbage and return cached blocks, so the next measurement starts from live memory."""
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


_startup_frozen = False


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, collected tests) out of the cycle collector's
    reach. A full collection then walks only what the tests create: with torch, transformers and
    ~2,000 collected tests alive, each of the run's ~150 full collections per process (every
    release_device_memory() call and CPython's own) walked ~420,000 objects for ~0.25 s, ~45 s
    of a CI worker. Objects created later (models, caches, references) are collected as before.
    Once per process (nothing is frozen yet): a nested pytest run (pytester) would otherwise freeze
    the outer run's models, and a model in a reference cycle would then never be freed."""
    global _startup_frozen
    # the flag first: gc.get_freeze_count() walks the frozen objects (~45 ms each call once ~420,000
    # are frozen), and every nested pytest run of the process asks again
    if _startup_frozen or gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()
    _startup_frozen = True

"""Device-synchronised timing, the device's measured peaks, and MBU/MFU.

- `device_timer` is a drop-in timer for pytest-benchmark (`@pytest.mark.benchmark(timer=...)`):
  on CUDA it reads the GPU's timeline through CUDA events (waiting for queued work), so a
  benchmark times the GPU work, not the kernel launches; on CPU it is perf_counter.
- `time_calls` times single calls either with that timer or with CUDA events (what
  `triton.testing.do_bench` uses); suites compare the two.
- `measure_copy_bandwidth` and `measure_matmul_peak` measure, once per run, what the device really
  does (not its data-sheet numbers); MBU and MFU are ratios to those.
- `TokenClock` is a generate() streamer that timestamps every new token, which splits one
  generate call into time to first token and per-token decode latencies.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def host_synchronized_timer() -> float:
    """perf_counter after all queued CUDA work on this process's devices has finished (gpt-fast's
    pattern). Kept as the comparison point: on the H100 it read 15-18 % above triton's do_bench on
    12 ms kernels, so it is not the timer benchmarks use."""
    if _cuda_in_use():
        import torch

        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    return time.perf_counter()


class _EventClock:
    """Seconds on the GPU's own timeline: a CUDA event is recorded on the current stream, waited
    for, and its distance to an anchor event is added to the host time taken at the anchor.

    The anchor is renewed every `anchor_seconds` because cudaEventElapsedTime returns float32
    milliseconds (resolution ~1 us at 10 s); a renewal costs one synchronisation and shifts the
    reading by at most the host's wake-up latency after it (microseconds)."""

    anchor_seconds = 10.0

    def __init__(self):
        self._anchor = None
        self._anchor_host = 0.0
        self._anchor_device = None

    def __call__(self) -> float:
        import torch

        device = torch.cuda.current_device()
        if self._anchor is None or self._anchor_device != device or self._age() > self.anchor_seconds:
            torch.cuda.synchronize(device)
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record()
            self._anchor.synchronize()
            self._anchor_host, self._anchor_device = time.perf_counter(), device
            return self._anchor_host
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        return self._anchor_host + self._anchor.elapsed_time(event) / 1000.0

    def _age(self) -> float:
        return time.perf_counter() - self._anchor_host


_event_clock = _EventClock()


def device_timer() -> float:
    """The benchmarks' clock: with CUDA in use, the GPU timeline read through CUDA events (what
    triton's do_bench and the CUDA-event path of `time_calls` use; within 2-3 % of do_bench on the
    H100); otherwise time.perf_counter. Each reading waits for the work queued before it."""
    if _cuda_in_use():
        return _event_clock()
    return time.perf_counter()


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, *, warmup: int = 3, repeats: int = 20, method: str = "timer") -> list[float]:
    """Seconds taken by each of `repeats` calls of fn() after `warmup` calls.

    method "timer": device_timer around each call (the pytest-benchmark path);
    method "host_sync": host_synchronized_timer around each call (synchronise + perf_counter);
    method "events": CUDA events recorded around back-to-back calls on the current stream."""
    import torch

    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if method == "events":
        if device.type != "cuda":
            raise ValueError("CUDA events need a CUDA device")
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1000.0 for s, e in zip(starts, ends)]
    clocks = {"timer": device_timer, "host_sync": host_synchronized_timer}
    if method not in clocks:
        raise ValueError(f"unknown timing method {method!r}")
    clock = clocks[method]
    samples = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def percentile(samples, q: float) -> float:
    """q in [0, 100], linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(samples, dtype=float), q))


@dataclass(frozen=True)
class DevicePeaks:
    """What this device achieved on the two operations that bound LLM inference."""

    device: str
    copy_bytes_per_s: float   # (read + write) bytes per second of a large device-to-device copy
    copy_buffer_bytes: int
    matmul_flops_per_s: float  # dense square matmul in `matmul_dtype`
    matmul_size: int
    matmul_dtype: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def measure_copy_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> tuple[float, int]:
    """Median (read+write) bytes/s of copying a buffer far larger than the caches."""
    import torch

    device = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = statistics.median(time_calls(lambda: dst.copy_(src), device, warmup=2, repeats=repeats))
    return 2 * src.numel() * 4 / seconds, src.numel() * 4


def measure_matmul_peak(device, dtype, size: int | None = None, repeats: int = 10) -> tuple[float, int]:
    """Median FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype`."""
    import torch

    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b), device, warmup=3, repeats=repeats))
    return 2 * n**3 / seconds, n


def measure_device_peaks(device, dtype) -> DevicePeaks:
    import torch

    copy, nbytes = measure_copy_bandwidth(device)
    flops, n = measure_matmul_peak(device, dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return DevicePeaks(str(device), copy, nbytes, flops, n, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------
# Utilisation


def decode_bytes_per_step(counts, weight_bytes: int, kv_bytes_per_token: int, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight except the input embedding table (of which
    only `batch` rows are read, unless it is tied to the LM head, which reads it all), plus the
    KV cache of `context` tokens for each sequence."""
    if counts.tied or counts.total == 0:
        weights = weight_bytes
    else:
        weights = weight_bytes - weight_bytes * counts.input_embedding // counts.total
    return int(weights + kv_bytes_per_token * batch * context)


def prefill_flops(counts, shape, batch: int, seq_len: int) -> float:
    """FLOPs of a prefill that computes logits for the last position only (as generate does):
    2 per weight per token for the linear layers, 2 x vocab x hidden for the one LM-head row
    (input-embedding lookups are free), and causal attention's QK^T and PV: 2 x 2 x N^2/2 x
    heads x head_dim per layer."""
    lm_head = counts.output_embedding or (counts.input_embedding if counts.tied else 0)
    linear = 2.0 * batch * seq_len * counts.linear + 2.0 * batch * lm_head
    attention = 2.0 * batch * shape.layers * seq_len * seq_len * shape.heads * shape.head_dim
    return linear + attention


def utilisation(work: float, seconds: float, peak_per_s: float) -> float:
    """MBU (work in bytes, peak in bytes/s) or MFU (work in FLOPs, peak in FLOP/s)."""
    return work / seconds / peak_per_s if seconds > 0 and peak_per_s > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Per-token timestamps from generate()


class TokenClock:
    """A generate() streamer (duck-typed: put/end) recording when each new token reaches the host.

    generate() puts the prompt first, then each step's tokens (moving them to the host, which
    already waits for the device). Call `start()` right before generate()."""

    def __init__(self):
        self.t0 = None
        self.stamps: list[float] = []
        self._prompt_seen = False

    def start(self) -> None:
        self.t0 = device_timer()
        self.stamps = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(device_timer())

    def end(self) -> None:
        pass

    @property
    def time_to_first_token(self) -> float:
        return self.stamps[0] - self.t0

    @property
    def token_latencies(self) -> list[float]:
        """Seconds between consecutive new tokens (the decode steps after the first token)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

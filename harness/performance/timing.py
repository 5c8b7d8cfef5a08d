"""Device-synchronised timing (the device's measured peaks and MBU/MFU: harness.performance.utilisation).

- `do_bench_times` times single GPU calls the way `triton.testing.do_bench` does (CUDA events
  around each call, the L2 cache flushed before each, one synchronisation at the end) and returns
  every call's seconds; on CPU it is perf_counter per call.
- `replay_times` hands such per-call times to pytest-benchmark (through the `replay_clock`
  timer), so its statistics, JSON, --benchmark-save/--benchmark-compare(-fail) are those of the
  do_bench-style measurement. Benchmarks of one GPU call use these two.
- `device_timer` is a drop-in timer for pytest-benchmark (`@pytest.mark.benchmark(timer=...)`):
  on CUDA it reads the GPU's timeline through CUDA events, waiting for queued work at every
  reading; the generate() benchmarks (whole calls, tokens timestamped on the host) use it.
- `time_calls` times single calls by one of these methods; suites compare them with do_bench.
- `TokenClock` is a generate() streamer that timestamps every new token, which splits one
  generate call into time to first token and per-token decode latencies.
"""

from __future__ import annotations

import math
import time
from collections import deque


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
    """The generate() benchmarks' clock: with CUDA in use, the GPU timeline read through CUDA
    events; otherwise time.perf_counter. Each reading waits for the work queued before it, so the
    GPU idles between two timed calls: on the H200 a single long kernel timed with it read +3.6 %
    (matmul 16384^3) and +6.9 % (causal SDPA 8x32x8192x128) above triton's do_bench, which is why
    single-call benchmarks use `do_bench_times` + `replay_times` instead."""
    if _cuda_in_use():
        return _event_clock()
    return time.perf_counter()


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Single calls timed like triton.testing.do_bench, replayed into pytest-benchmark

# triton's CUDA driver (get_empty_cache_for_benchmark): 256 MiB zeroed before each call. The same
# size here (an L2-sized flush read -3.8 % against do_bench on the H200's 16384^3 matmul, +2.4 %
# in another run).
FLUSH_BYTES = 256 * 1024 * 1024


def do_bench_call_count(budget_ms: float | None, estimate_s: float, default: int) -> int:
    """do_bench's number of warm-up or timed calls: max(1, int(budget_ms / estimate_ms)), where
    estimate_ms is one call's time from its 5-call estimate; `default` when no budget is given."""
    if budget_ms is None:
        return default
    return max(1, int(budget_ms / (estimate_s * 1e3))) if estimate_s > 0 else default


def do_bench_times(fn, device, *, warmup: int = 10, repeats: int = 50, flush_l2: bool = True,
                   estimate_calls: int = 5, warmup_ms: float | None = None,
                   rep_ms: float | None = None) -> list[float]:
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed calls, measured the way
    `triton.testing.do_bench` measures (read from triton 3.6 python/triton/testing.py and its
    NVIDIA driver's get_empty_cache_for_benchmark/clear_cache).

    Matched, step by step: one unflushed call and a synchronisation; `estimate_calls` (5) calls,
    each after an L2 flush, between two CUDA events, and a synchronisation (the estimate); the
    warm-up calls, unflushed; then per timed call: flush (an int32 buffer of do_bench's 256 MiB is
    zeroed, queued but outside the timed span), start event, fn(), end event, all queued back to
    back with no synchronisation (the GPU never idles waiting for the host); ONE synchronisation at
    the end; each call's time is its own event pair's elapsed_time.

    Counts: with `warmup_ms`/`rep_ms` given, do_bench's own rule from the estimate,
    max(1, int(budget / estimate_ms)), so a block runs exactly as many calls as do_bench(fn,
    warmup_ms, rep_ms) would; otherwise `warmup`/`repeats` calls (pytest-benchmark's rounds). The
    count matters on a power-limited kernel: with 27 calls per block against do_bench's 40, the
    H200's causal SDPA (8 ms a call) read 1.8-2.5 % faster than do_bench in three gates (session 7)
    while the 13 ms matmul, where both ran ~26 calls, agreed within 0.6 %. So does the estimate:
    without it the timed calls started on a GPU that had idled (matmul 2.1-4.7 % faster, session
    6). Not matched: no grad_to_none; the per-call times are returned, not a mean/median/quantiles
    (pytest-benchmark computes those). On CPU: the same counts, perf_counter around each call
    (nothing to flush or synchronise)."""
    import torch

    device = torch.device(device)
    on_cuda = device.type == "cuda"

    if not on_cuda:
        fn()
        start = time.perf_counter()
        for _ in range(estimate_calls):
            fn()
        estimate = (time.perf_counter() - start) / max(1, estimate_calls)
        for _ in range(do_bench_call_count(warmup_ms, estimate, warmup)):
            fn()
        samples = []
        for _ in range(do_bench_call_count(rep_ms, estimate, repeats)):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return samples
    with torch.cuda.device(device):
        fn()
        torch.cuda.synchronize(device)
        cache = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush_l2 else None

        def flush():
            if cache is not None:
                cache.zero_()

        estimate_start, estimate_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        estimate_start.record()
        for _ in range(estimate_calls):
            flush()
            fn()
        estimate_end.record()
        torch.cuda.synchronize(device)
        estimate = estimate_start.elapsed_time(estimate_end) / 1e3 / max(1, estimate_calls)
        timed = do_bench_call_count(rep_ms, estimate, repeats)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(timed)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(timed)]
        for _ in range(do_bench_call_count(warmup_ms, estimate, warmup)):
            fn()
        for start, end in zip(starts, ends):
            flush()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000.0 for start, end in zip(starts, ends)]


class ReplayClock:
    """A pytest-benchmark timer that reads back per-call durations measured beforehand.

    pytest-benchmark 5.2.3 `benchmark.pedantic(target, rounds=n, iterations=1)` runs, per round,
    `start = timer(); target(); end = timer()` and records end - start (fixture.py `_make_runner`,
    `_raw_pedantic`); in pedantic mode it neither calibrates nor computes the timer's precision
    (`_calibrate_timer` and `compute_timer_precision` are reached only from `benchmark(fn)`), so
    the timer is read exactly twice per round. `replay_times` runs pedantic with `play_next` as
    the target: it loads the next duration, and the next reading returns it; every other reading
    returns 0.0. So each round's end - start is the recorded duration exactly (d - 0.0 == d, no
    rounding from a running virtual time), in the recorded order, and extra readings (a future
    version calibrating, a precision probe) can neither consume nor shift a duration.

    The timer reaches pytest-benchmark through its public marker,
    `@pytest.mark.benchmark(timer=replay_clock)` (the timer is a marker/--benchmark-timer option,
    not a pedantic() argument; the other way would be setting the fixture's private `_timer`).
    `replay_times` checks afterwards that this clock really timed every round."""

    def __init__(self, name: str = "replay_clock"):
        self.__name__ = name  # pytest-benchmark names the timer in its JSON options and logs
        self._pending: deque[float] = deque()
        self._loaded: float | None = None
        self.delivered = 0

    def __call__(self) -> float:
        reading, self._loaded = self._loaded, None
        if reading is None:
            return 0.0
        self.delivered += 1
        return reading

    def play_next(self) -> None:
        """The benchmarked target: the next reading of the clock is the next recorded duration."""
        if not self._pending:
            raise RuntimeError("replay clock: more rounds than recorded durations")
        self._loaded = self._pending.popleft()

    def load(self, seconds) -> None:
        self._pending, self._loaded, self.delivered = deque(seconds), None, 0

    def __repr__(self) -> str:
        return f"ReplayClock({self.__name__!r})"


replay_clock = ReplayClock()


def replay_times(benchmark, seconds, clock: ReplayClock = replay_clock) -> None:
    """Make pytest-benchmark report `seconds` (one entry per call, e.g. from `do_bench_times`) as
    its rounds: `benchmark.pedantic(clock.play_next, rounds=len(seconds), iterations=1,
    warmup_rounds=0)` with the test marked `@pytest.mark.benchmark(timer=clock)`. The stats,
    --benchmark-json (every round's value under "data"), --benchmark-save/-compare/-compare-fail
    then work on those durations."""
    seconds = [float(s) for s in seconds]
    if not seconds or not all(math.isfinite(s) and s >= 0 for s in seconds):
        raise ValueError(f"replay_times needs at least one finite non-negative duration, got {seconds[:8]}")
    clock.load(seconds)
    try:
        benchmark.pedantic(clock.play_next, rounds=len(seconds), iterations=1, warmup_rounds=0)
        if benchmark.enabled and clock.delivered != len(seconds):
            benchmark.has_error = True  # keeps the rounds of whatever timer ran out of the JSON and comparisons
            raise RuntimeError(
                f"the benchmark's timer returned {clock.delivered} of {len(seconds)} replayed durations: mark the test "
                f"@pytest.mark.benchmark(timer=harness.performance.timing.{clock.__name__}) (the closest benchmark marker wins)")
    finally:
        clock.load(())


def time_calls(fn, device, *, warmup: int = 3, repeats: int = 20, method: str = "do_bench") -> list[float]:
    """Seconds taken by each of `repeats` calls of fn() after `warmup` calls.

    method "do_bench": `do_bench_times` (what single-call benchmarks report);
    method "events": the same without the L2 flush (CUDA events around back-to-back calls);
    method "timer": device_timer around each call (a synchronisation per reading);
    method "host_sync": host_synchronized_timer around each call (synchronise + perf_counter)."""
    if method in ("do_bench", "events"):
        return do_bench_times(fn, device, warmup=warmup, repeats=repeats, flush_l2=method == "do_bench")
    clocks = {"timer": device_timer, "host_sync": host_synchronized_timer}
    if method not in clocks:
        raise ValueError(f"unknown timing method {method!r}")
    clock = clocks[method]
    for _ in range(warmup):
        fn()
    synchronize(device)
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

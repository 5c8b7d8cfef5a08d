"""Single-call timing: do_bench-style per-call times, replayed into pytest-benchmark.

Planted faults: a replay clock that drops, reorders or rounds the recorded times must make the
stats / JSON checks fail (they compare with the injected numbers exactly, in order), and a
benchmark whose measured function does its work twice must fail --benchmark-compare-fail through
the new path (do_bench_times -> replay_times), as tests/test_regression_gate.py does for
benchmark.pedantic.
"""

import json
import statistics

import pytest

from harness.performance.timing import ReplayClock, do_bench_call_count, do_bench_times, replay_times

# Distinct, unsorted, not binary fractions: a dropped, reordered or rounded value shows.
from tests.conftest import check_compare_gate
TIMES = [0.0123, 0.0101, 0.0347, 0.0099, 0.011, 0.0123456789, 0.0205]

REPLAY = '''
import json
import os
import statistics

import pytest

from harness.performance.timing import replay_clock, replay_times

TIMES = json.loads(os.environ["REPLAY_TIMES"])


@pytest.mark.benchmark(timer=replay_clock)
def test_replayed(benchmark):
    replay_times(benchmark, TIMES)
    stats = benchmark.stats.stats
    assert stats.data == TIMES
    assert (stats.min, stats.max, stats.median, stats.rounds) == (
        min(TIMES), max(TIMES), statistics.median(TIMES), len(TIMES))


def test_without_the_replay_timer_is_refused(benchmark):
    with pytest.raises(RuntimeError, match="timer=harness.performance.timing.replay_clock"):
        replay_times(benchmark, TIMES)
'''

GATED = '''
import os
import time

import pytest

from harness.performance.timing import do_bench_times, replay_clock, replay_times


def decode_step():
    time.sleep(0.01)
    if os.environ.get("PLANTED_SLOWDOWN"):
        time.sleep(0.01)  # planted fault: the same work done twice


@pytest.mark.benchmark(timer=replay_clock)
def test_decode_step(benchmark):
    replay_times(benchmark, do_bench_times(decode_step, "cpu", warmup=1, repeats=7))
'''


def _run(pytester, *args):
    return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama", *args)


def test_replay_hands_pytest_benchmark_exactly_the_given_times(pytester, monkeypatch):
    monkeypatch.setenv("REPLAY_TIMES", json.dumps(TIMES))
    pytester.makepyfile(test_replay=REPLAY)
    result = _run(pytester, "--benchmark-json=out.json")
    result.assert_outcomes(passed=2)
    [bench] = json.loads((pytester.path / "out.json").read_text())["benchmarks"]
    stats = bench["stats"]
    assert stats["data"] == TIMES
    assert (stats["min"], stats["max"], stats["median"], stats["mean"], stats["rounds"]) == (
        min(TIMES), max(TIMES), statistics.median(TIMES), statistics.mean(TIMES), len(TIMES))
    assert bench["options"]["timer"] == "replay_clock"


def test_replay_survives_extra_timer_readings():
    """A pytest-benchmark that read the timer more often (calibration, a precision probe) must
    still see each recorded duration once, in order."""
    clock = ReplayClock("probe")

    class ReadsTooOften:
        enabled = True

        def __init__(self):
            self.data = []

        def pedantic(self, target, rounds, iterations, warmup_rounds):
            assert (iterations, warmup_rounds) == (1, 0)
            for _ in range(rounds):
                clock(), clock()  # extra readings between rounds
                start = clock()
                clock()  # and inside a round, before the target
                target()
                self.data.append(clock() - start)
                clock()

    bench = ReadsTooOften()
    replay_times(bench, TIMES, clock=clock)
    assert bench.data == TIMES
    with pytest.raises(RuntimeError, match="more rounds than recorded"):
        clock.play_next()  # nothing is left loaded after a replay


@pytest.mark.parametrize("bad", [[], [0.01, float("nan")], [-1e-3]])
def test_replay_refuses_missing_or_impossible_times(bad):
    with pytest.raises(ValueError, match="finite non-negative"):
        replay_times(object(), bad)


@pytest.fixture
def gated(benchmark_gate):
    return benchmark_gate(GATED)


def test_compare_gate_through_the_replay_fails_the_planted_slowdown_and_passes_the_unchanged(gated):
    check_compare_gate(gated)


def test_cpu_fallback_times_every_call():
    calls = []

    def fn():
        calls.append(1)
        sum(range(2000))

    times = do_bench_times(fn, "cpu", warmup=2, repeats=5)
    assert len(calls) == 1 + 5 + 2 + 5 and len(times) == 5  # do_bench's first call, its 5-call estimate
    assert all(t > 0 for t in times), times


def test_millisecond_budgets_give_do_bench_call_counts():
    # triton 3.6 do_bench(warmup=25, rep=250) on the H200's 8.1 ms causal SDPA: 3 warm-up, 30 timed calls
    assert do_bench_call_count(25, 0.0081, default=2) == 3
    assert do_bench_call_count(250, 0.0081, default=20) == 30
    assert do_bench_call_count(250, 0.5, default=20) == 1  # never zero calls
    assert do_bench_call_count(None, 0.0081, default=20) == 20


def test_millisecond_budgets_bound_the_timed_calls_on_cpu():
    import time as clock

    times = do_bench_times(lambda: clock.sleep(0.02), "cpu", warmup_ms=20, rep_ms=60)
    assert 1 <= len(times) <= 3, times  # each call sleeps >= 20 ms, so at most int(60 / 20) are timed


def test_speed_benchmarks_skip_with_the_reason_where_pytest_benchmark_times_nothing(pytester):
    """pytest -n and --benchmark-disable turn pytest-benchmark off: the speed suite says so instead of
    failing on empty statistics (as `pytest -n 2 suites/` did)."""
    from tests.fault_conftest import REPO

    pytester.makepyfile(test_benchmarks_under_test=(REPO / "suites" / "test_benchmarks.py").read_text())
    pytester.makeconftest((REPO / "suites" / "conftest.py").read_text())
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "smollm2-135m",
                                          "--benchmark-disable", "-rs", "-k", "decode_time and sdpa-1]")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*pytest-benchmark is disabled in this run (--benchmark-disable)*"])

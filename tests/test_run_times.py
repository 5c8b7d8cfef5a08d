"""harness.performance.run_times: each phase's seconds land in set-up, compile or measure of its suite."""

import pytest

from harness.performance.run_times import RunTimes, compile_seconds_so_far


def test_phases_split_into_setup_compile_and_measure():
    times = RunTimes()
    times.phase_done("test_a", "setup", 2.0, compiled_so_far=10.0)   # first reading: a baseline, no compile
    times.phase_done("test_a", "call", 5.0, compiled_so_far=13.0)    # 3 s of it compiling
    times.phase_done("test_a", "teardown", 0.5, compiled_so_far=13.0)
    times.phase_done("test_b", "setup", 1.0, compiled_so_far=13.5)   # compiled 0.5 s while setting up
    times.phase_done("test_b", "call", 1.0, compiled_so_far=13.5)
    rows = {r["suite"]: r for r in times.rows()}
    assert rows["test_a"] == {"suite": "test_a", "setup_s": 2.5, "compile_s": 3.0, "measure_s": 2.0, "tests": 1, "total_s": 7.5}
    assert rows["test_b"]["setup_s"] == 0.5 and rows["test_b"]["compile_s"] == 0.5 and rows["test_b"]["measure_s"] == 1.0
    assert rows["total"]["total_s"] == pytest.approx(9.5) and rows["total"]["tests"] == 2
    assert [r["suite"] for r in times.rows()] == ["test_a", "test_b", "total"]  # slowest first


def test_counter_reset_and_overlap_never_give_negative_or_excess_time():
    times = RunTimes()
    times.phase_done("s", "call", 1.0, compiled_so_far=50.0)
    times.phase_done("s", "call", 1.0, compiled_so_far=0.0)    # torch._dynamo counters reset
    times.phase_done("s", "call", 1.0, compiled_so_far=30.0)   # more "compile" than the phase lasted
    row = times.rows()[0]
    assert row["compile_s"] == 1.0 and row["measure_s"] == 2.0


def test_compile_time_is_read_from_torch():
    torch = pytest.importorskip("torch")
    before = compile_seconds_so_far()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert compile_seconds_so_far() > before

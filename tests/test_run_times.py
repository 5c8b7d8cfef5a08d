"""harness.performance.run_times: each phase's seconds land in set-up, compile or measure of its suite."""

import pytest

from harness.performance.run_times import CounterClock, RunTimes, compile_seconds_so_far


def test_phases_split_into_setup_compile_and_measure():
    times = RunTimes()
    times.phase_done("test_a", "setup", 2.0, compile_s=0.0)
    times.phase_done("test_a", "call", 5.0, compile_s=3.0)
    times.phase_done("test_a", "teardown", 0.5, compile_s=0.0)
    times.phase_done("test_b", "setup", 1.0, compile_s=0.5)
    times.phase_done("test_b", "call", 1.0, compile_s=0.0)
    rows = {r["suite"]: r for r in times.rows()}
    assert rows["test_a"] == {"suite": "test_a", "setup_s": 2.5, "compile_s": 3.0, "measure_s": 2.0, "tests": 1, "total_s": 7.5}
    assert rows["test_b"]["setup_s"] == 0.5 and rows["test_b"]["compile_s"] == 0.5 and rows["test_b"]["measure_s"] == 1.0
    assert rows["total"]["total_s"] == pytest.approx(9.5) and rows["total"]["tests"] == 2
    assert [r["suite"] for r in times.rows()] == ["test_a", "test_b", "total"]  # slowest first


def test_the_clock_reads_compile_seconds_since_the_last_phase():
    clock = CounterClock()
    assert clock.since_last(10.0) == 0.0   # first reading: a baseline
    assert clock.since_last(13.0) == 3.0
    assert clock.since_last(13.0) == 0.0
    assert clock.since_last(0.0) == 0.0    # torch._dynamo counters reset: no compiling, never negative
    assert clock.since_last(0.5) == 0.5


def test_more_compiling_than_the_phase_lasted_is_capped_at_the_phase():
    times = RunTimes()
    times.phase_done("s", "call", 1.0, compile_s=30.0)  # torch counts compile threads overlapping the phase
    times.phase_done("s", "call", 1.0, compile_s=-1.0)
    row = times.rows()[0]
    assert row["compile_s"] == 1.0 and row["measure_s"] == 1.0


def test_compile_time_is_read_from_torch():
    torch = pytest.importorskip("torch")
    before = compile_seconds_so_far()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert compile_seconds_so_far() > before


def test_compile_seconds_reach_the_controller_on_the_report(monkeypatch):
    """Under pytest-xdist the controller writes the report card and compiles nothing: each phase's
    compile seconds travel on its report from the worker, through pytest's own report
    serialisation (what xdist sends). Before, the CPU CI's table read 0 compile seconds with ~40 s
    of inductor work in the static-cache test."""
    from _pytest.reports import TestReport

    import harness.session as session_module
    from harness.config import RunConfig
    from harness.equivalence.tolerances import Tolerances

    def session():
        return session_module.RunSession(RunConfig(), [], "cpu", "float32", Tolerances())

    def phase(when: str, duration: float) -> TestReport:
        return TestReport("suites/test_x.py::test_y", ("suites/test_x.py", 1, "test_y"), {}, "passed", None, when,
                          duration=duration)

    worker, controller = session(), session()
    report = phase("call", 5.0)
    monkeypatch.setattr(session_module, "compile_seconds_so_far", lambda: 10.0)
    worker.stamp_phase_times(phase("setup", 0.1))  # the worker's baseline
    monkeypatch.setattr(session_module, "compile_seconds_so_far", lambda: 13.0)
    worker.stamp_phase_times(report)
    monkeypatch.setattr(session_module, "compile_seconds_so_far", lambda: 0.0)  # the controller compiled nothing
    controller.record_phase(TestReport._from_json(report._to_json()))
    assert controller.run_times.rows()[0]["compile_s"] == 3.0

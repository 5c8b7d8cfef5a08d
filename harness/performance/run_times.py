"""Where a run's time goes, per suite: set-up, compile, measure.

Issue 15 asks for the gate's time split so that a slow suite says *why* it is slow. pytest gives
each test phase's duration; torch.compile's own accounting (``torch._dynamo.utils.calculate_time_spent``,
cumulative seconds spent compiling frames, inductor and flex_attention kernels included) gives how much
of that was compiling. So for each phase:

* set-up = fixture set-up + teardown (model loading, reference outputs), less compiling done there;
* compile = compiling inside any phase;
* measure = the test's call, less compiling done there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def compile_seconds_so_far() -> float:
    """Seconds torch.compile has spent in this process (0 where torch or its counters are absent)."""
    try:
        from torch._dynamo.utils import calculate_time_spent
    except Exception:  # an old or partial torch: the breakdown shows no compile column, nothing fails
        return 0.0
    return float(calculate_time_spent().get("total_wall_time", 0.0))


@dataclass
class SuiteTime:
    setup_s: float = 0.0
    compile_s: float = 0.0
    measure_s: float = 0.0
    tests: int = 0

    @property
    def total_s(self) -> float:
        return self.setup_s + self.compile_s + self.measure_s

    def to_dict(self) -> dict:
        return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "total_s": round(self.total_s, 2)}


# The attribute a phase's report carries its compile seconds in (pytest-xdist sends a report's
# extra attributes from the worker to the controller, which writes the report card).
COMPILE_ATTRIBUTE = "harness_compile_s"


@dataclass
class CounterClock:
    """A cumulative seconds counter of this process (torch.compile's, the wait for the gate's
    shards) since its last reading. Read as each test phase's report is made, in the process that
    ran the phase: under pytest-xdist the controller, which collects the reports, compiles nothing
    itself (its own counter left the compile column at 0 on CPU CI). Without a starting value the
    first reading is the baseline."""

    _last: float | None = None

    def since_last(self, so_far: float) -> float:
        before = so_far if self._last is None else self._last  # the first reading: a baseline
        self._last = so_far
        return max(so_far - before, 0.0)  # a counter reset (torch._dynamo.reset) reads as none


def phase_compile_seconds(report) -> float:
    """The compile seconds a phase's report carries (0 for a report made without the harness)."""
    return float(getattr(report, COMPILE_ATTRIBUTE, 0.0) or 0.0)


@dataclass
class RunTimes:
    """Fed one test phase at a time (pytest's setup/call/teardown reports)."""

    suites: dict[str, SuiteTime] = field(default_factory=dict)

    def phase_done(self, suite: str, when: str, duration_s: float, compile_s: float) -> float:
        """Adds the phase to its suite; returns the seconds of it spent compiling (never more than
        the phase lasted: torch counts compiling in threads that overlap it)."""
        compiling = min(max(compile_s, 0.0), duration_s)
        times = self.suites.setdefault(suite, SuiteTime())
        times.compile_s += compiling
        if when == "call":
            times.measure_s += duration_s - compiling
            times.tests += 1
        else:
            times.setup_s += duration_s - compiling
        return compiling

    def rows(self) -> list[dict]:
        """One row per suite, slowest first, then the run's total."""
        ordered = sorted(self.suites.items(), key=lambda item: -item[1].total_s)
        total = SuiteTime(*(sum(getattr(t, name) for t in self.suites.values())
                            for name in ("setup_s", "compile_s", "measure_s", "tests")))
        return [{"suite": name, **times.to_dict()} for name, times in ordered] + [{"suite": "total", **total.to_dict()}]

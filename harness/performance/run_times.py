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


@dataclass
class RunTimes:
    """Fed one test phase at a time (pytest's setup/call/teardown reports, in order)."""

    suites: dict[str, SuiteTime] = field(default_factory=dict)
    _compiled_before: float | None = None

    def phase_done(self, suite: str, when: str, duration_s: float, compiled_so_far: float) -> float:
        """Adds the phase to its suite; returns the seconds of it spent compiling."""
        before = compiled_so_far if self._compiled_before is None else self._compiled_before
        # a counter reset (torch._dynamo.reset) reads as no compiling, not as negative time
        compiling = min(max(compiled_so_far - before, 0.0), duration_s)
        self._compiled_before = compiled_so_far
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

"""The run's state: one typed object the plugin creates at configure time, the fixtures read and
the report is written from (issue 17; pytest-benchmark keeps its run state in one BenchmarkSession
the same way). `start_session` builds it from the command line's values; its methods are what the
plugin's hooks and fixtures call (probes done once per run, the rows the report is written from).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.backends import capabilities as caps_mod
from harness.config import RunConfig, cache_root, run_config
from harness.equivalence.tolerances import Tolerances, load_tolerances
from harness.errors import HarnessUsageError
from harness.models.capabilities import model_category, refusals
from harness.models.factory import ModelFactory
from harness.performance.run_times import (COMPILE_ATTRIBUTE, CounterClock, RunTimes, compile_seconds_so_far,
                                           phase_compile_seconds)
from harness.profiles import register_hypothesis_profiles
from harness.reporting.outcomes import benchmark_document, decides_outcome, outcome_row
from harness.results import Result, suite_of
from harness.sharding import refuse_queue_under_xdist, seconds_waited

PLANTED_FAULT_ENV = "HARNESS_PLANTED_FAULT"


@dataclass
class RunSession:
    run: RunConfig
    specs: list  # harness.models.loading.ModelSpec, in --model order
    device: object  # torch.device
    dtype: object  # torch.dtype
    tolerances: Tolerances
    compile_caches: dict = field(default_factory=dict)  # variable -> folder (harness.performance.compile_cache)
    run_dir: Path | None = None  # this run's report directory (None without --report-dir)
    started: float = field(default_factory=time.time)
    records: list[Result] = field(default_factory=list)  # every record_result row
    outcomes: list[dict] = field(default_factory=list)  # one row per test phase that decided an outcome
    run_times: RunTimes = field(default_factory=RunTimes)
    compile_clock: CounterClock = field(default_factory=CounterClock)
    wait_clock: CounterClock = field(default_factory=lambda: CounterClock(0.0))  # reads seconds_waited(), from 0
    # the process-wide wait counter when this session began: an in-process run (pytester) after one
    # that waited for shards starts from its own zero
    waited_before: float = field(default_factory=seconds_waited)
    capabilities: tuple | None = None  # the device's matrix, probed on first use
    model_capabilities: dict = field(default_factory=dict)  # model name -> its rows (harness.models.capabilities)
    benchmarks: dict | None = None  # pytest-benchmark's JSON document, at the end of the run
    failure_texts: dict = field(default_factory=dict)  # 'nodeid::when' -> message and traceback, at the end
    shard_queue: object = None  # harness.sharding.ShardQueue in a gate's shard process, else None

    # --- capabilities, probed once per run

    def device_capabilities(self) -> tuple:
        """The capability matrix (harness.backends.capabilities.Capability rows) of the run's device and dtype."""
        if self.capabilities is None:
            self.capabilities = caps_mod.detect(self.device, self.dtype)
        return self.capabilities

    def model_rows(self, spec) -> list:
        """The model's own rows (harness.models.capabilities), probed once per model and run; the model
        factory appends a refusal that only loading revealed."""
        table = self.model_capabilities
        if spec.name not in table:
            from harness.models.capabilities import probe_model

            table[spec.name] = list(probe_model(spec, self.device_capabilities()))
        return table[spec.name]

    def capability_skip_reason(self, name: str) -> str | None:
        """Why a test needing capability `name` skips here (None when it is available)."""
        cap = caps_mod.by_name(self.device_capabilities()).get(name)
        if cap is None:
            return f"unknown capability {name!r}"
        return None if cap.available else f"{name} unavailable: {cap.reason}"

    def model_factory(self, spec, device, dtype) -> ModelFactory:
        """The model factory of `spec` (harness.models.factory): a variant the model's rows refuse is
        refused at once, and one that only loading refuses joins the rows."""
        rows = self.model_rows(spec)

        def record_refusal(attn_implementation: str, reason: str) -> None:
            rows.append(caps_mod.Capability(attn_implementation, model_category(spec.name), False, reason))

        return ModelFactory(spec, device, dtype, refused=refusals(rows), on_refusal=record_refusal)

    def header_lines(self) -> list[str]:
        """The run's lines in pytest's header: models, device and versions, both capability tables."""
        import torch
        import transformers

        lines = [f"harness: models {', '.join(s.label for s in self.specs)}",
                 f"harness: device {self.device}, dtype {caps_mod.dtype_name(self.dtype)}, "
                 f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
                 "harness capabilities:"]
        lines += caps_mod.as_table(self.device_capabilities())
        for spec in self.specs:
            rows = self.model_rows(spec)
            lines.append(f"harness model {spec.name}: accepts {', '.join(c.name for c in rows if c.available) or 'nothing probed'}")
            lines += [f"  {c.name}  no   {c.reason}" for c in rows if not c.available]
        return lines

    # --- what the report is written from

    def open_run_dir(self) -> Path:
        """Create this run's report directory under --report-dir (harness.reporting.report.new_run_dir)."""
        from harness.reporting.report import new_run_dir

        self.run_dir = new_run_dir(Path(self.run.report_dir), self.specs)
        return self.run_dir

    def stamp_phase_times(self, report) -> None:
        """As a phase's report is made, in the process that ran the phase: its compile seconds, and
        its duration less any wait for the gate's shards in it (harness.sharding.wait_for_start)."""
        setattr(report, COMPILE_ATTRIBUTE, self.compile_clock.since_last(compile_seconds_so_far()))
        waited = self.wait_clock.since_last(self.seconds_waited())
        if waited:
            report.duration = max(report.duration - waited, 0.0)

    def seconds_waited(self) -> float:
        """Seconds this run has waited for the gate's shards (harness.sharding.wait_for_start)."""
        return max(seconds_waited() - self.waited_before, 0.0)

    def record_phase(self, report) -> None:
        """A test phase's report: one outcome row where the phase decided the outcome (call, or a
        failed/skipped set-up), and every phase's time per suite (harness.performance.run_times)."""
        compiling = self.run_times.phase_done(suite_of(report.nodeid), report.when, report.duration,
                                              phase_compile_seconds(report))
        if decides_outcome(report):
            self.outcomes.append(outcome_row(report, compile_s=compiling))

    def record_result(self, suite: str, nodeid: str, /, check: str, metric: str, value, threshold=None,
                      passed=None, where: str = "", **details) -> Result:
        """One row of the test `nodeid` (the record_result fixture: the suite and node id bound)."""
        result = Result(suite=suite, check=check, metric=metric, value=value, threshold=threshold,
                        passed=passed, where=where, details={"test": nodeid, **details})
        self.records.append(result)
        return result

    def record_weights(self, spec, evidence, limit: float) -> None:
        """harness.models.weights' evidence for the model under test, recorded once per model for the report."""
        untrained = evidence.untrained(limit)
        self.records.append(Result(
            suite="harness", check="weights", metric="next-token entropy / uniform", value=round(evidence.fraction, 4),
            threshold=f"< {limit}", passed=None, where=spec.name,
            details={"entropy_nats": evidence.entropy_nats, "uniform_nats": evidence.uniform_nats,
                     "looks_untrained": untrained}))

    def record_compile_cache_use(self) -> None:
        """The persistent compile caches' hits and misses (harness.performance.compile_cache), where any."""
        from harness.performance.compile_cache import cache_use

        use = cache_use()
        if use and any(use.values()):
            self.records.append(Result(
                suite="harness", check="compile caches", metric="FX-graph cache hits", value=use["fxgraph_cache_hit"],
                where="inductor", details={**use, **self.compile_caches}))

    def finish(self, config, exitstatus: int) -> None:
        """At the end of the run: the compile caches' row, then the report where --report-dir asks for
        one, with pytest-benchmark's document and the whole failure texts read from the runner's
        `config` (harness.reporting.outcomes, harness.reporting.report)."""
        self.record_compile_cache_use()
        if self.run_dir is not None:
            from harness.reporting.report import failure_texts, write_report

            self.benchmarks = benchmark_document(config)
            self.failure_texts = failure_texts(config)  # whole messages and tracebacks, folded in the report
            write_report(self.run_dir, self, self.device_capabilities(), exitstatus=exitstatus)

    def time_table(self) -> list[str]:
        """The terminal's time-per-suite table, its header first ([] unless more than one suite ran)."""
        rows = self.run_times.rows()
        if len(rows) <= 1:
            return []
        return [f"{'suite':<28} {'set-up':>8} {'compile':>8} {'measure':>8} {'total':>8} {'tests':>6}"] + [
            f"{row['suite']:<28} {row['setup_s']:>8.1f} {row['compile_s']:>8.1f} "
            f"{row['measure_s']:>8.1f} {row['total_s']:>8.1f} {row['tests']:>6}" for row in rows]


def start_session(options: dict, xdist_workers: int, planted_fault) -> RunSession:
    """The run's session from the command line's values (harness.config.run_config): models resolved,
    device, dtype and tolerances; hypothesis' profiles registered; the planted fault switched on
    (activate_planted_fault); the persistent compile caches enabled, and torch.compile's silent eager
    fallback turned into an error (refuse_eager_fallback). Bad input: HarnessUsageError."""
    from harness.gpu_workers import setup_xdist_gpus
    from harness.models.loading import resolve_model
    from harness.performance.compile_cache import enable_persistent_compile_caches, refuse_eager_fallback

    # before anything initialises CUDA: an xdist worker sees only its own GPU
    setup_xdist_gpus(planned_workers=xdist_workers)
    refuse_queue_under_xdist(options.get("shard"), xdist_workers)
    run = run_config(options)
    specs = [s for text in run.models for s in resolve_model(
        text, allow_remote_code=run.allow_remote_code, allow_pickle=run.allow_pickle)]
    device = caps_mod.resolve_device(run.device)
    dtype = caps_mod.resolve_dtype(run.dtype, device)
    tolerances = load_tolerances(run.thresholds_file)
    register_hypothesis_profiles()
    activate_planted_fault(planted_fault)
    compile_caches = enable_persistent_compile_caches(cache_root(), device)
    refuse_eager_fallback()
    return RunSession(run=run, specs=specs, device=device, dtype=dtype, tolerances=tolerances,
                      compile_caches=compile_caches)


def activate_planted_fault(provide, environ=None) -> None:
    """Break an implementation on purpose where HARNESS_PLANTED_FAULT=<name> asks; exists only to prove
    the gate fails, never on by default. `provide(name)` is the plugin's pytest_harness_planted_fault
    hook: True once done, None without a provider, KeyError for a name it does not know."""
    name = (environ if environ is not None else os.environ).get(PLANTED_FAULT_ENV)
    if not name:
        return
    try:
        provided = provide(name)
    except KeyError as exc:
        raise HarnessUsageError(f"{PLANTED_FAULT_ENV}={name}: unknown fault {exc}") from None
    if not provided:
        raise HarnessUsageError(f"{PLANTED_FAULT_ENV}={name}: no plugin provides planted faults; they live in a "
                                "checkout's tests/ (run pytest from the checkout root)")
    print(f"[harness] PLANTED FAULT ACTIVE: {name} (this run is expected to fail)")

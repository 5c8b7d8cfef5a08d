"""The run's state: one typed object the plugin creates at configure time, the fixtures read and
the report is written from (issue 17; pytest-benchmark keeps its run state in one BenchmarkSession
the same way)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import RunConfig
from harness.equivalence.tolerances import Tolerances
from harness.results import Result
from harness.performance.run_times import RunTimes


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
    capabilities: tuple | None = None  # the device's matrix, probed on first use
    model_capabilities: dict = field(default_factory=dict)  # model name -> its rows (harness.models.capabilities)
    benchmarks: dict | None = None  # pytest-benchmark's JSON document, at the end of the run
    failure_texts: dict = field(default_factory=dict)  # 'nodeid::when' -> message and traceback, at the end

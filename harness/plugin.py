"""The harness's pytest plugin: options, markers, session fixtures, the header and the report.

The only module of `harness` that imports pytest. Registered through the `pytest11` entry point
(name "harness.plugin") and, for checkouts that are not installed, by the root conftest.py.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import pytest

from harness.backends import capabilities as caps_mod
from harness.config import DEFAULT_MODEL, RunConfig, parse_bytes
from harness.equivalence.tolerances import load_tolerances
from harness.errors import HarnessUsageError, VariantRefused
from harness.models.capabilities import model_category, refusals
from harness.models.factory import ModelFactory
from harness.profiles import register_hypothesis_profiles
from harness.results import Result, skip_outcome
from harness.performance.run_times import RunTimes, compile_seconds_so_far
from harness.session import RunSession

_STATE_KEY = pytest.StashKey[RunSession]()


def pytest_addoption(parser):
    group = parser.getgroup("harness", "LLM inference validation harness")
    group.addoption("--model", action="append", default=None, metavar="SPEC",
                    help=f"model(s) under test, repeatable or comma-separated: {DEFAULT_MODEL} (default), a local "
                         "HF directory, a .gguf file, a hub id in the local cache, tiny:<arch>, tiny:all, random:<shape>")
    group.addoption("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.addoption("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    group.addoption("--attn", default="", metavar="IMPLS",
                    help="comma-separated attention implementations to test (default: every one available)")
    group.addoption("--memory-budget", default=None, metavar="SIZE", help="device memory budget for every test, e.g. 12GiB")
    group.addoption("--report-dir", default=None, metavar="DIR",
                    help="write report.md, results.json, capabilities.json and junit.xml under DIR/<run>/")
    group.addoption("--seed", type=int, default=0, help="seed for inputs drawn by the suites (default 0)")
    group.addoption("--thresholds", default=None, metavar="FILE", help="JSON file overriding tolerances and thresholds")
    group.addoption("--allow-remote-code", action="store_true", help="allow models that ship their own Python code")
    group.addoption("--allow-pickle", action="store_true", help="allow pickle (.bin/.pt) checkpoints")
    group.addoption("--run-slow", action="store_true", help="also run tests marked slow (the full profile)")
    group.addoption("--shard", default=None, metavar="K/N",
                    help="run only the K-th of N parts of the collected tests (whole test functions; "
                         "harness.gate runs N such processes side by side)")


def _run_config(config) -> RunConfig:
    raw = config.getoption("--model") or [DEFAULT_MODEL]
    models = tuple(m.strip() for value in raw for m in value.split(",") if m.strip())
    budget = config.getoption("--memory-budget")
    return RunConfig(
        models=models or (DEFAULT_MODEL,),
        device=config.getoption("--device"),
        dtype=config.getoption("--dtype"),
        attn=tuple(a.strip() for a in config.getoption("--attn").split(",") if a.strip()),
        memory_budget_bytes=parse_bytes(budget) if budget else None,
        report_dir=config.getoption("--report-dir"),
        seed=config.getoption("--seed"),
        allow_remote_code=config.getoption("--allow-remote-code"),
        allow_pickle=config.getoption("--allow-pickle"),
        thresholds_file=config.getoption("--thresholds"),
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with the reason on CPU")
    config.addinivalue_line("markers", "slow: part of the full profile; runs only with --run-slow")
    config.addinivalue_line("markers", "acceptance: checks that need trained weights")
    config.addinivalue_line("markers", "exclusive: times the device or reads its memory: harness.gate runs it alone "
                            "on the device, after the tests it runs side by side")
    config.addinivalue_line("markers", "needs(capability, ...): skip unless every named capability is available here")
    config.addinivalue_line("markers", "memory_budget(size): fail the test when its peak memory exceeds size, e.g. '12GiB'; "
                            "memory_budget(None) exempts a test from --memory-budget")
    from harness.models.loading import resolve_model

    try:
        # before anything initialises CUDA: an xdist worker sees only its own GPU
        from harness.inference.distributed import setup_xdist_gpus

        setup_xdist_gpus(planned_workers=len(getattr(config.option, "tx", None) or []))
        run = _run_config(config)
        specs = [s for text in run.models for s in resolve_model(
            text, allow_remote_code=run.allow_remote_code, allow_pickle=run.allow_pickle)]
        device = caps_mod.resolve_device(run.device)
        dtype = caps_mod.resolve_dtype(run.dtype, device)
        tolerances = load_tolerances(run.thresholds_file)
    except HarnessUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    register_hypothesis_profiles()
    _activate_planted_fault_from_env(config)
    from harness.performance.compile_cache import enable_persistent_compile_caches
    from harness.config import cache_root

    compile_caches = enable_persistent_compile_caches(cache_root(), device)
    state = RunSession(run=run, specs=specs, device=device, dtype=dtype, tolerances=tolerances,
                       compile_caches=compile_caches)
    config.stash[_STATE_KEY] = state
    config.pluginmanager.register(_OutcomeRecorder(state.outcomes, state.run_times), "harness-outcomes")
    if run.report_dir and not hasattr(config, "workerinput"):
        from harness.reporting.report import new_run_dir

        run_dir = new_run_dir(Path(run.report_dir), specs)
        state.run_dir = run_dir
        if not config.option.xmlpath:
            config.option.xmlpath = str(run_dir / "junit.xml")


PLANTED_FAULT_ENV = "HARNESS_PLANTED_FAULT"


def _planted_fault_spec(name: str):
    """Break implementation `name` on purpose (HARNESS_PLANTED_FAULT=<name>) and return True; raise
    KeyError for a name the provider does not know. A checkout's root conftest.py provides it from
    tests/planted_faults.py: the library never imports the faults."""


def pytest_addhooks(pluginmanager):
    from types import SimpleNamespace

    pluginmanager.add_hookspecs(SimpleNamespace(
        pytest_harness_planted_fault=pytest.hookspec(firstresult=True)(_planted_fault_spec)))


def _activate_planted_fault_from_env(config) -> None:
    """Exists only to prove the gate fails; never on by default."""
    import os

    name = os.environ.get(PLANTED_FAULT_ENV)
    if not name:
        return
    try:
        provided = config.hook.pytest_harness_planted_fault(name=name)
    except KeyError as exc:
        raise pytest.UsageError(f"{PLANTED_FAULT_ENV}={name}: unknown fault {exc}") from None
    if not provided:
        raise pytest.UsageError(f"{PLANTED_FAULT_ENV}={name}: no plugin provides planted faults; they live in a "
                                "checkout's tests/ (run pytest from the checkout root)")
    print(f"[harness] PLANTED FAULT ACTIVE: {name} (this run is expected to fail)")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` on a GPU host: one worker per GPU."""
    from harness.inference.distributed import auto_worker_count

    return auto_worker_count()


def _state(config) -> RunSession:
    return config.stash[_STATE_KEY]


def _capabilities(config):
    state = _state(config)
    if state.capabilities is None:
        state.capabilities = caps_mod.detect(state.device, state.dtype)
    return state.capabilities


def _model_capabilities(config, spec) -> list:
    """The model's own rows (harness.models.capabilities), probed once per model and run; the model
    factory appends a refusal that only loading revealed."""
    table = _state(config).model_capabilities
    if spec.name not in table:
        from harness.models.capabilities import probe_model

        table[spec.name] = list(probe_model(spec, _capabilities(config)))
    return table[spec.name]


def pytest_report_header(config):
    state = _state(config)
    import torch
    import transformers

    lines = [f"harness: models {', '.join(s.label for s in state.specs)}",
             f"harness: device {state.device}, dtype {caps_mod.dtype_name(state.dtype)}, "
             f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
             "harness capabilities:"]
    lines += caps_mod.as_table(_capabilities(config))
    for spec in state.specs:
        rows = _model_capabilities(config, spec)
        lines.append(f"harness model {spec.name}: accepts {', '.join(c.name for c in rows if c.available) or 'nothing probed'}")
        lines += [f"  {c.name}  no   {c.reason}" for c in rows if not c.available]
    return lines


def pytest_generate_tests(metafunc):
    if "model_spec" in metafunc.fixturenames:
        specs = _state(metafunc.config).specs
        metafunc.parametrize("model_spec", specs, ids=[s.name for s in specs], scope="session")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    state = _state(config)
    _group_items_by_model(items, state.specs)
    on_gpu = state.device.type == "cuda"
    run_slow = config.getoption("--run-slow")
    for item in items:
        if item.get_closest_marker("gpu") and not on_gpu:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA device; this run is on {state.device}"))
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: part of the full profile (pass --run-slow)"))
    if config.getoption("--shard"):
        _keep_shard(config, items)


def _keep_shard(config, items) -> None:
    import os

    from harness.sharding import HISTORY_VARIABLE, assign_shards, history_weights, parse_shard

    try:
        shard = parse_shard(config.getoption("--shard"))
    except HarnessUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    nodeids = [item.nodeid for item in items]
    weights = history_weights(nodeids, [item.get_closest_marker("skip") is not None for item in items],
                              os.environ.get(HISTORY_VARIABLE))
    owner = assign_shards(nodeids, shard.count, weights)
    keep = [item for item, index in zip(items, owner) if index == shard.index - 1]
    dropped = [item for item, index in zip(items, owner) if index != shard.index - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _group_items_by_model(items, specs) -> None:
    """Every test of one model, then the next: pytest's own ordering interleaves a session-scoped
    parameter with the other parameters (cache type x model), which reloaded the default model and
    recomputed its session references ~10 times per run. Stable, so each model keeps the file and
    parameter order pytest chose; tests without a model come first."""
    position = {spec.name: i for i, spec in enumerate(specs)}

    def model_index(item) -> int:
        spec = getattr(getattr(item, "callspec", None), "params", {}).get("model_spec")
        return -1 if spec is None else position.get(spec.name, len(position))

    items.sort(key=model_index)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """A process the gate starts beside its shards waits for them before its first test."""
    from harness.sharding import wait_for_start

    if session.testscollected and not wait_for_start():
        raise session.Interrupted("harness: the gate that started this process is gone; no test was run")


def pytest_runtest_setup(item):
    for marker in item.iter_markers("needs"):
        for name in marker.args:
            reason = capability_skip_reason(item.config, name)
            if reason:
                pytest.skip(reason)


def capability_skip_reason(config, name: str) -> str | None:
    cap = caps_mod.by_name(_capabilities(config)).get(name)
    if cap is None:
        return f"unknown capability {name!r}"
    return None if cap.available else f"{name} unavailable: {cap.reason}"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def run_config(request) -> RunConfig:
    return _state(request.config).run


@pytest.fixture(scope="session")
def device(request):
    return _state(request.config).device


@pytest.fixture(scope="session")
def dtype(request):
    return _state(request.config).dtype


@pytest.fixture(scope="session")
def tolerances(request):
    return _state(request.config).tolerances


@pytest.fixture(scope="session")
def capabilities(request):
    """The capability matrix: a tuple of harness.backends.capabilities.Capability."""
    return _capabilities(request.config)


@pytest.fixture(scope="session")
def require(request):
    """require('sdpa_flash', ...) skips the calling test with the matrix's reason when absent."""

    def _require(*names: str) -> None:
        for name in names:
            reason = capability_skip_reason(request.config, name)
            if reason:
                pytest.skip(reason)

    return _require


def _usage_guard(fn, *args, **kwargs):
    """Run a loader; a HarnessUsageError fails the test with its one line and no traceback
    (a VariantRefused passes through: the caller turns it into a skip)."""
    try:
        return fn(*args, **kwargs)
    except VariantRefused:
        raise
    except HarnessUsageError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def tokenizer(model_spec):
    from harness.models.loading import load_tokenizer

    loaded = _usage_guard(load_tokenizer, model_spec)
    if loaded is None:
        pytest.skip(f"{model_spec.name} has random weights and a vocabulary no bundled tokenizer covers: checks that "
                    "feed it text run on the default model, the tiny: presets or a trained checkpoint")
    return loaded


class _SkippingFactory:
    """harness.models.factory.ModelFactory in a test: a variant transformers refuses is a skip with
    its reason, bad input one failing line."""

    def __init__(self, factory):
        self.factory, self.spec, self.clear = factory, factory.spec, factory.clear

    def __call__(self, *args, **kwargs):
        try:
            return _usage_guard(self.factory, *args, **kwargs)
        except VariantRefused as exc:
            message = str(exc)
        pytest.skip(message)


@pytest.fixture(scope="session")
def model_factory(model_spec, device, dtype, request):
    rows = _model_capabilities(request.config, model_spec)

    def record_refusal(attn_implementation: str, reason: str) -> None:
        rows.append(caps_mod.Capability(attn_implementation, model_category(model_spec.name), False, reason))

    factory = ModelFactory(model_spec, device, dtype, refused=refusals(rows), on_refusal=record_refusal)
    yield _SkippingFactory(factory)
    factory.clear()


@pytest.fixture(scope="session")
def weights_evidence(model_spec, reference_model, tokenizer, tolerances, request):
    """harness.models.weights' evidence for the model under test, recorded once per model for the report."""
    from harness.models.weights import next_token_entropy

    evidence = next_token_entropy(reference_model, tokenizer)
    untrained = evidence.untrained(tolerances.untrained_entropy_fraction)
    _state(request.config).records.append(Result(
        suite="harness", check="weights", metric="next-token entropy / uniform", value=round(evidence.fraction, 4),
        threshold=f"< {tolerances.untrained_entropy_fraction}", passed=None, where=model_spec.name,
        details={"entropy_nats": evidence.entropy_nats, "uniform_nats": evidence.uniform_nats,
                 "looks_untrained": untrained}))
    return evidence


@pytest.fixture(scope="session")
def trained(model_spec):
    """The model under test when it has trained weights; a random-weight preset skips the check."""
    if not model_spec.trained:
        pytest.skip(f"{model_spec.name} has random weights (a preset): this check needs a trained model")
    return model_spec


@pytest.fixture(scope="session")
def trained_quality(trained, weights_evidence, tolerances):
    """For checks of a model's quality: a checkpoint whose weights behave as untrained is an expected
    failure that says so, since its result would be about the weights, not the optimisation."""
    if weights_evidence.untrained(tolerances.untrained_entropy_fraction):
        pytest.xfail(f"untrained weights: {weights_evidence.describe()}; quality checks need a trained checkpoint")
    return trained


@pytest.fixture(scope="session")
def reference_model(model_factory):
    """The model under test with eager attention in the run's dtype."""
    return model_factory("eager")


@pytest.fixture(scope="session")
def known_transformers_bug():
    """known_transformers_bug(applies, what): xfail naming a bug of an older transformers release
    (harness.backends.capabilities.older_transformers) when it applies there; otherwise return, so the
    caller's failure stands."""
    from harness.backends.capabilities import TRANSFORMERS_FIXED_IN, older_transformers

    def check(applies: bool, what: str) -> None:
        version = older_transformers()
        if applies and version:
            pytest.xfail(f"transformers {version}: {what}; passes on transformers "
                         f"{'.'.join(map(str, TRANSFORMERS_FIXED_IN))}")

    return check


@pytest.fixture(scope="session")
def run_dir(request) -> Path | None:
    """This run's report directory (None without --report-dir)."""
    return _state(request.config).run_dir


@pytest.fixture
def record_result(request):
    """record_result(check=..., metric=..., value=..., threshold=..., passed=..., where=..., **details)."""
    suite = Path(str(request.node.path)).stem

    def _record(check: str, metric: str, value, threshold=None, passed=None, where: str = "", **details) -> Result:
        result = Result(suite=suite, check=check, metric=metric, value=value, threshold=threshold,
                        passed=passed, where=where, details={"test": request.node.nodeid, **details})
        _state(request.config).records.append(result)
        return result

    return _record


# ---------------------------------------------------------------------------------------------
# Outcomes and the report


class _OutcomeRecorder:
    """Keeps one row per test phase that decided the outcome (call, or a failed/skipped setup), and
    every phase's time per suite (harness.performance.run_times)."""

    def __init__(self, rows: list, times: RunTimes):
        self.rows = rows
        self.times = times

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.rows.append(_outcome_row(report))
        self.times.phase_done(Path(report.nodeid.split("::")[0]).stem, report.when, report.duration,
                              compile_seconds_so_far())


def _outcome_row(report) -> dict:
    reason, outcome = "", report.outcome
    if getattr(report, "wasxfail", None) is not None:  # pytest reports an expected failure as "skipped"
        reason, outcome = str(report.wasxfail), "xfailed"
    elif report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        outcome = skip_outcome(reason)
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = crash.message.splitlines()[0] if crash is not None and crash.message else str(report.longrepr).splitlines()[-1]
    path = report.nodeid.split("::")[0]
    return {"nodeid": report.nodeid, "suite": Path(path).stem, "when": report.when,
            "outcome": outcome, "duration_s": round(report.duration, 4), "reason": reason[:500]}


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_STATE_KEY, None)
    if state is None:
        return
    _record_compile_cache_use(state)
    if state.run_dir is not None:
        from harness.reporting.report import failure_texts, write_report

        state.benchmarks = _benchmark_document(session.config)
        state.failure_texts = failure_texts(session.config)  # whole messages and tracebacks, folded in the report
        write_report(state.run_dir, state, _capabilities(session.config), exitstatus=int(exitstatus))


def _record_compile_cache_use(state) -> None:
    from harness.performance.compile_cache import cache_use

    use = cache_use()
    if use and any(use.values()):
        state.records.append(Result(
            suite="harness", check="compile caches", metric="FX-graph cache hits", value=use["fxgraph_cache_hit"],
            where="inductor", details={**use, **state.compile_caches}))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE_KEY, None)
    if state is None:
        return
    rows = state.run_times.rows()
    if len(rows) > 1:
        terminalreporter.write_sep("-", "harness: time per suite (s)")
        terminalreporter.write_line(f"{'suite':<28} {'set-up':>8} {'compile':>8} {'measure':>8} {'total':>8} {'tests':>6}")
        for row in rows:
            terminalreporter.write_line(f"{row['suite']:<28} {row['setup_s']:>8.1f} {row['compile_s']:>8.1f} "
                                        f"{row['measure_s']:>8.1f} {row['total_s']:>8.1f} {row['tests']:>6}")
    if state.run_dir is not None:
        terminalreporter.write_line(f"harness report: {state.run_dir / 'report.md'}")


# --- memory budgets (issue 6) ---
# A budget comes from @pytest.mark.memory_budget("12GiB") on the test, else --memory-budget for the
# whole run; it covers the test's call (fixtures load models beforehand, and what they hold counts:
# the budget is for memory in use). harness.performance.memory says how each device is measured.


def _budget_for(item) -> int | None:
    marker = item.get_closest_marker("memory_budget")
    if marker is None:
        return _state(item.config).run.memory_budget_bytes
    if len(marker.args) != 1:
        raise pytest.UsageError(f"{item.nodeid}: memory_budget takes one size, e.g. memory_budget('12GiB')")
    if marker.args[0] is None:  # the test measures memory itself (e.g. runs eager over a budget on purpose)
        return None
    try:
        return parse_bytes(str(marker.args[0]))
    except HarnessUsageError as exc:
        raise pytest.UsageError(f"{item.nodeid}: memory_budget: {exc}") from None


def _record_budget(config, nodeid: str, peak, budget: int, passed: bool) -> None:
    from harness.config import format_bytes

    _state(config).records.append(Result(
        suite=Path(nodeid.split("::")[0]).stem, check="memory budget", metric="peak MiB",
        value=round(peak.peak_bytes / 2**20, 1), threshold=round(budget / 2**20, 1), passed=passed,
        where=peak.method, details={"test": nodeid, "budget": format_bytes(budget), **peak.to_dict()}))


@contextlib.contextmanager
def _budgeted(config, nodeid: str, budget: int):
    from harness.performance.memory import MemoryBudgetExceeded, measure_peak

    try:
        with measure_peak(_state(config).device, budget_bytes=budget) as peak:
            yield peak
    except MemoryBudgetExceeded as exc:
        _record_budget(config, nodeid, exc.peak, budget, passed=False)
        message = str(exc)
    else:
        _record_budget(config, nodeid, peak, budget, passed=True)
        return
    pytest.fail(message, pytrace=False)  # outside the except: the OOM's frames (and tensors) are released


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    budget = _budget_for(item)
    if budget is None:
        return (yield)
    with _budgeted(item.config, item.nodeid, budget):
        return (yield)


@pytest.fixture
def memory_budget(request):
    """`with memory_budget("2GiB") as peak:` fails the test if the block's peak exceeds 2 GiB;
    `peak` (a harness.performance.memory.MemoryPeak) holds the numbers afterwards."""

    def _budget(size):
        try:
            budget = parse_bytes(size) if isinstance(size, str) else int(size)
        except HarnessUsageError as exc:
            pytest.fail(f"memory_budget: {exc}", pytrace=False)
        return _budgeted(request.config, request.node.nodeid, budget)

    return _budget


def _benchmark_document(config) -> dict | None:
    """pytest-benchmark's JSON document for this run's benchmarks (None when none ran)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return None
    try:
        return config.hook.pytest_benchmark_generate_json(
            config=config, benchmarks=session.benchmarks, include_data=True,
            machine_info=session.get_machine_info(),
            commit_info=config.hook.pytest_benchmark_generate_commit_info(config=config))
    except Exception as exc:  # a report without benchmarks beats no report
        return {"benchmarks": [], "error": f"{type(exc).__name__}: {exc}"}

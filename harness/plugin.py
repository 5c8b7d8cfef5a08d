"""The harness's pytest plugin: options, markers, hooks and fixtures, each a thin wrapper.

The only module of `harness` that imports pytest. The run's state is a harness.session.RunSession
and every rule is plain library code; here a HarnessUsageError becomes pytest's usage error (or one
failing line), a refused variant or a missing capability a skip. Registered through the `pytest11`
entry point (name "harness.plugin") and, for checkouts that are not installed, by the root conftest.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from harness.config import MARKERS, OPTIONS, RunConfig
from harness.errors import HarnessUsageError, VariantRefused
from harness.performance import hardware, memory_budget as budgets
from harness.performance.memory import freeze_startup_objects
from harness.results import suite_of
from harness.session import RunSession, start_session
from harness.sharding import (BESIDE_SHARDS_MARKER, beside_shards_first, model_order, select_shard, shard_queue,
                              wait_for_start, waits_for_shards)

_STATE_KEY = pytest.StashKey[RunSession]()


def pytest_addoption(parser):
    group = parser.getgroup("harness", "LLM inference validation harness")
    for name, kwargs in OPTIONS:
        group.addoption(name, **kwargs)


def _usage(fn, *args, **kwargs):
    """Call into the library at configure or collection time: its HarnessUsageError is pytest's
    usage error (one line, exit 4)."""
    try:
        return fn(*args, **kwargs)
    except HarnessUsageError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    state = _usage(start_session, vars(config.option), xdist_workers=len(getattr(config.option, "tx", None) or []),
                   planted_fault=lambda name: config.hook.pytest_harness_planted_fault(name=name))
    config.stash[_STATE_KEY] = state
    config.pluginmanager.register(_OutcomeRecorder(state), "harness-outcomes")
    if state.run.report_dir and not hasattr(config, "workerinput"):
        run_dir = state.open_run_dir()
        if not config.option.xmlpath:
            config.option.xmlpath = str(run_dir / "junit.xml")


def _planted_fault_spec(name: str):
    """Break implementation `name` on purpose (HARNESS_PLANTED_FAULT=<name>) and return True; raise
    KeyError for a name the provider does not know. A checkout's root conftest.py provides it from
    tests/planted_faults.py: the library never imports the faults (harness.session.activate_planted_fault)."""


def pytest_addhooks(pluginmanager):
    from types import SimpleNamespace

    pluginmanager.add_hookspecs(SimpleNamespace(
        pytest_harness_planted_fault=pytest.hookspec(firstresult=True)(_planted_fault_spec)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` on a GPU host: one worker per GPU."""
    from harness.gpu_workers import auto_worker_count

    return auto_worker_count()


def _state(config) -> RunSession:
    return config.stash[_STATE_KEY]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Every benchmark document (and baseline pytest-benchmark saves) names the run's hardware."""
    machine_info[hardware.MACHINE_INFO_KEY] = hardware.run_hardware(_state(config).device)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    """--benchmark-compare against a baseline from other hardware is a usage error, not a verdict
    (pytest-benchmark itself only warns)."""
    _usage(hardware.check_same_hardware, compared_benchmark, {"machine_info": machine_info})


def pytest_report_header(config):
    return _state(config).header_lines()


def pytest_generate_tests(metafunc):
    if "model_spec" in metafunc.fixturenames:
        specs = _state(metafunc.config).specs
        metafunc.parametrize("model_spec", specs, ids=[s.name for s in specs], scope="session")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    state = _state(config)
    # every test of one model, then the next (harness.sharding.model_order says why)
    items[:] = [items[i] for i in model_order([_model_name(item) for item in items], [s.name for s in state.specs])]
    if waits_for_shards():  # the gate's exclusive process: what may set up beside the shards, first
        items[:] = [items[i] for i in beside_shards_first([item.get_closest_marker(BESIDE_SHARDS_MARKER) is not None
                                                           for item in items])]
    on_gpu = state.device.type == "cuda"
    run_slow = config.getoption("--run-slow")
    for item in items:
        if item.get_closest_marker("gpu") and not on_gpu:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA device; this run is on {state.device}"))
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: part of the full profile (pass --run-slow)"))
    if config.getoption("--shard"):
        nodeids, skipped = [item.nodeid for item in items], [item.get_closest_marker("skip") is not None for item in items]
        queue = _usage(shard_queue, config.getoption("--shard"), nodeids, [_model_name(item) for item in items], skipped)
        if queue is not None:  # the gate's shards: every process collects all, each runs what it claims
            order, state.shard_queue = queue
            items[:] = [items[i] for i in order]
            return
        keep = _usage(select_shard, config.getoption("--shard"), nodeids, skipped)
        if not all(keep):
            config.hook.pytest_deselected(items=[item for item, kept in zip(items, keep) if not kept])
            items[:] = [item for item, kept in zip(items, keep) if kept]


def _model_name(item) -> str | None:
    spec = getattr(getattr(item, "callspec", None), "params", {}).get("model_spec")
    return None if spec is None else spec.name


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    freeze_startup_objects()
    queue = _state(session.config).shard_queue
    if queue is None or session.config.option.collectonly:
        return None  # pytest's own loop
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} errors during collection")
    # A gate shard runs the items it claims, passing over the others without a report. It claims the
    # next unit only when the current item is done: claimed before (as the item's `nextitem`), a
    # 36 s single-test unit held the 53 s unit after it, and one shard of an H200 cold gate ran both,
    # 124 s against 77-85 s for the others (session 21). The item's teardown keeps what the next
    # likely item needs; pytest_runtest_setup tears down the rest when another process took that one.
    items = session.items
    position = queue.next_taken(items, -1)
    while position is not None:
        items[position].config.hook.pytest_runtest_protocol(item=items[position],
                                                            nextitem=queue.next_likely(items, position))
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        position = queue.next_taken(items, position)
    return True


def _wait_for_shards() -> None:
    """A process the gate starts beside its shards uses the device alone: it waits for them here
    (at once when there are none, or they are done)."""
    if not wait_for_start():
        pytest.exit("harness: the gate that started this process is gone; stopped before timing anything",
                    returncode=pytest.ExitCode.INTERRUPTED)


def _skip_unless_available(config, *names: str) -> None:
    for name in names:
        reason = _state(config).capability_skip_reason(name)
        if reason:
            pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _state(item.config).shard_queue is not None:
        # the previous item's teardown kept what the item it expected next needs (runtestloop): when
        # another process took that one, tear down the rest (module fixtures) before this one's set-up
        item.session._setupstate.teardown_exact(item)
    if item.get_closest_marker(BESIDE_SHARDS_MARKER) is None:
        _wait_for_shards()
    for marker in item.iter_markers("needs"):
        _skip_unless_available(item.config, *marker.args)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """The test's memory budget (harness.performance.memory_budget) covers its call."""
    _wait_for_shards()  # a beside_shards test set up while they ran
    marker = item.get_closest_marker("memory_budget")
    budget = _usage(budgets.budget_for_test, item.nodeid, None if marker is None else marker.args,
                    _state(item.config).run.memory_budget_bytes)
    if budget is None:
        return (yield)
    with _budgeted(item.config, item.nodeid, budget):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _state(item.config).stamp_phase_times(report)  # here, in the xdist worker that compiled
    return report


def _budgeted(config, nodeid: str, budget: int):
    state = _state(config)
    return budgets.budgeted(state.device, nodeid, budget, record=state.records.append, fail=_fail)


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def run_config(request) -> RunConfig:
    """What this run validates (--model, --device, --dtype, --attn, ...), as resolved from the options."""
    return _state(request.config).run


@pytest.fixture(scope="session")
def device(request):
    """The torch.device every suite runs on (--device, auto: CUDA when present)."""
    return _state(request.config).device


@pytest.fixture(scope="session")
def dtype(request):
    """The compute dtype of the run (--dtype, auto: bfloat16 on CUDA, float32 on CPU)."""
    return _state(request.config).dtype


@pytest.fixture(scope="session")
def device_alone(device):
    """The device with no shard of the gate beside it: a fixture that measures the device in its
    set-up asks for this first (set-ups of beside_shards tests run while the shards do)."""
    _wait_for_shards()
    return device


@pytest.fixture(scope="session")
def tolerances(request):
    """The comparison rules (harness.equivalence.tolerances) with --thresholds applied."""
    return _state(request.config).tolerances


@pytest.fixture(scope="session")
def capabilities(request):
    """The capability matrix: a tuple of harness.backends.capabilities.Capability."""
    return _state(request.config).device_capabilities()


@pytest.fixture(scope="session")
def require(request):
    """require('sdpa_flash', ...) skips the calling test with the matrix's reason when absent."""
    return functools.partial(_skip_unless_available, request.config)


def _usage_guard(fn, *args, **kwargs):
    """Run a loader; a HarnessUsageError fails the test with its one line and no traceback
    (a VariantRefused passes through: the caller turns it into a skip)."""
    try:
        return fn(*args, **kwargs)
    except VariantRefused:
        raise
    except HarnessUsageError as exc:
        message = str(exc)
    _fail(message)


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
    factory = _state(request.config).model_factory(model_spec, device, dtype)
    yield _SkippingFactory(factory)
    factory.clear()


@pytest.fixture(scope="session")
def weights_evidence(model_spec, reference_model, tokenizer, tolerances, request):
    """harness.models.weights' evidence for the model under test, recorded once per model for the report."""
    from harness.models.weights import next_token_entropy

    evidence = next_token_entropy(reference_model, tokenizer)
    _state(request.config).record_weights(model_spec, evidence, tolerances.untrained_entropy_fraction)
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
    """known_transformers_bug(applies, what, fixed_in=(5, 24)): xfail naming a bug of transformers
    releases older than ``fixed_in`` (harness.backends.capabilities.older_transformers) when it applies
    there; otherwise return, so the caller's failure stands."""
    from harness.backends.capabilities import TRANSFORMERS_FIXED_IN, older_transformers

    def check(applies: bool, what: str, fixed_in: tuple[int, int] = TRANSFORMERS_FIXED_IN) -> None:
        version = older_transformers(fixed_in)
        if applies and version:
            pytest.xfail(f"transformers {version}: {what}; passes on transformers {'.'.join(map(str, fixed_in))}")

    return check


@pytest.fixture(scope="session")
def computed_once_per_run(request, device):
    """computed_once_per_run(key, compute) -> compute()'s result, computed by one pytest-xdist worker of
    the run and loaded by the others (harness.worker_share); outside xdist, just compute(). The key
    gains the device kind (a GPU worker of a mixed host never loads another card's result)."""
    from harness.performance.compile_cache import cache_key
    from harness.worker_share import computed_once, share_folder

    folder, on = share_folder(request.config), cache_key(device)
    return lambda key, compute: computed_once(folder, f"{key} on {on}", compute)


@pytest.fixture(scope="session")
def run_dir(request) -> Path | None:
    """This run's report directory (None without --report-dir)."""
    return _state(request.config).run_dir


@pytest.fixture
def record_result(request):
    """record_result(check=..., metric=..., value=..., threshold=..., passed=..., where=..., **details)."""
    return functools.partial(_state(request.config).record_result, suite_of(request.node.nodeid),
                             request.node.nodeid)


@pytest.fixture
def memory_budget(request):
    """`with memory_budget("2GiB") as peak:` fails the test if the block's peak exceeds 2 GiB;
    `peak` (a harness.performance.memory.MemoryPeak) holds the numbers afterwards."""

    def _budget(size):
        try:
            budget = budgets.budget_bytes(size)
        except HarnessUsageError as exc:
            pytest.fail(f"memory_budget: {exc}", pytrace=False)
        return _budgeted(request.config, request.node.nodeid, budget)

    return _budget


# ---------------------------------------------------------------------------------------------
# Outcomes and the report


class _OutcomeRecorder:
    """Hands every test phase's report to the run's session (outcome rows, time per suite)."""

    def __init__(self, state: RunSession):
        self.state = state

    def pytest_runtest_logreport(self, report):
        self.state.record_phase(report)


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_STATE_KEY, None)
    if state is not None:
        state.finish(session.config, int(exitstatus))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE_KEY, None)
    if state is None:
        return
    lines = state.time_table()
    if lines:
        terminalreporter.write_sep("-", "harness: time per suite (s)")
        for line in lines:
            terminalreporter.write_line(line)
    if state.run_dir is not None:
        terminalreporter.write_line(f"harness report: {state.run_dir / 'report.md'}")

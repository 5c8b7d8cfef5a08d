import os

from harness.config import cache_root

pytest_plugins = ["pytester"]

# pytester points HOME at each test's temporary directory, which moved the default cache
# (~/.cache/llm-harness) with it: every in-process suite run converted the GGUF again (~35 s each,
# 12+ runs). The converted model is read-only input, so the tests share the user's cache.
os.environ.setdefault("LLM_HARNESS_CACHE", str(cache_root()))


def _preload_lazy_modules() -> None:
    """pytester's in-process runs drop modules first imported inside them; torch's distributed
    ops cannot be registered twice, so import every model family the tests build up front."""
    import torch
    import transformers  # noqa: F401

    from harness.models.presets import TINY_PRESETS, build_preset

    for name in TINY_PRESETS:
        build_preset(name, torch.device("cpu"), torch.float32)
    import torch.distributed._functional_collectives  # noqa: F401
    import transformers.generation  # noqa: F401

    # quantised loading imports bitsandbytes and transformers' integration lazily; a copy dropped
    # after one in-process run leaves transformers holding a half-imported module
    import importlib

    for name in ("bitsandbytes", "transformers.integrations.bitsandbytes", "transformers.quantizers.auto",
                 "transformers.quantizers.quantizer_bnb_8bit", "transformers.quantizers.quantizer_bnb_4bit",
                 "transformers.integrations.ggml", "gguf"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # absent here: the tests that need it skip


import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-xdist's controller runs no test: on the 2-core CI machine its copy of the preload (~9 s
    # of CPU) only delayed the workers' own
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    _preload_lazy_modules()


@pytest.fixture
def benchmark_gate(pytester, monkeypatch):
    """benchmark_gate(source) -> run(*pytest_args, planted=False): a benchmark suite written from
    `source`, run in-process with its own benchmark storage, its baseline saved first (one passing
    test); ``planted=True`` sets PLANTED_SLOWDOWN, which the source reads to do its work twice."""

    def make(source: str):
        pytester.makepyfile(test_bench=source)
        storage = f"file://{pytester.path / 'perf'}"

        def run(*args, planted=False):
            if planted:
                monkeypatch.setenv("PLANTED_SLOWDOWN", "1")
            else:
                monkeypatch.delenv("PLANTED_SLOWDOWN", raising=False)
            return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model",
                                                "tiny:llama", f"--benchmark-storage={storage}", *args)

        run("--benchmark-save=baseline", "--benchmark-json=baseline.json").assert_outcomes(passed=1)
        return run

    return make


COMPARE_GATE = ("--benchmark-compare=0001", "--benchmark-compare-fail=median:10%")


def check_compare_gate(run) -> None:
    """pytest-benchmark's compare gate against the saved baseline fails the planted slowdown and
    passes the unchanged benchmark (`run` from the benchmark_gate fixture)."""
    slowed = run(*COMPARE_GATE, planted=True)
    assert slowed.ret != 0
    output = slowed.stdout.str() + slowed.stderr.str()
    assert "Performance has regressed" in output
    assert "test_decode_step (0001_baselin) - Field 'median' has failed PercentageRegressionCheck" in output
    unchanged = run(*COMPARE_GATE)
    assert unchanged.ret == 0, unchanged.stdout.str()[-2000:]


@pytest.fixture(autouse=True)
def runs_of_pytest_are_top_level(monkeypatch):
    """`make test` spreads these tests over pytest-xdist workers; the pytest runs the tests start
    themselves (pytester, subprocesses) are still plain runs, not workers: pytest-benchmark turns
    itself off where PYTEST_XDIST_WORKER is set, and the harness's GPU pinning reads it."""
    for variable in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(variable, raising=False)

"""Adding a backend, a quantization scheme or a cache type is one registry entry: the suites pick
the new record up with no suite file changed (issue 17's done-when, checked end to end).

The new records here are copies of existing ones under new names, registered into copies of the
registries for one in-process pytest run over copies of the suite files.
"""

import dataclasses

import pytest

from harness.backends import attention as attention_registry
from harness.backends import capabilities
from harness.backends import cache as cache_registry
from harness.backends import quantization as quantization_registry
from tests.fault_conftest import REPO

NEW_ATTENTION = "sdpa_math_copy"
NEW_CACHE = "dynamic-copy"
NEW_SCHEME = "nf4-copy"
# The suites each kind of record must appear in, by its new name.
EXPECTED = {
    NEW_ATTENTION: ("test_attention_dispatch", "test_attention_kernels", "test_attention_model"),
    NEW_CACHE: ("test_cache_equivalence", "test_kv_cache_memory"),
    NEW_SCHEME: ("test_quantization", "test_memory", "test_benchmarks"),
}
SUITES = sorted({suite for suites in EXPECTED.values() for suite in suites})


@pytest.fixture
def one_new_entry_each(monkeypatch):
    """The whole change a contributor makes: one register call per registry."""
    monkeypatch.setattr(attention_registry, "ATTENTION_BACKENDS", attention_registry.ATTENTION_BACKENDS.copy())
    monkeypatch.setattr(cache_registry, "CACHE_TYPES", cache_registry.CACHE_TYPES.copy())
    monkeypatch.setattr(quantization_registry, "SCHEMES", quantization_registry.SCHEMES.copy())

    math = attention_registry.ATTENTION_BACKENDS["sdpa_math"]
    attention_registry.register(dataclasses.replace(
        math, name=NEW_ATTENTION, kernel=dataclasses.replace(math.kernel, name=NEW_ATTENTION)))
    dynamic = cache_registry.get_cache_type("dynamic")
    cache_registry.CACHE_TYPES.register(dataclasses.replace(dynamic, name=NEW_CACHE))
    quantization_registry.register(dataclasses.replace(quantization_registry.get_scheme("nf4"), name=NEW_SCHEME))
    # the matrix is probed once per process: drop the copy made before (and after) these records existed
    capabilities.detect.cache_clear()
    yield
    capabilities.detect.cache_clear()


def _copy_suites(pytester):
    # other basenames than the suites' own: this process may have imported suites/ already
    pytester.makepyfile(**{f"{suite}_under_test": (REPO / "suites" / f"{suite}.py").read_text() for suite in SUITES})
    pytester.makeconftest((REPO / "suites" / "conftest.py").read_text())


def _run(pytester, *args):
    return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama",
                                        "--device", "cpu", *args)


def test_each_new_entry_is_collected_by_every_suite_of_its_kind(pytester, one_new_entry_each):
    _copy_suites(pytester)
    result = _run(pytester, "--collect-only", "-q")
    collected = [line for line in result.outlines if "::" in line]
    for name, suites in EXPECTED.items():
        for suite in suites:
            hits = [line for line in collected if line.startswith(f"{suite}_under_test.py::") and name in line]
            assert hits, f"{suite} does not parametrise over the newly registered {name}"


def test_the_new_entries_are_checked_for_real(pytester, one_new_entry_each):
    """Not only collected: the new attention backend and cache type run their checks and pass."""
    _copy_suites(pytester)
    result = _run(pytester, "-q", "-rs", "-k", f"({NEW_ATTENTION} and single) or {NEW_CACHE}",
                  "test_attention_model_under_test.py", "test_cache_equivalence_under_test.py",
                  "test_kv_cache_memory_under_test.py")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 3 and not outcomes.get("failed") and not outcomes.get("errors"), result.outlines


def test_without_the_entries_the_suites_do_not_know_them(pytester):
    """The control: the names above come from the registration, not from the suites."""
    _copy_suites(pytester)
    result = _run(pytester, "--collect-only", "-q")
    assert not [line for line in result.outlines if any(name in line for name in EXPECTED)]

"""Planted faults: each breaks one part of cached or speculative decoding; the cache-equivalence,
KV-memory and decoding-shortcut suites, run unchanged through pytester, must fail on it with a message that
names the step and the cache type / decoding mode that diverged. Without the fault the same
selection passes (so the failure is the fault's doing)."""


import pytest

from tests.fault_conftest import run_suite_with_fault



# fault, suite, model, -k selection, lines the failure output must contain
CASES = [
    ("cache_drops_newest_kv", "test_cache_equivalence", "tiny:llama", "matches_no_cache and dynamic",
     ["*dynamic cache vs no cache: logits at step * differ*"]),
    ("cache_duplicates_newest_kv", "test_cache_equivalence", "tiny:llama", "matches_no_cache and dynamic",
     ["*dynamic cache vs no cache: logits at step * differ*"]),
    ("rope_position_off_by_one_in_cached_decode", "test_cache_equivalence", "tiny:llama", "matches_no_cache and (dynamic or static)",
     ["*dynamic cache vs no cache: logits at step * differ*", "*static cache vs no cache: logits at step 1 differ*"]),
    ("static_slot_written_at_wrong_index", "test_cache_equivalence", "tiny:llama", "matches_no_cache and static",
     ["*static cache vs no cache: logits at step * differ*"]),
    ("sliding_window_ignored_in_cached_decode", "test_cache_equivalence", "tiny:mistral", "matches_no_cache and sliding",
     ["*sliding-window cache vs no cache: logits at step * differ*"]),
    # the KV-memory suite: a cache that keeps an extra copy of each decoded token holds more than the formula
    ("cache_duplicates_newest_kv", "test_kv_cache_memory", "tiny:llama", "equal_formula and dynamic",
     ["*dynamic cache holds * bytes; the formula 2 x * gives *"]),
    ("assisted_decoding_accepts_any_draft", "test_decoding_shortcuts", "tiny:llama", "assisted_decoding_equals",
     ["*assisted decoding (assistant: *) vs plain greedy:*at step *"]),
]


def _run_suite(pytester, suite, model, selection, fault=None):
    return run_suite_with_fault(pytester, suite, model=model, selection=selection, module="generation_faults",
                                fault=fault)


@pytest.mark.parametrize("fault, suite, model, selection, expected", CASES, ids=[c[0] for c in CASES])
def test_suite_catches_planted_fault(pytester, fault, suite, model, selection, expected):
    result = _run_suite(pytester, suite, model, selection, fault)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(expected, consecutive=False)


@pytest.mark.parametrize("suite, model, selection", sorted({(c[1], c[2], c[3]) for c in CASES}))
def test_same_selection_passes_without_a_fault(pytester, suite, model, selection):
    result = _run_suite(pytester, suite, model, selection)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]

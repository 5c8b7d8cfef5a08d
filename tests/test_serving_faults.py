"""Planted faults in the serving path: each breaks continuous batching's paged KV cache or its
scheduler (tests/serving_faults.py); the serving suite, run unchanged through pytester, must fail
on it with a message naming the request and the step. Without the fault the same selection passes
(so the failure is the fault's doing)."""

import pytest

from tests.fault_conftest import run_suite_with_fault

SUITE = "test_serving"


MODEL = "tiny:llama"
SELECTION = "served_together and sdpa"  # the equivalence test, paged|sdpa
IMPL = "*continuous batching (paged|sdpa, all submitted together):*"
SERVED = "*request '*' served vs the same request alone with a dynamic cache: *"

# fault, lines the failure output must contain (the implementation; the request, then the step)
CASES = [
    ("block_table_entry_points_at_other_request", [IMPL, SERVED + "step *"]),
    ("kv_written_one_slot_late", [IMPL, SERVED + "step *"]),
    ("chunked_prefill_drops_last_prompt_token", [IMPL, SERVED + "step *"]),
]


def _run_suite(pytester, fault=None):
    return run_suite_with_fault(pytester, SUITE, model=MODEL, selection=SELECTION, module="serving_faults", fault=fault)


@pytest.mark.parametrize("fault, expected", CASES, ids=[c[0] for c in CASES])
def test_serving_suite_catches_planted_fault(pytester, fault, expected):
    result = _run_suite(pytester, fault)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(expected, consecutive=False)


def test_same_selection_passes_without_a_fault(pytester):
    result = _run_suite(pytester)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and not outcomes.get("skipped"), (
        "the selection must run (not skip) the equivalence test: " + result.stdout.str()[-2000:])

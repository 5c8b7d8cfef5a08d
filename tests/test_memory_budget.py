"""Memory budgets and the measurement behind them.

Planted faults: a test that allocates beyond its budget (marker, fixture and --memory-budget
forms) and one that runs out of memory inside its budgeted block must fail with the numbers
(peak, budget, method), while a modest test under the same budget passes.
"""

import json

from harness.config import format_bytes

import pytest
import torch

from harness.performance.memory import MemoryBudgetExceeded, measure_peak
from harness.performance.memory_counters import _proc_rss
from harness.performance.predictions import (AttentionShape, attention_shape, parameter_counts, predict_kv_cache_bytes,
                                 predict_weight_bytes)

MiB = 2**20


def test_cpu_peak_sees_an_allocation_that_is_gone_by_the_end():
    with measure_peak("cpu") as peak:
        block = torch.ones(64 * MiB // 4)
        del block
    assert peak.increase_bytes == 64 * MiB, peak.describe()
    assert peak.retained_bytes == 0, peak.describe()
    assert "storage tracker" in peak.method


def test_inner_measurement_does_not_hide_the_outer_peak():
    with measure_peak("cpu") as outer:
        big = torch.ones(96 * MiB // 4)
        del big
        with measure_peak("cpu") as inner:
            small = torch.ones(8 * MiB // 4)
            del small
    assert outer.increase_bytes == 96 * MiB, outer.describe()
    assert inner.increase_bytes == 8 * MiB, inner.describe()


def test_budget_exceeded_raises_with_the_numbers():
    with pytest.raises(MemoryBudgetExceeded) as info:
        with measure_peak("cpu", budget_bytes=1):
            pass
    assert "peak" in str(info.value) and "budget" in str(info.value) and "method" in str(info.value)


def test_weight_prediction_per_scheme_follows_its_formula():
    from harness.models.presets import get_preset

    counts = parameter_counts(get_preset("tiny:llama").make_config())
    # vocab 49152 x 64 twice (untied), 2 layers of q,o (64x64), k,v (32x64), MLP 3 x 64x128, 5 norms of 64
    linear = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert counts.linear == linear and counts.total == linear + 2 * 49152 * 64 + 5 * 64
    assert predict_weight_bytes(counts, torch.bfloat16).bytes == 2 * counts.total
    dense = 4 * (counts.total - linear)
    assert predict_weight_bytes(counts, torch.float32, "int8").bytes == dense + linear + 4 * counts.linear_out_features
    assert predict_weight_bytes(counts, torch.float32, "nf4").bytes == dense + linear // 2 + linear // 64 * 4


def test_kv_prediction_counts_kv_heads_not_query_heads():
    from harness.models.presets import get_preset

    assert predict_kv_cache_bytes(AttentionShape(2, 4, 2, 16), batch=3, seq_len=10, dtype=torch.float32) == 2 * 2 * 3 * 2 * 16 * 10 * 4
    assert attention_shape(get_preset("tiny:falcon-mqa").make_config()).kv_heads == 1
    assert attention_shape(get_preset("tiny:llama").make_config()).kv_heads == 2


PLANTED = '''
import pytest
import torch

@pytest.mark.memory_budget("{budget}")
def test_memory_hog():
    hog = torch.ones({hog_elems})  # planted fault: {hog_mib} MiB more than the process held
    assert hog.sum() > 0

@pytest.mark.memory_budget("{budget}")
def test_modest():
    assert torch.ones(1024).sum() == 1024

@pytest.mark.memory_budget("{budget}")
def test_out_of_memory():
    torch.empty(2**50, dtype=torch.uint8)  # planted fault: 1 PiB

def test_hog_in_fixture_block(memory_budget):
    with memory_budget("{budget}"):
        hog = torch.ones({hog_elems})
        del hog

def test_unmarked_hog():
    hog = torch.ones({hog_elems})
    assert hog.sum() > 0
'''


@pytest.fixture
def planted(pytester):
    """Budgets are for the process's memory in use (on CPU: its resident set at the block's start
    plus the block's tensor peak), so set one 256 MiB above what it holds now; the hog takes 512 MiB."""
    budget_mib = _proc_rss() // MiB + 256
    pytester.makepyfile(test_planted=PLANTED.format(budget=f"{budget_mib}MiB", hog_elems=512 * MiB // 4, hog_mib=512))

    def run(*args):
        return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama", *args)

    return run, budget_mib


def test_memory_hog_fails_with_peak_budget_and_method(planted):
    run, budget_mib = planted
    result = run("-k", "memory_hog or modest")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"memory budget exceeded: peak * > budget {format_bytes(budget_mib * MiB)} (over by *); "
                                 "*increase 512.00 MiB*[[]method: CPU: peak of live tensor storage*"])


def test_out_of_memory_inside_the_budget_is_a_budget_failure_not_a_crash(planted):
    run, _ = planted
    result = run("-k", "out_of_memory")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*out of memory inside the budgeted block (RuntimeError*can't allocate memory*peak*method*"])
    assert "Traceback" not in result.stdout.str()


def test_fixture_block_over_budget_fails(planted):
    run, _ = planted
    result = run("-k", "fixture_block")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*memory budget exceeded: peak*"])


def test_run_wide_budget_applies_to_unmarked_tests_and_lands_in_the_report(planted, pytester):
    run, budget_mib = planted
    result = run("-k", "unmarked", "--memory-budget", f"{budget_mib}MiB", "--report-dir", "out")
    result.assert_outcomes(failed=1)
    data = json.loads((pytester.path / "out" / "latest" / "results.json").read_text())
    budget_rows = [r for r in data["results"] if r["check"] == "memory budget"]
    assert len(budget_rows) == 1 and budget_rows[0]["passed"] is False
    assert budget_rows[0]["value"] > budget_rows[0]["threshold"] == budget_mib
    assert "| memory budget | peak MiB |" in (pytester.path / "out" / "latest" / "report.md").read_text()


def test_unreadable_budget_is_a_usage_error(pytester):
    pytester.makepyfile(test_bad='''
import pytest
@pytest.mark.memory_budget("lots")
def test_x():
    pass
''')
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama")
    assert result.ret != 0
    assert "memory_budget: cannot read 'lots' as a size" in result.stdout.str() + result.stderr.str()

"""The regression gate and the benchmark report.

Planted fault: a benchmark whose step does its wait twice (a redundant recomputation) must fail
the gate against a baseline saved without it, both through pytest-benchmark's
--benchmark-compare-fail and through harness.performance.regression (which also judges extra_info rates);
the unchanged benchmark must pass the same gate. A baseline from other hardware gets no verdict
from either.
"""

import json
import re

import pytest

from harness.errors import HarnessUsageError
from harness.performance.hardware import MACHINE_INFO_KEY, cpu_model
from harness.performance.regression import compare, load_benchmarks, main, parse_rule
from tests.conftest import COMPARE_GATE, check_compare_gate

BENCH = '''
import os
import time

def decode_step():
    time.sleep(0.02)
    if os.environ.get("PLANTED_SLOWDOWN"):
        time.sleep(0.02)  # planted fault: the same work done twice

def test_decode_step(benchmark):
    benchmark.pedantic(decode_step, rounds=7, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(kind="decode", batch=1, token_latencies_ms=[t * 1e3 for t in benchmark.stats.stats.data])
    benchmark.extra_info["decode_tokens_per_s"] = 1.0 / benchmark.stats.stats.median
'''


@pytest.fixture
def bench(benchmark_gate):
    return benchmark_gate(BENCH)


def test_pytest_benchmark_gate_fails_the_planted_slowdown_and_passes_the_unchanged(bench):
    check_compare_gate(bench)


def test_harness_gate_catches_the_slowdown_in_time_and_in_tokens_per_second(bench, pytester, capsys):
    bench("--benchmark-json=slow.json", planted=True)
    bench("--benchmark-json=same.json")
    rules = ["median:10%", "extra_info.decode_tokens_per_s:10%"]
    slow = compare(pytester.path / "baseline.json", pytester.path / "slow.json", rules)
    assert [c.rule.field for c in slow if c.regressed] == ["median", "extra_info.decode_tokens_per_s"]
    changes = {c.rule.field: c.change for c in slow}  # twice the work: time +100 %, tokens/s -50 %
    assert 0.7 < changes["median"] < 1.3 and 0.35 < changes["extra_info.decode_tokens_per_s"] < 0.65, changes
    same = compare(pytester.path / "baseline.json", pytester.path / "same.json", rules)
    assert same and not any(c.regressed for c in same), [c.describe() for c in same]
    assert main([str(pytester.path / "baseline.json"), str(pytester.path / "slow.json")]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    assert main([str(pytester.path / "baseline.json"), str(pytester.path / "same.json")]) == 0


def test_report_gets_benchmark_json_table_and_standalone_html(bench, pytester):
    bench("--report-dir", "out")
    latest = pytester.path / "out" / "latest"
    assert load_benchmarks(latest / "benchmarks.json")  # pytest-benchmark's own format, with every round
    assert "## Benchmarks" in (latest / "report.md").read_text()
    page = (latest / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # tokens/s vs batch and the latency distribution
    assert "<table" in page and "test_decode_step" in page and "src=\"http" not in page


@pytest.mark.parametrize("text", ["median", "median:ten%", "speed:10%", "median:10%%"])
def test_unreadable_rule_is_a_usage_error(text):
    with pytest.raises(HarnessUsageError, match="regression rule"):
        parse_rule(text)


def test_rules_read_like_pytest_benchmarks():
    assert parse_rule("median:10%").limit == pytest.approx(0.10)
    assert not parse_rule("mean:0.001").relative
    assert parse_rule("extra_info.mbu:5%").higher_is_better


def test_a_file_that_is_not_benchmark_json_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(HarnessUsageError, match="not pytest-benchmark JSON"):
        load_benchmarks(bad)


def _document(new_tokens: int, median: float) -> dict:
    return {"benchmarks": [{"fullname": "suites/test_benchmarks.py::test_decode[m-sdpa-1]",
                            "stats": {"median": median},
                            "extra_info": {"batch": 1, "prompt_tokens": 512, "new_tokens": new_tokens}}]}


def test_a_baseline_that_timed_other_work_is_a_usage_error_not_a_verdict(tmp_path, capsys):
    """Half the tokens take about half the time: against a 32-token baseline a 16-token run would
    pass any slowdown under ~2x. The gate must refuse the comparison and say why."""
    with pytest.raises(HarnessUsageError, match=r"other work in 1 benchmark.*new_tokens 32 -> 16"):
        compare(_document(32, 1.0), _document(16, 0.9), ["median:10%"])
    assert [c.regressed for c in compare(_document(16, 1.0), _document(16, 1.5), ["median:10%"])] == [True]
    for name, tokens in (("base.json", 32), ("run.json", 16)):
        (tmp_path / name).write_text(json.dumps(_document(tokens, 1.0)))
    assert main([str(tmp_path / "base.json"), str(tmp_path / "run.json")]) == 2
    assert "record a new baseline" in capsys.readouterr().err


XEON = {"cpu": "Intel(R) Xeon(R) Processor (family 6 model 207 stepping 2)", "cpus": 2, "accelerator": "cpu"}
EPYC = {"cpu": "AMD EPYC (family 25 model 1 stepping 1)", "cpus": 2, "accelerator": "cpu"}


def _on(document: dict, hardware_record: dict | None) -> dict:
    return {**document, "machine_info": {} if hardware_record is None else {MACHINE_INFO_KEY: hardware_record}}


@pytest.mark.parametrize("other, named", [
    (EPYC, "CPU 'Intel(R) Xeon(R) Processor (family 6 model 207 stepping 2)' -> 'AMD EPYC"),
    ({**XEON, "cpus": 16}, "CPUs 2 -> 16"),
    ({**XEON, "accelerator": "NVIDIA H100 80GB HBM3"}, "device 'cpu' -> 'NVIDIA H100 80GB HBM3'"),
], ids=["cpu model", "cpu count", "device"])
def test_a_baseline_from_other_hardware_is_a_usage_error_not_a_verdict(other, named, tmp_path, capsys):
    """The same CI command ran 336 s on one 2-core host and 830 s on another (session 22): a baseline
    from other hardware would fail correct code or pass a real slowdown. No verdict, and the reason."""
    with pytest.raises(HarnessUsageError, match=f"other hardware \\({re.escape(named)}"):
        compare(_on(_document(16, 1.0), XEON), _on(_document(16, 1.0), other), ["median:10%"])
    same = compare(_on(_document(16, 1.0), XEON), _on(_document(16, 1.5), dict(XEON)), ["median:10%"])
    assert [c.regressed for c in same] == [True]
    (tmp_path / "base.json").write_text(json.dumps(_on(_document(16, 1.0), XEON)))
    (tmp_path / "run.json").write_text(json.dumps(_on(_document(16, 1.0), other)))
    assert main([str(tmp_path / "base.json"), str(tmp_path / "run.json")]) == 2
    assert "record a baseline here" in capsys.readouterr().err


def test_a_document_without_a_hardware_record_is_still_compared():
    """pytest-benchmark JSON written without the harness names no hardware: nothing to check it by."""
    assert [c.regressed for c in compare(_on(_document(16, 1.0), None), _on(_document(16, 1.5), EPYC),
                                         ["median:10%"])] == [True]


def test_the_cpu_is_named_with_its_family_model_and_stepping():
    """Cloud hosts give one generic name to CPU generations of different speed."""
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\ncpu family\t: 6\nmodel\t\t: 207\n"
            "stepping\t: 2\n\nprocessor\t: 1\nmodel name\t: something else\n")
    assert cpu_model(text) == "Intel(R) Xeon(R) Processor (family 6 model 207 stepping 2)"
    assert cpu_model("") == cpu_model("processor\t: 0\n")  # no /proc/cpuinfo fields: the platform's name


@pytest.mark.filterwarnings("ignore:Benchmark machine_info is different")  # pytest-benchmark's own, in the run inside
def test_benchmark_documents_name_the_hardware_and_pytest_benchmark_compare_refuses_other_hardware(bench, pytester):
    """The plugin writes the run's hardware into machine_info (benchmarks.json and saved baselines),
    and pytest-benchmark's own --benchmark-compare, which only warns about another machine_info,
    stops with a usage error when the saved baseline's hardware differs."""
    recorded = json.loads((pytester.path / "baseline.json").read_text())["machine_info"][MACHINE_INFO_KEY]
    assert recorded["accelerator"] == "cpu" and recorded["cpus"] >= 1 and recorded["cpu"]
    saved = next((pytester.path / "perf").rglob("0001_baseline.json"))
    document = json.loads(saved.read_text())
    document["machine_info"][MACHINE_INFO_KEY]["cpu"] = "Another CPU (family 1 model 2 stepping 3)"
    saved.write_text(json.dumps(document))
    refused = bench(*COMPARE_GATE)
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    assert "the baseline ran on other hardware (CPU 'Another CPU" in refused.stderr.str()

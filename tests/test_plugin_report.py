"""The plugin end to end: header, parametrization over models, skips with reasons, the report."""

import json

import pytest

SUITE = '''
import pytest

def test_reference_is_eager(model_spec, reference_model):
    assert reference_model.config._attn_implementation == "eager"

@pytest.mark.needs("sdpa_cudnn")
def test_needs_cudnn(model_spec):
    pass

@pytest.mark.gpu
def test_gpu_only():
    pass

def test_records(record_result):
    record_result("demo", "max_abs_error", 0.125, threshold=0.5, passed=True, where="layer 3")
    for rows in ("| a |", "| a |\\n| b |"):  # a table re-recorded as it grows: the last one is shown
        record_result("table", "rows", rows.count("|") // 2, section="Demo table", table="| x |\\n|---|\\n" + rows)

def test_fails():
    assert 1 == 2, "planted failure"

def test_proves_nothing_here():
    from harness.results import inconclusive_reason
    pytest.skip(inconclusive_reason("the shortcut never ran on this model"))
'''


@pytest.fixture
def run(pytester):
    pytester.makepyfile(test_demo=SUITE)

    def _run(*args):
        return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "-rs", *args)

    return _run


def test_header_shows_models_device_and_capability_matrix(run):
    result = run("--model", "tiny:llama", "-k", "reference")
    result.stdout.fnmatch_lines(["harness: models tiny:llama (RANDOM weights)*", "harness: device cpu, dtype float32*",
                                 "harness capabilities:", "*sdpa_math*yes*", "*sdpa_cudnn*no*CUDA*"])


def test_model_fixtures_are_parametrized_over_every_model(run):
    result = run("--model", "tiny:llama,tiny:gpt2", "-k", "reference")
    result.assert_outcomes(passed=2)


def test_skips_state_the_capability_reason(run):
    result = run("--model", "tiny:llama", "-k", "cudnn or gpu")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*sdpa_cudnn unavailable: cuDNN attention needs a CUDA device*"])
    result.stdout.fnmatch_lines(["*needs a CUDA device; this run is on cpu*"])


def test_report_is_written_with_results_and_reasons(run, pytester):
    result = run("--model", "tiny:llama", "--report-dir", "out")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    latest = pytester.path / "out" / "latest"
    assert latest.is_symlink()
    report = (latest / "report.md").read_text()
    assert report.startswith("# Inference validation report: FAIL")
    assert "planted failure" in report and "| demo | max_abs_error | 0.125 | 0.5 | pass | layer 3 |" in report
    assert "sdpa_cudnn" in report and "needs a CUDA device" in report
    section = report.split("## Demo table", 1)[1].split("## ", 1)[0]
    assert "| x |\n|---|\n| a |\n| b |" in section and report.count("## Demo table") == 1
    assert "| table | rows |" not in report  # whole tables are not measurement rows
    assert "<table>" in (latest / "report.html").read_text().split("Demo table", 1)[1]
    data = json.loads((latest / "results.json").read_text())
    assert data["suites"]["test_demo"] == {"passed": 2, "failed": 1, "skipped": 2, "inconclusive": 1}
    assert "1 inconclusive" in report and "inconclusive: the shortcut never ran on this model" in report
    assert (latest / "junit.xml").read_text().count("<testcase") == 6
    assert json.loads((latest / "capabilities.json").read_text())[0]["name"] == "eager"


def test_each_run_gets_a_new_directory(run, pytester):
    run("--model", "tiny:llama", "-k", "records", "--report-dir", "out")
    run("--model", "tiny:llama", "-k", "records", "--report-dir", "out")
    runs = [p for p in (pytester.path / "out").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 2
    assert not [p for p in (pytester.path / "out").rglob(".*tmp*")]


def test_a_gate_part_writes_its_data_and_timeline_but_no_report(run, pytester, monkeypatch):
    """A process the gate started (harness.sharding.GATE_STARTED_VARIABLE) leaves the rendering to
    the gate's merge, and its results.json says how long it took to start and how long it waited."""
    import time

    from harness import sharding

    monkeypatch.setitem(sharding._waited, "seconds", 3.0)  # an earlier in-process run waited: not this one's
    monkeypatch.setenv("HARNESS_GATE_STARTED", repr(time.time() - 5.0))
    run("--model", "tiny:llama", "-k", "records", "--report-dir", "out")
    latest = pytester.path / "out" / "latest"
    assert sorted(p.name for p in latest.iterdir()) == ["capabilities.json", "junit.xml", "results.json"]
    timeline = json.loads((latest / "results.json").read_text())["process"]
    assert 5.0 <= timeline["startup_s"] < 120 and timeline["waited_s"] == 0.0
    monkeypatch.delenv("HARNESS_GATE_STARTED")
    run("--model", "tiny:llama", "-k", "records", "--report-dir", "out")
    assert (latest / "report.md").is_file() and "process" not in json.loads((latest / "results.json").read_text())


GROUPING_SUITE = '''
import pytest

@pytest.fixture(scope="session")
def loaded(model_spec):
    with open("loads.txt", "a") as log:
        log.write(model_spec.name + "\\n")
    return model_spec.name

@pytest.mark.parametrize("kind", ["a", "b", "c"])
def test_first(loaded, kind):
    pass

def test_second(loaded):
    pass

@pytest.mark.parametrize("kind", ["d", "e"])
def test_third(loaded, kind):
    pass
'''


def test_each_model_is_set_up_once_for_all_its_tests(pytester):
    """pytest alone interleaves models across parametrized tests (reloading the default model ~10
    times per run, session 3); the plugin groups every test of one model together."""
    pytester.makepyfile(test_grouping=GROUPING_SUITE)
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider",
                                          "--model", "tiny:llama,tiny:gpt2,tiny:qwen2")
    result.assert_outcomes(passed=18)
    assert (pytester.path / "loads.txt").read_text().split() == ["tiny:llama", "tiny:gpt2", "tiny:qwen2"]

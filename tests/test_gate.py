"""The gate command: its pytest command line, its exit status, and its baseline comparison."""

import json
import subprocess
import sys

from harness import gate


def command(*argv):
    opts, extra = gate.parse(list(argv))
    return gate.build_command(opts, extra)[0]


def test_quick_profile_runs_every_suite_with_a_report():
    cmd = command("--model", "tiny:llama")
    assert cmd[cmd.index("pytest") + 1].endswith("suites")
    assert cmd[cmd.index("--model") + 1] == "tiny:llama" and "--report-dir" in cmd and "--run-slow" not in cmd


def test_full_profile_adds_slow_tests():
    assert "--run-slow" in command("--profile", "full")


def test_named_suites_replace_the_default_selection():
    cmd = command("--model", "tiny:llama", "--", "suites/test_acceptance.py", "-k", "paris")
    assert not any(a.endswith("/suites") for a in cmd) and "suites/test_acceptance.py" in cmd


def test_budget_and_thresholds_are_passed_through():
    cmd = command("--memory-budget", "70GiB", "--thresholds", "t.json")
    assert cmd[cmd.index("--memory-budget") + 1] == "70GiB" and cmd[cmd.index("--thresholds") + 1] == "t.json"


def test_gate_exit_status_follows_the_checks(tmp_path):
    """A passing and a failing suite, each run through the real command on a tiny preset."""
    (tmp_path / "conftest.py").write_text("pytest_plugins = ['harness.plugin']\n")
    (tmp_path / "test_ok.py").write_text("def test_ok(reference_model):\n    assert reference_model\n")
    (tmp_path / "test_bad.py").write_text("def test_bad(reference_model):\n    assert False, 'planted'\n")
    base = [sys.executable, "-m", "harness.gate", "--model", "tiny:llama", "--device", "cpu",
            "--report-dir", str(tmp_path / "reports"), "--suites", str(tmp_path)]
    ok = subprocess.run(base + ["--", str(tmp_path / "test_ok.py")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:]
    bad = subprocess.run(base + ["--", str(tmp_path / "test_bad.py")], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout[-2000:]
    report = (tmp_path / "reports" / "latest" / "report.md").read_text()
    assert report.startswith("# Inference validation report: FAIL") and "planted" in report


def test_missing_benchmarks_fail_a_baseline_comparison(tmp_path, capsys):
    opts, _ = gate.parse(["--baseline", str(tmp_path / "base.json"), "--report-dir", str(tmp_path)])
    assert gate._benchmarks_after_run(opts) == 1
    assert "no benchmarks were recorded" in capsys.readouterr().err


def test_baseline_is_saved_from_the_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "latest").symlink_to("run")
    (tmp_path / "run" / "benchmarks.json").write_text(json.dumps({"benchmarks": []}))
    opts, _ = gate.parse(["--save-baseline", str(tmp_path / "base.json"), "--report-dir", str(tmp_path)])
    assert gate._benchmarks_after_run(opts) == 0
    assert json.loads((tmp_path / "base.json").read_text()) == {"benchmarks": []}

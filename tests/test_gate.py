"""The gate command: its pytest command line, its exit status, and its baseline comparison."""

import json
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("user_prefix", [None, "/my/bytecode"])
def test_processes_keep_bytecode_in_the_cache_where_the_environment_forbids_it_beside_the_sources(
        monkeypatch, tmp_path, user_prefix):
    monkeypatch.setenv("LLM_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    if user_prefix:
        monkeypatch.setenv("PYTHONPYCACHEPREFIX", user_prefix)
    else:
        monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    opts, extra = gate.parse(["--model", "tiny:llama"])
    env = gate.build_command(opts, extra)[1]
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["PYTHONPYCACHEPREFIX"] == (user_prefix or str(tmp_path / "bytecode"))


def test_processes_write_bytecode_as_python_does_where_the_environment_allows_it(monkeypatch):
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    opts, extra = gate.parse(["--model", "tiny:llama"])
    assert "PYTHONPYCACHEPREFIX" not in gate.build_command(opts, extra)[1]


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


# ---------------------------------------------------------------------------------------------
# Side by side on one GPU (harness.sharding): how many processes, and one report from them


@pytest.mark.parametrize("argv, gpus, expected", [
    (["--model", "smollm2-135m"], 1, 6),                          # small model on a GPU host (16 CPUs)
    (["--model", "smollm2-135m", "--device", "cpu"], 1, 1),
    (["--model", "smollm2-135m"], 0, 1),                          # no GPU
    (["--model", "random:llama-7b"], 1, 1),                       # references sized by free memory
    (["--model", "smollm2-135m", "--memory-budget", "9GiB"], 1, 1),  # NVML reads the whole device
    (["--model", "smollm2-135m", "--jobs", "2"], 0, 2),
    (["--model", "smollm2-135m", "--", "-m", "gpu"], 1, 1),       # the user chose the selection
])
def test_side_by_side_processes(argv, gpus, expected, monkeypatch):
    monkeypatch.setattr(gate, "visible_gpu_count", lambda device: 0 if device == "cpu" else gpus)
    monkeypatch.setattr(gate.os, "cpu_count", lambda: 16)
    opts, extra = gate.parse(argv)
    assert gate.resolve_jobs(opts, extra)[0] == expected


def test_dry_run_lists_shards_then_the_exclusive_tests(capsys):
    assert gate.main(["--model", "tiny:llama", "--jobs", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.index("# shard 1/2") < out.index("# shard 2/2") < out.index("# exclusive")
    assert "-m not exclusive --shard 1/2" in out and "-m not exclusive --shard 2/2" in out
    assert out.rstrip().endswith("-m exclusive")


def test_side_by_side_gate_merges_one_report(tmp_path):
    """Two shards and the exclusive process, through the real command: one report, the failure in
    it, the exclusive test run alone (without the shared-device flag), every test once."""
    (tmp_path / "conftest.py").write_text("pytest_plugins = ['harness.plugin']\n")
    (tmp_path / "test_mix.py").write_text(
        "import os\nimport pytest\n"
        "def test_ok(reference_model):\n    assert reference_model\n"
        "def test_bad():\n    assert False, 'planted'\n"
        "@pytest.mark.exclusive\n"
        "def test_alone(record_result):\n"
        "    record_result('env', 'shared', os.environ.get('HARNESS_SHARED_DEVICE', 'no'))\n")
    run = subprocess.run([sys.executable, "-m", "harness.gate", "--model", "tiny:llama", "--device", "cpu", "--jobs", "2",
                          "--report-dir", str(tmp_path / "reports"), "--suites", str(tmp_path), "--",
                          str(tmp_path / "test_mix.py")], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    assert any(line.strip().startswith("FAILED") and "test_bad" in line for line in run.stdout.splitlines())
    latest = tmp_path / "reports" / "latest"
    summary = json.loads((latest / "results.json").read_text())
    calls = sorted(row["nodeid"].split("::")[-1] for row in summary["outcomes"] if row["when"] == "call")
    assert calls == ["test_alone", "test_bad", "test_ok[tiny:llama]"]
    assert [p["name"] for p in summary["phases"]] == ["shard 1/2", "shard 2/2", "exclusive"]
    assert all(0 < p["startup_s"] < summary["wall_time_s"] and p["waited_s"] >= 0 for p in summary["phases"])
    assert "process" not in summary and "| start-up s | waited s |" in (latest / "report.md").read_text()
    assert [r["value"] for r in summary["results"] if r["check"] == "env"] == ["no"]
    assert (latest / "report.md").read_text().startswith("# Inference validation report: FAIL")
    assert sorted(p.name for p in (latest / "logs").glob("*.log")) == ["exclusive.log", "shard-1-of-2.log",
                                                                       "shard-2-of-2.log"]
    assert not list((tmp_path / "reports").glob(".gate-parts-*"))


def test_a_profile_sets_slow_tests_and_the_search_together():
    """One table (harness.profiles): the gate's profile picks the slow tests and hypothesis' search."""
    for name, slow, search in (("quick", False, "ci"), ("full", True, "full")):
        cmd, env = gate.build_command(*gate.parse(["--profile", name]))
        assert ("--run-slow" in cmd) == slow and env["HYPOTHESIS_PROFILE"] == search

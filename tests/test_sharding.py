"""The gate's side-by-side run (harness.sharding, harness.reporting.merge): every test in exactly one
shard, whole functions together, and one report from several processes."""

import xml.etree.ElementTree as ET

import pytest

from harness.reporting.merge import merge_junit, merge_suite_times, merged_exit_status
from harness.sharding import claimed_run, file_claim, item_groups

NODEIDS = [f"suites/test_a.py::test_big[{i}]" for i in range(6)] + [
    "suites/test_a.py::test_one", "suites/test_b.py::test_two[x]", "suites/test_b.py::test_two[y]",
    "suites/test_b.py::test_three", "suites/test_a.py::test_big[other-model]"]


def test_groups_are_runs_of_one_function():
    assert item_groups(NODEIDS) == [[0, 1, 2, 3, 4, 5], [6], [7, 8], [9], [10]]


@pytest.mark.parametrize("pattern", ["abab", "aabb", "abba", "aaaa", "baaa"])
def test_processes_taking_turns_run_every_item_once_and_know_their_next_item(pattern):
    """Two processes claim from one shared set, taking turns in `pattern` (repeated): together they
    run every item exactly once, and each announces as its next item the one it then runs."""
    taken = set()

    def claim(key):
        if key in taken:
            return False
        taken.add(key)
        return True

    runs = {"a": claimed_run(NODEIDS, claim), "b": claimed_run(NODEIDS, claim)}
    ran = {"a": [], "b": []}
    announced = {"a": [], "b": []}
    step = 0
    while runs:
        who = pattern[step % len(pattern)]
        step += 1
        if who not in runs:
            who = next(iter(runs))
        try:
            position, following = next(runs[who])
        except StopIteration:
            del runs[who]
            continue
        ran[who].append(position)
        announced[who].append(following)
    assert sorted(ran["a"] + ran["b"]) == list(range(len(NODEIDS)))
    for who in "ab":
        assert announced[who] == (ran[who][1:] + [None] if ran[who] else [])


def test_claims_are_exclusive_between_processes(tmp_path):
    first, second = file_claim(tmp_path / "claims"), file_claim(tmp_path / "claims")
    assert first("0:x") and not second("0:x") and second("1:y") and not first("1:y")


def test_merged_status_ignores_empty_shards():
    assert merged_exit_status([0, 5, 0]) == 0
    assert merged_exit_status([0, 1, 5]) == 1
    assert merged_exit_status([5, 5]) == 5
    assert merged_exit_status([1, 4]) == 4


def test_suite_times_are_summed_over_processes():
    row = {"suite": "test_a", "setup_s": 1.0, "compile_s": 2.0, "measure_s": 3.0, "tests": 2, "total_s": 6.0}
    total = {**row, "suite": "total"}
    merged = merge_suite_times([[row, total], [dict(row, measure_s=5.0), total]])
    assert merged[0] == {"suite": "test_a", "setup_s": 2.0, "compile_s": 4.0, "measure_s": 8.0, "tests": 4,
                         "total_s": 14.0}
    assert merged[-1]["suite"] == "total" and merged[-1]["total_s"] == 14.0


def test_junit_files_merge_into_one_suite(tmp_path):
    for i, outcome in enumerate(["", "<failure message='x'/>"]):
        (tmp_path / f"{i}.xml").write_text(
            f'<testsuites><testsuite name="pytest" tests="1" errors="0" failures="{i}" skipped="0" time="1.5">'
            f'<testcase classname="t" name="test_{i}">{outcome}</testcase></testsuite></testsuites>')
    merge_junit([tmp_path / "0.xml", tmp_path / "1.xml", tmp_path / "missing.xml"], tmp_path / "junit.xml")
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("time")) == ("2", "1", "3.000")
    assert [c.get("name") for c in suite.iter("testcase")] == ["test_0", "test_1"]


SHARDED_SUITE = '''
import pytest

@pytest.mark.parametrize("i", range(3))
def test_many(i):
    pass

def test_single():
    pass
'''


def test_a_process_runs_only_what_it_claims(pytester, tmp_path):
    """A process sharing the claims directory with one that has taken every group runs nothing;
    a group whose claim is released is run by the next process, and only that group."""
    pytester.makepyfile(test_demo=SHARDED_SUITE)
    claims = tmp_path / "claims"
    args = ["-p", "harness.plugin", "-p", "no:cacheprovider", "--device", "cpu", "--shard-claims", str(claims), "-v",
            "--rootdir", str(pytester.path)]  # node ids, so claim keys, are relative to it

    def passed(result):
        return [line.split(" ")[0].split("::")[-1] for line in result.outlines if " PASSED" in line]

    assert passed(pytester.runpytest_inprocess(*args)) == ["test_many[0]", "test_many[1]", "test_many[2]", "test_single"]
    assert passed(pytester.runpytest_inprocess(*args)) == []
    single = [p for p in claims.iterdir() if p.read_text().rstrip().endswith("test_single")]
    assert len(single) == 1 and len(list(claims.iterdir())) == 2  # one claim per group
    single[0].unlink()
    assert passed(pytester.runpytest_inprocess(*args)) == ["test_single"]


def test_memory_meter_does_not_read_nvml_on_a_shared_device(monkeypatch):
    """NVML reads the whole device: beside other shards it would count their memory as this test's."""
    from harness import memory

    monkeypatch.setattr(memory, "_nvml_handle", lambda device: pytest.fail("NVML was opened on a shared device"))
    monkeypatch.setenv("HARNESS_SHARED_DEVICE", "1")
    meter = memory._CudaMeter("cuda:0")
    assert meter.nvml is None and "NVML not read: other processes share the device" in meter.result.method


def test_waiting_process_starts_when_the_flag_appears(tmp_path):
    import threading

    from harness.sharding import wait_for_start

    flag = tmp_path / "go"
    assert wait_for_start({})
    threading.Timer(0.3, flag.touch).start()
    assert wait_for_start({"HARNESS_START_AFTER": str(flag)}, poll_s=0.05) and flag.exists()

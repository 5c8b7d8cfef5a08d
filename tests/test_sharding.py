"""The gate's side-by-side run (harness.sharding, harness.reporting.merge): every test in exactly one
shard, whole functions together, and one report from several processes."""

import json
from types import SimpleNamespace
import xml.etree.ElementTree as ET

import pytest

from harness.errors import HarnessUsageError
from harness.reporting.merge import merge_junit, merge_suite_times, merged_exit_status
from harness.sharding import assign_shards, parse_shard

NODEIDS = [f"suites/test_a.py::test_big[{i}]" for i in range(6)] + [
    "suites/test_a.py::test_one", "suites/test_b.py::test_two[x]", "suites/test_b.py::test_two[y]",
    "suites/test_b.py::test_three"]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1-2", "", "a/b"])
def test_bad_shard_is_a_usage_error(text):
    with pytest.raises(HarnessUsageError, match="--shard expects K/N"):
        parse_shard(text)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 20])
def test_every_item_in_one_shard_and_each_function_whole(count):
    owner = assign_shards(NODEIDS, count)
    assert len(owner) == len(NODEIDS) and all(0 <= o < count for o in owner)
    by_function = {}
    for nodeid, shard in zip(NODEIDS, owner):
        by_function.setdefault(nodeid.split("[")[0], set()).add(shard)
    assert all(len(shards) == 1 for shards in by_function.values())


def test_shards_are_balanced_by_weight():
    owner = assign_shards(NODEIDS, 2)
    loads = [owner.count(0), owner.count(1)]
    assert loads == [6, 4]  # the 6-item function alone; the four single functions together
    skipped_big = assign_shards(NODEIDS, 2, weights=[0.0] * 6 + [1.0] * 4)
    assert skipped_big[6:].count(0) == 2 and skipped_big[6:].count(1) == 2  # items that will skip weigh nothing


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
import os
import pytest

@pytest.mark.parametrize("i", range(3))
def test_many(i):
    pass

def test_single():
    pass

def test_device_shared(record_result):
    record_result("env", "shared", os.environ.get("HARNESS_SHARED_DEVICE", ""))
'''


def test_shards_of_a_run_cover_it_exactly_once(pytester):
    pytester.makepyfile(test_demo=SHARDED_SUITE)
    ran = []
    for k in (1, 2, 3):
        result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama",
                                              "--device", "cpu", "--shard", f"{k}/3", "-v")
        ran += [line.split(" ")[0] for line in result.outlines if " PASSED" in line]
    assert sorted(ran) == sorted(["test_demo.py::test_many[0]", "test_demo.py::test_many[1]", "test_demo.py::test_many[2]",
                                  "test_demo.py::test_single", "test_demo.py::test_device_shared"])
    bad = pytester.runpytest_inprocess("-p", "harness.plugin", "--device", "cpu", "--shard", "4/3")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--shard expects K/N" in bad.stderr.str()


def test_a_queue_hands_each_unit_to_one_process_heaviest_first_within_each_model(tmp_path):
    """The gate's shards: one unit is one function's items of one model, claimed by the first
    process to ask; the claim order keeps each model's tests together."""
    from harness.sharding import QUEUE_VARIABLE, queue_order, shard_queue

    ids = ["a.py::light[m1]", "b.py::heavy[m1-x]", "b.py::heavy[m1-y]", "a.py::light[m2]", "b.py::heavy[m2-x]",
           "c.py::plain"]
    models = ["m1", "m1", "m1", "m2", "m2", None]
    assert queue_order(ids, models, [1.0, 5.0, 5.0, 1.0, 9.0, 20.0]) == [1, 2, 0, 4, 3, 5]
    environ = {QUEUE_VARIABLE: str(tmp_path)}
    first, second = (shard_queue(f"{k}/2", ids, models, [False] * 6, environ)[1] for k in (1, 2))
    assert [first.takes(n) for n in ids[:3]] == [True, True, True]
    assert [second.takes(n) for n in ids] == [False, False, False, True, True, True]
    assert [first.takes(n) for n in ids[3:]] == [False, False, False]
    assert shard_queue("1/2", ids, models, [False] * 6, {}) is None  # no folder: the fixed split
    with pytest.raises(HarnessUsageError, match="no such folder"):
        shard_queue("1/2", ids, models, [False] * 6, {QUEUE_VARIABLE: str(tmp_path / "gone")})


def test_a_queue_says_what_it_would_take_without_claiming(tmp_path):
    """may_take answers for a unit nobody has claimed (yes, and still nobody's), one this process
    holds (yes) and one another holds (no); next_likely is what the next takes would return."""
    from types import SimpleNamespace

    from harness.sharding import QUEUE_VARIABLE, shard_queue

    ids = ["a.py::one", "a.py::two", "a.py::three"]
    environ = {QUEUE_VARIABLE: str(tmp_path)}
    mine, other = (shard_queue(f"{k}/2", ids, [None] * 3, [False] * 3, environ)[1] for k in (1, 2))
    items = [SimpleNamespace(nodeid=n) for n in ids]
    assert mine.takes(ids[0]) and mine.may_take(ids[0])
    assert mine.may_take(ids[1]) and mine.next_likely(items, 0) is items[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.unit_of[ids[0]]]  # asking claimed nothing
    assert other.takes(ids[1])
    assert not mine.may_take(ids[1]) and mine.next_likely(items, 0) is items[2]
    assert mine.next_taken(items, 0) == 2 and not other.may_take(ids[2])


# a module whose tests log their events and share a module fixture that logs its set-up and teardown
LOGGED_MODULE = '''
import os
import pytest

def log(event):
    with open(os.environ["EVENTS"], "a") as out:
        out.write(event + "\\n")

@pytest.fixture(scope="module")
def module_state():
    log("a set up")
    yield
    log("a torn down")
'''

QUEUED_SUITE = LOGGED_MODULE + '''
def test_a1(module_state):
    log("a1")

def test_a2(module_state):
    log("a2")

def test_a3(module_state):
    log("a3")

def test_a4(module_state):
    log("a4")
'''


def test_a_queue_shard_runs_only_what_it_claims_and_tears_down_before_the_next(pytester, monkeypatch, tmp_path):
    """Other processes hold test_a2 and test_a4: this one runs test_a1, test_a3 and test_b1, and tears
    the module fixture down after test_a3, not after test_a4 that it passes over (kept up for that,
    it would be left over at test_b1 of the next module: 'previous item was not torn down properly')."""
    from harness.sharding import QUEUE_VARIABLE, shard_queue

    pytester.makepyfile(test_demo=QUEUED_SUITE, test_next="from test_demo import log\ndef test_b1():\n    log('b1')\n")
    queue = tmp_path / "queue"
    queue.mkdir()
    monkeypatch.setenv(QUEUE_VARIABLE, str(queue))
    monkeypatch.setenv("EVENTS", str(tmp_path / "events"))
    held = ["test_demo.py::test_a2", "test_demo.py::test_a4"]
    other = shard_queue("2/2", held, [None, None], [False, False], {QUEUE_VARIABLE: str(queue)})[1]
    assert all(other.takes(nodeid) for nodeid in held)
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama",
                                          "--device", "cpu", "--shard", "1/2", "-v")
    assert result.ret == 0, result.stdout.str()[-2000:]
    ran = sorted(line.split(" ")[0] for line in result.outlines if " PASSED" in line)
    assert ran == ["test_demo.py::test_a1", "test_demo.py::test_a3", "test_next.py::test_b1"]
    assert (tmp_path / "events").read_text().splitlines() == ["a set up", "a1", "a3", "a torn down", "b1"]
    again = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama",
                                         "--device", "cpu", "--shard", "2/2", "-v")
    assert again.ret == pytest.ExitCode.NO_TESTS_COLLECTED or " PASSED" not in again.stdout.str()
    under_xdist = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--device", "cpu",
                                               "--shard", "1/2", "-n", "1")
    assert under_xdist.ret == pytest.ExitCode.USAGE_ERROR and "does not run under pytest-xdist" in under_xdist.stderr.str()


LATE_CLAIM_SUITE = LOGGED_MODULE + '''
def test_a1(module_state):
    open(os.environ["OTHER_CLAIMS"], "x").close()  # another process claims test_a2 while this one runs
    log("a1")

def test_a2(module_state):
    log("a2")
'''


def test_a_queue_shard_claims_its_next_unit_only_after_the_current_test(pytester, monkeypatch, tmp_path):
    """While test_a1 runs, another process claims test_a2 (the next unit): this one passes it over and
    runs test_c1, tearing test_a1's module down first although its teardown expected test_a2 next.
    Claimed before test_a1 ran (its `nextitem`), test_a2 was this process's and the other's claim
    failed: a 36 s unit then held the 53 s one after it, and one shard of a cold gate ran both."""
    from harness.sharding import QUEUE_VARIABLE, shard_queue

    pytester.makepyfile(test_demo=LATE_CLAIM_SUITE, test_next="from test_demo import log\ndef test_c1():\n    log('c1')\n")
    queue = tmp_path / "queue"
    queue.mkdir()
    later = "test_demo.py::test_a2"
    monkeypatch.setenv(QUEUE_VARIABLE, str(queue))
    monkeypatch.setenv("EVENTS", str(tmp_path / "events"))
    monkeypatch.setenv("OTHER_CLAIMS", str(queue / shard_queue("1/2", [later], [None], [False],
                                                               {QUEUE_VARIABLE: str(queue)})[1].unit_of[later]))
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama",
                                          "--device", "cpu", "--shard", "1/2", "-v")
    assert result.ret == 0, result.stdout.str()[-2000:]
    ran = sorted(line.split(" ")[0] for line in result.outlines if " PASSED" in line)
    assert ran == ["test_demo.py::test_a1", "test_next.py::test_c1"]
    assert (tmp_path / "events").read_text().splitlines() == ["a set up", "a1", "a torn down", "c1"]


EXCLUSIVE_SUITE = '''
import json, os, pathlib, threading, time
import pytest

def log(event):
    with open(os.environ["EVENTS"], "a") as out:
        out.write(json.dumps([event, time.time()]) + "\\n")

@pytest.fixture
def warm_up():
    log("warm-up set up")
    threading.Timer(1.5, pathlib.Path(os.environ["HARNESS_START_AFTER"]).touch).start()  # the shards end later

@pytest.fixture
def measured_in_set_up(device_alone):
    log("device measured in set-up")

def test_plain(measured_in_set_up):
    log("plain called")

@pytest.mark.beside_shards
def test_warmed(warm_up):
    log("warmed called")
    time.sleep(0.2)
'''


def test_the_exclusive_process_sets_up_beside_shards_tests_first_and_measures_only_after_the_shards(
        pytester, monkeypatch, tmp_path):
    """harness.gate's exclusive process: a beside_shards test goes first and its set-up (a compile
    warm-up) runs while the shards do; its call, and every other test's set-up, waits for them, and
    the wait is no test's duration."""
    import threading

    flag, events = tmp_path / "shards-done", tmp_path / "events.jsonl"
    monkeypatch.setenv("HARNESS_START_AFTER", str(flag))
    monkeypatch.setenv("EVENTS", str(events))
    pytester.makepyfile(test_exclusive=EXCLUSIVE_SUITE)
    unblock = threading.Timer(60, flag.touch)  # a set-up that wrongly waited would hang here without it
    unblock.start()
    try:
        result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "tiny:llama",
                                              "--device", "cpu", "--report-dir", str(tmp_path / "r"))
    finally:
        unblock.cancel()
    result.assert_outcomes(passed=2)
    done = flag.stat().st_mtime
    log = [json.loads(line) for line in events.read_text().splitlines()]
    assert [event for event, _ in log] == ["warm-up set up", "warmed called", "device measured in set-up", "plain called"]
    assert log[0][1] + 1.0 < done <= log[1][1], (log, done)  # set up beside the shards, called after them
    durations = {row["nodeid"].split("::")[1]: row["duration_s"] for row in
                 json.loads(next((tmp_path / "r").glob("*/results.json")).read_text())["outcomes"]}
    assert 0.2 <= durations["test_warmed"] < 1.2, durations  # the ~1.5 s wait is left out of the call


def test_no_beside_shards_suite_test_measures_the_device_in_its_set_up(pytester):
    """Their set-up runs while the gate's shards use the device: a fixture that waits for the device
    alone (device_alone, device_peaks) there would stall it, and a measuring one would be disturbed."""
    from pathlib import Path

    suites = Path(__file__).resolve().parents[1] / "suites"
    items, _ = pytester.inline_genitems(str(suites), "-p", "harness.plugin", "-p", "no:cacheprovider",
                                        "--model", "tiny:llama", "--device", "cpu")
    marked = [item for item in items if item.get_closest_marker("beside_shards")]
    assert marked, "no suite test is set up beside the shards"
    assert all(item.get_closest_marker("exclusive") for item in marked)
    measuring = [item.nodeid for item in marked if {"device_alone", "device_peaks"} & set(item.fixturenames)]
    assert not measuring, measuring


def test_memory_meter_does_not_read_nvml_on_a_shared_device(monkeypatch):
    """NVML reads the whole device: beside other shards it would count their memory as this test's."""
    from harness.performance import memory

    monkeypatch.setattr(memory, "_nvml_handle", lambda device: pytest.fail("NVML was opened on a shared device"))
    monkeypatch.setenv("HARNESS_SHARED_DEVICE", "1")
    meter = memory._CudaMeter("cuda:0")
    assert meter.nvml is None and "NVML not read: other processes share the device" in meter.result.method


def test_an_earlier_run_weighs_the_shards_by_time(tmp_path):
    from harness.sharding import history_weights

    history = tmp_path / "results.json"
    history.write_text(json.dumps({"outcomes": [
        {"nodeid": "a", "when": "call", "duration_s": 40.0}, {"nodeid": "b", "when": "call", "duration_s": 2.0},
        {"nodeid": "c", "when": "setup", "duration_s": 9.0}, {"nodeid": "d", "when": "call", "duration_s": 4.0}]}))
    weights = history_weights(["a", "b", "c", "e"], [False, False, False, True], str(history))
    assert weights == [40.0, 2.0, 21.0, 0.0]  # c: no call duration, so the median of a and b; e: marked to skip
    assert history_weights(["a", "b"], [False, False], str(tmp_path / "missing.json"), prior_path=None) == [1.0, 1.0]
    assert assign_shards(["x::big", "y::s1", "y::s2"], 2, [40.0, 2.0, 4.0]) == [0, 1, 1]


def test_waiting_process_starts_when_the_flag_appears(tmp_path):
    import threading

    from harness.sharding import wait_for_start

    flag = tmp_path / "go"
    assert wait_for_start({})
    threading.Timer(0.3, flag.touch).start()
    assert wait_for_start({"HARNESS_START_AFTER": str(flag)}, poll_s=0.05) and flag.exists()


def test_compile_seconds_of_an_earlier_run_weigh_only_what_a_warm_runner_still_compiles(tmp_path):
    """A first run's kernel search compiled for a minute and takes seconds on the warm runner; a
    flex_attention model test compiles again on every run (session 16's warm H100 gate: counting
    none of its compile put all five such tests in one shard, 87 s against 31-36 s)."""
    from harness.sharding import history_weights

    history, warm = tmp_path / "results.json", tmp_path / "warm.json"
    history.write_text(json.dumps({"outcomes": [
        {"nodeid": "k.py::search", "when": "call", "duration_s": 60.0, "compile_s": 57.0},
        {"nodeid": "m.py::flex[smollm2-135m]", "when": "call", "duration_s": 14.0, "compile_s": 12.5},
        {"nodeid": "m.py::flex[tiny:llama]", "when": "call", "duration_s": 4.0, "compile_s": 3.0},
        {"nodeid": "d.py::decode", "when": "call", "duration_s": 10.0, "compile_s": 0.0}]}))
    warm.write_text(json.dumps({"outcomes": [
        {"nodeid": "k.py::search", "when": "call", "duration_s": 5.0, "compile_s": 2.0},
        {"nodeid": "m.py::flex[smollm2-135m]", "when": "call", "duration_s": 16.0, "compile_s": 15.0}]}))
    ids = ["k.py::search", "m.py::flex[smollm2-135m]", "m.py::flex[tiny:llama]", "d.py::decode"]
    # tiny:llama: the warm file lacks it, so its function's warm compile there
    assert history_weights(ids, [False] * 4, str(history), warm_path=warm) == [5.0, 16.5, 16.0, 10.0]
    assert history_weights(ids, [False] * 4, str(history), warm_path=None) == [3.0, 1.5, 1.0, 10.0]
    assert assign_shards(ids, 2, history_weights(ids, [False] * 4, str(history), warm_path=warm)) == [1, 0, 0, 1]


def test_each_outcome_row_says_how_long_its_test_compiled(monkeypatch):
    """The history the next gate run splits by: run_times' compile share of the phase, per test row."""
    import harness.session as session_module
    from harness.config import RunConfig
    from harness.equivalence.tolerances import Tolerances

    session = session_module.RunSession(RunConfig(), [], "cpu", "float32", Tolerances())
    monkeypatch.setattr(session_module, "compile_seconds_so_far", lambda: 10.0)
    setup = SimpleNamespace(nodeid="suites/test_x.py::test_y", when="setup", outcome="passed", duration=1.0)
    session.stamp_phase_times(setup)  # where the phase ran (an xdist worker), as its report is made
    session.record_phase(setup)  # a passing set-up decides nothing: no row
    monkeypatch.setattr(session_module, "compile_seconds_so_far", lambda: 12.5)
    call = SimpleNamespace(nodeid="suites/test_x.py::test_y", when="call", outcome="passed", duration=5.0,
                           skipped=False, failed=False, longrepr=None)
    session.stamp_phase_times(call)
    session.record_phase(call)
    assert [(row["when"], row["duration_s"], row["compile_s"]) for row in session.outcomes] == [("call", 5.0, 2.5)]


def test_a_fresh_runner_splits_by_the_shipped_cold_durations(tmp_path):
    """No earlier run: the prior's durations, compile included (the caches are cold too); another
    model's test gets its function's mean there; the shipped prior is a valid one."""
    from harness.sharding import PRIOR_DURATIONS, WARM_DURATIONS, call_rows, history_weights, write_prior

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"environment": {"gpu": "H100"}, "outcomes": [
        {"nodeid": "k.py::search[flex]", "when": "call", "duration_s": 100.0, "compile_s": 95.0},
        {"nodeid": "k.py::search[sdpa]", "when": "call", "duration_s": 2.0, "compile_s": 0.0},
        {"nodeid": "k.py::search[flex]", "when": "setup", "duration_s": 5.0},
        {"nodeid": "m.py::decode[smollm2-135m]", "when": "call", "duration_s": 10.0}]}))
    prior = tmp_path / "prior.json"
    assert write_prior(str(results), prior) == 3
    weights = history_weights(["k.py::search[flex]", "m.py::decode[tiny:llama]", "n.py::new", "k.py::search[sdpa]"],
                              [False, False, False, True], None, prior_path=prior)
    assert weights == [100.0, 10.0, 51.0, 0.0]  # n.py::new: no function there, the median of this run's known ids
    assert history_weights(["k.py::search[flex]"], [False], str(results), prior_path=prior, warm_path=None) == [5.0]
    cold, warm = call_rows(PRIOR_DURATIONS), call_rows(WARM_DURATIONS)
    for shipped in (cold, warm):
        assert len(shipped) > 100 and any("test_kernel_matches_fp64_reference" in n for n in shipped)
    assert sum(c for _, c in cold.values()) > 2 * sum(c for _, c in warm.values()), "the warm file is not a warm run's"

"""harness.worker_share: a result one pytest-xdist run computes once for all its workers."""

import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.worker_share import computed_once, share_folder


def _ask(folder, log, results):
    def compute():
        with open(log, "a") as f:
            f.write("computed\n")
        time.sleep(0.3)  # the other process asks meanwhile
        return {"logits": torch.arange(6.0).reshape(2, 3), "label": "no cache"}

    value = computed_once(Path(folder), "no-cache reference: tiny:llama on cpu", compute)
    results.put((value["label"], value["logits"].tolist()))


def test_two_workers_asking_at_once_compute_once_and_get_the_same_result(tmp_path):
    log = tmp_path / "computations.log"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_ask, args=(str(tmp_path), str(log), results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert log.read_text().count("computed") == 1
    first, second = results.get(timeout=5), results.get(timeout=5)
    assert first == second == ("no cache", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])


def test_a_failed_computation_is_not_saved(tmp_path):
    def fail():
        raise RuntimeError("torchrun died")

    with pytest.raises(RuntimeError, match="torchrun died"):
        computed_once(tmp_path, "launch", fail)
    assert computed_once(tmp_path, "launch", lambda: 42) == 42
    assert computed_once(tmp_path, "launch", lambda: 43) == 42  # saved once it worked
    assert computed_once(tmp_path, "other key", lambda: 7) == 7


def test_outside_a_worker_every_call_computes(tmp_path):
    calls = []
    for _ in range(2):
        computed_once(None, "k", lambda: calls.append(1))
    assert len(calls) == 2
    plain = SimpleNamespace(_tmp_path_factory=SimpleNamespace(getbasetemp=lambda: tmp_path / "gw0"))
    assert share_folder(plain) is None  # no workerinput: a plain or nested pytester run


def test_the_workers_of_one_run_share_one_folder_and_runs_do_not(tmp_path):
    def worker(name, run):
        return SimpleNamespace(workerinput={"workerid": name, "testrunuid": run},
                               _tmp_path_factory=SimpleNamespace(getbasetemp=lambda: tmp_path / name))

    folder = share_folder(worker("gw0", "run1"))
    assert folder == share_folder(worker("gw1", "run1")) and folder.is_dir() and folder.parent == tmp_path
    assert share_folder(worker("gw0", "run2")) != folder


def test_workers_ask_for_the_same_tensor_parallel_launch(tmp_path):
    """Each worker saves the presets the ranks load in its own folder: the launch's key must not
    name that folder, or every worker would launch again."""
    from harness.inference.tensor_parallel import TPSession
    from harness.models.loading import resolve_model

    keys = []

    def record(key, compute):
        keys.append(key)
        return {"tiny:llama": "result"}

    for worker in ("gw0", "gw1"):
        session = TPSession(resolve_model("tiny:llama"), torch.device("cpu"), torch.float32, 0, 4, tmp_path / worker,
                            tokenizer_for=lambda spec: None, computed_once=record)
        assert session.tp_run(resolve_model("tiny:llama")[0], 2) == "result"
    assert len(keys) == 2 and keys[0] == keys[1] and str(tmp_path) not in keys[0]

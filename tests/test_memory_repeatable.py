"""A CPU memory check's number is a pure function of the code it measures.

Issue 13: the resident-set measurement gave the same eager prefill 0.86 and -1.10 score matrices in
two CI runs. The storage tracker must give the same peak, to the byte, in this process (with
everything the test session has allocated before), in a fresh process, and in a fresh process
while another process keeps a core busy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from harness.performance.memory import measure_peak
from harness.models.presets import build_preset

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (128, 512)  # an eager prefill: its N^2 score matrices dominate the longer one

MEASURE = """
import json, torch
from harness.performance.memory import measure_peak
from harness.models.presets import build_preset
model = build_preset("tiny:llama", torch.device("cpu"), torch.float32, attn_implementation="eager")
peaks = []
for n in {lengths}:
    ids = torch.arange(10, 10 + n).unsqueeze(0)
    with torch.inference_mode(), measure_peak("cpu") as peak:
        out = model(ids, use_cache=True)
    peaks.append([peak.increase_bytes, peak.retained_bytes])
    del out
print(json.dumps(peaks))
"""


def _in_this_process():
    namespace = {}
    code = MEASURE.replace("print(json.dumps(peaks))", "")
    exec(compile(code.format(lengths=LENGTHS), "measure", "exec"), namespace)
    return namespace["peaks"]


def _in_a_fresh_process():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", MEASURE.format(lengths=LENGTHS)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_peak_is_the_same_in_any_process_and_under_load():
    # Clutter this process first: what earlier tests freed must not change the count.
    clutter = [torch.ones(2**20 * k) for k in (1, 3, 7)]
    del clutter[1]
    here = _in_this_process()
    fresh = _in_a_fresh_process()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = _in_a_fresh_process()
    finally:
        burner.kill()
        burner.wait()
    assert here == fresh == loaded, f"this process {here}, fresh process {fresh}, fresh process under load {loaded}"
    (short_peak, _), (long_peak, long_kept) = here
    assert long_peak > short_peak > 0 and long_kept > 0, here  # the check measured a real prefill and its cache


def test_cpu_peak_counts_a_storage_once_and_follows_in_place_resizing():
    with measure_peak("cpu") as peak:
        base = torch.zeros(1024)           # 4 KiB
        view = base.view(32, 32)           # a view: no new storage
        base.add_(1)                       # in place: no new storage
        grown = torch.empty(0)
        grown.resize_(4096)                # 16 KiB, by resizing storage in place
        del view
    assert peak.retained_bytes == 4096 + 16384, peak.describe()
    assert peak.increase_bytes == 4096 + 16384, peak.describe()
    del base, grown


def test_cpu_peak_ignores_what_existed_before_the_block():
    weights = torch.ones(2**20)
    with measure_peak("cpu") as peak:
        view = weights[:10]
        weights.mul_(2)
    assert peak.increase_bytes == 0 and peak.retained_bytes == 0, peak.describe()
    del view, weights


def test_a_block_that_frees_what_it_made_retains_nothing():
    model = build_preset("tiny:llama", torch.device("cpu"), torch.float32)
    with torch.inference_mode(), measure_peak("cpu") as peak:
        model(torch.arange(10, 74).unsqueeze(0), use_cache=False)
    assert peak.increase_bytes > 0 and peak.retained_bytes == 0, peak.describe()


def test_startup_objects_are_frozen_once_and_later_garbage_is_still_collected():
    """The plugin freezes what exists before the first test (harness.performance.memory.freeze_startup_objects:
    full collections then skip torch's and the collected tests' objects); a second call, e.g. from a
    nested pytest run, freezes nothing more, and a cycle made afterwards is still freed."""
    import gc
    import weakref

    from harness.performance.memory import freeze_startup_objects

    frozen = gc.get_freeze_count()
    assert frozen > 100_000, f"only {frozen} objects frozen: the plugin did not freeze the startup objects"
    freeze_startup_objects()
    assert gc.get_freeze_count() == frozen

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None, "a reference cycle made after the freeze was not collected"

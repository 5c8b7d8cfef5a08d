"""Split one run over several processes that share a device: the gate's parallel phase (issue 15).

A 135M-parameter model leaves an H200 idle most of the time: the gate's tests are bound by Python
(generate()'s per-token loop, tracing, compiling), not by the GPU. So the gate runs its tests in
two phases:

1. every test that does not measure the device runs in ``jobs`` pytest processes at once, each
   taking one shard (``--shard K/N``) of the collected tests;
2. the tests marked ``exclusive`` (they time the device or read its memory: benchmarks, serving
   speed, the memory suites) run afterwards in one process, alone on the device. That process
   starts with the shards (imports, collection) and waits for them before its first test; the tests
   also marked ``beside_shards`` run first, and their set-up (a compile warm-up, which times
   nothing) runs while the shards still do: they wait before their call, and a fixture that
   measures the device waits before measuring (``wait_for_start``). The wait is taken out of the
   phase it fell in (``seconds_waited``), so durations and the time table show the work alone.

A shard is whole test functions (every parametrisation of one function in one process, so session
fixtures and compiled kernels are built once per function), spread by weight, largest first, onto
the lightest shard: deterministic, so a rerun gives the same split. The gate's own shards take the
same units from one queue instead (``QUEUE_VARIABLE``: a folder where the first process to create a
unit's claim file runs it): heaviest first, each process its next unit as soon as it is free, so a
test that runs longer than its weight said delays only its own process's next claim. An item's weight is its
duration in an earlier run's results.json when the gate has one (``HISTORY_VARIABLE``), with what
it spent compiling replaced by what that test still compiles on a warm runner (``WARM_DURATIONS``,
a measured warm gate: the persistent caches take most compiles, not flex_attention's as the model
calls it); on a fresh runner, the durations of a measured cold gate shipped in ``PRIOR_DURATIONS``,
compile included (a test of another model: the mean of its function there); an item already marked
to skip weighs nothing.

While shards share the device, a memory meter cannot use NVML's device-wide reading (it would
count the other shards' memory); ``SHARED_DEVICE_VARIABLE`` tells it so, and it keeps the
allocator's per-process peaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessUsageError

SHARED_DEVICE_VARIABLE = "HARNESS_SHARED_DEVICE"
# A results.json of an earlier run: its test durations weigh the shards (a warm runner's split is
# balanced by time; without it, by item count)
HISTORY_VARIABLE = "HARNESS_SHARD_HISTORY"
# The exclusive process starts with the shards (imports, collection) and waits for this file
# before its first test
START_AFTER_VARIABLE = "HARNESS_START_AFTER"
# A fresh runner has no earlier run: by item count, one shard of session 12's cold gate got the
# flex_attention search and the static-cache compile together and ran 210 s against 86-133 s for
# the others; split by session 12's durations, session 13's cold shards ran 99-149 s. These are a
# cold quick gate's call durations on the default model (session 18's H200 run now; written by
# `python -m harness.sharding prior RESULTS_JSON` from a run of examples/gpu-session.sh).
PRIOR_DURATIONS = Path(__file__).parent / "data" / "shard-durations.json"
# The compile seconds a warm runner still spends per test: session 18's second warm H200 gate. Without it,
# taking every compile second out of a cold history put the five flex_attention model tests (41 s of
# compiling again, warm) in one shard: 87 s against 31-36 s for the other three.
WARM_DURATIONS = Path(__file__).parent / "data" / "shard-durations-warm.json"
# A folder the gate creates for its shards' claim files: set, --shard K/N takes units from the
# queue (claim order) rather than the fixed split. Session 18's warm H200 gates, split by weight:
# 36 / 77 / 31 / 31 s and 52 / 35 / 38 / 36 s: flex_attention's compile seconds move between its
# test functions from run to run (the dispatch test compiled 40 s in one warm run, 16 s in the next;
# the model test 2 s, then 9 s), so no earlier run's durations can weigh them for the next.
QUEUE_VARIABLE = "HARNESS_SHARD_QUEUE"
# Set by the gate on each of its processes: when it started them (seconds since the epoch). Such a
# process writes its report's data but renders no report (the gate merges the parts and renders one;
# matplotlib's plots cost ~1.5 s, paid by the last shard before the exclusive tests may start), and
# its results.json says how long it took to start (imports, configure) and how long it waited.
GATE_STARTED_VARIABLE = "HARNESS_GATE_STARTED"
EXCLUSIVE_MARKER = "exclusive"
BESIDE_SHARDS_MARKER = "beside_shards"


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as written on the command line
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise HarnessUsageError(f"--shard expects K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def function_key(nodeid: str) -> str:
    """The test function an item belongs to: its node id without the parametrisation."""
    return nodeid.split("[", 1)[0]


def assign_shards(nodeids: list[str], count: int, weights: list[float] | None = None) -> list[int]:
    """For each node id, the 0-based shard that runs it: whole functions, heaviest first, each onto
    the lightest shard so far (ties: the lowest index). Weights default to 1 per item."""
    weights = [1.0] * len(nodeids) if weights is None else weights
    groups: dict[str, list[int]] = defaultdict(list)
    for position, nodeid in enumerate(nodeids):
        groups[function_key(nodeid)].append(position)
    weight = {key: sum(weights[p] for p in positions) for key, positions in groups.items()}
    loads = [0.0] * count
    shard_of = [0] * len(nodeids)
    for key in sorted(groups, key=lambda k: (-weight[k], groups[k][0])):
        target = min(range(count), key=lambda i: (loads[i], i))
        loads[target] += weight[key]
        for position in groups[key]:
            shard_of[position] = target
    return shard_of


def _queue_unit(nodeid: str, model: str | None) -> tuple[str | None, str]:
    """What one claim of the gate's queue covers: one test function's items of one model."""
    return model, function_key(nodeid)


def queue_order(nodeids: list[str], item_models: list[str | None], weights: list[float]) -> list[int]:
    """Positions of the collected items in the order a queue's shards take them: each model's tests
    together, models in collection order; within one, its heaviest function first (longest first
    onto whichever process is free), each function's items in collection order."""
    unit_weight: dict[tuple, float] = defaultdict(float)
    first_seen: dict[tuple, int] = {}
    model_rank: dict[str | None, int] = {}
    units = [_queue_unit(nodeid, model) for nodeid, model in zip(nodeids, item_models)]
    for position, (unit, weight) in enumerate(zip(units, weights)):
        unit_weight[unit] += weight
        first_seen.setdefault(unit, position)
        model_rank.setdefault(unit[0], len(model_rank))
    return sorted(range(len(nodeids)), key=lambda p: (model_rank[units[p][0]], -unit_weight[units[p]],
                                                      first_seen[units[p]], p))


@dataclass
class ShardQueue:
    """One gate process's view of the shared queue: which items it runs. A unit (one function's
    items of one model) belongs to the process that first creates its claim file (``O_EXCL``:
    atomic on a local file system); the others pass over its items."""
    folder: Path
    unit_of: dict[str, str]  # node id -> its unit's claim file name
    owned: set = field(default_factory=set)
    others: set = field(default_factory=set)

    def takes(self, nodeid: str) -> bool:
        unit = self.unit_of[nodeid]
        if unit not in self.owned and unit not in self.others:
            try:
                os.close(os.open(self.folder / unit, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                self.owned.add(unit)
            except FileExistsError:
                self.others.add(unit)
        return unit in self.owned

    def may_take(self, nodeid: str) -> bool:
        """Whether ``takes`` would give this process `nodeid` if it asked now, without asking: its
        unit is this process's, or no process has claimed it yet."""
        unit = self.unit_of[nodeid]
        if unit not in self.owned and unit not in self.others and (self.folder / unit).exists():
            self.others.add(unit)  # claimed by another process
        return unit not in self.others

    def next_taken(self, items: list, after: int) -> int | None:
        """The position of the first item after `after` that this process runs, claiming its unit."""
        return next((i for i in range(after + 1, len(items)) if self.takes(items[i].nodeid)), None)

    def next_likely(self, items: list, after: int):
        """The item after `after` that this process would run next if no other claimed in between
        (None: nothing left), claiming nothing: pytest's teardown keeps what that item needs."""
        return next((item for item in items[after + 1:] if self.may_take(item.nodeid)), None)


def shard_queue(text: str, nodeids: list[str], item_models: list[str | None], skipped: list[bool],
                environ=None) -> tuple[list[int], ShardQueue] | None:
    """--shard K/N in a gate process with a queue folder (QUEUE_VARIABLE): the claim order of the
    collected items and this process's queue; None without the folder (the fixed split applies).
    HarnessUsageError for a malformed K/N or a missing folder."""
    parse_shard(text)
    folder = _variable(QUEUE_VARIABLE, environ)
    if not folder:
        return None
    if not Path(folder).is_dir():
        raise HarnessUsageError(f"{QUEUE_VARIABLE}={folder}: no such folder (the gate creates it for its shards)")
    weights = history_weights(nodeids, skipped, _variable(HISTORY_VARIABLE, environ))
    unit_of = {nodeid: hashlib.sha1(repr(_queue_unit(nodeid, model)).encode()).hexdigest()
               for nodeid, model in zip(nodeids, item_models)}
    return queue_order(nodeids, item_models, weights), ShardQueue(Path(folder), unit_of)


def refuse_queue_under_xdist(shard_text: str | None, xdist_workers: int, environ=None) -> None:
    """A queue's shard runs its own test loop, which pytest-xdist's workers would replace:
    HarnessUsageError for --shard with QUEUE_VARIABLE set and -n."""
    if shard_text and xdist_workers and _variable(QUEUE_VARIABLE, environ):
        raise HarnessUsageError(f"--shard with {QUEUE_VARIABLE} set (the gate's queue) does not run under "
                                "pytest-xdist: drop -n, or unset the variable for a fixed split")


def _variable(name: str, environ=None) -> str | None:
    """One of the gate's variables from ``environ`` (tests pass a dict), else from this process's."""
    return (environ if environ is not None else os.environ).get(name)


def select_shard(text: str, nodeids: list[str], skipped: list[bool], environ=None) -> list[bool]:
    """--shard K/N: for each collected node id, whether this process runs it (weights from the
    HISTORY_VARIABLE file where set); HarnessUsageError for a malformed K/N."""
    shard = parse_shard(text)
    history = _variable(HISTORY_VARIABLE, environ)
    owner = assign_shards(nodeids, shard.count, history_weights(nodeids, skipped, history))
    return [index == shard.index - 1 for index in owner]


def model_order(item_models: list[str | None], model_names: list[str]) -> list[int]:
    """Positions of the collected items with every test of one model together, in --model order:
    pytest's own ordering interleaves a session-scoped parameter with the other parameters (cache
    type x model), which reloaded the default model and recomputed its session references ~10 times
    per run. Stable, so each model keeps the file and parameter order pytest chose; items without a
    model (None) come first, models not in `model_names` last."""
    position = {name: i for i, name in enumerate(model_names)}
    rank = [-1 if name is None else position.get(name, len(position)) for name in item_models]
    return sorted(range(len(item_models)), key=rank.__getitem__)


def device_is_shared(environ=None) -> bool:
    return bool(_variable(SHARED_DEVICE_VARIABLE, environ))


def call_rows(results_path) -> dict[str, tuple[float, float]]:
    """nodeid -> (call-phase seconds, torch.compile seconds in them) from a results.json (or a shipped
    duration file); {} for a missing or foreign file."""
    try:
        rows = json.loads(Path(results_path).read_text()).get("outcomes", [])
        return {row["nodeid"]: (float(row["duration_s"]), float(row.get("compile_s", 0.0)))
                for row in rows if row.get("when") == "call" and "duration_s" in row}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def _by_function(values: dict[str, float]) -> dict[str, float]:
    grouped = defaultdict(list)
    for nodeid, seconds in values.items():
        grouped[function_key(nodeid)].append(seconds)
    return {key: statistics.fmean(seconds) for key, seconds in grouped.items()}


def _lookup(values: dict[str, float], by_function: dict[str, float], nodeid: str, default: float) -> float:
    """An item's value; for one the file lacks (another model's), the mean of its function's there."""
    return values.get(nodeid, by_function.get(function_key(nodeid), default))


def history_weights(nodeids: list[str], skipped: list[bool], history_path: str | None,
                    prior_path: Path | None = PRIOR_DURATIONS, warm_path: Path | None = WARM_DURATIONS) -> list[float]:
    """Weights for assign_shards; 0 for items marked to skip. With an earlier run (``history_path``):
    its durations with their compile seconds replaced by the ones ``warm_path`` measured on a warm
    runner (0 for a test it lacks), the median known duration for new items. A first run's kernel
    searches spent a minute compiling and take seconds on the second run (counting it gave one shard
    a fifth of the others' work), while flex_attention inside a model compiles again every run
    (counting none of it stacked those tests in one shard). Without a history: ``prior_path``'s cold
    durations, compile included; 1 each without either."""
    durations: dict[str, float] = {}
    by_function: dict[str, float] = {}
    if history_path:
        warm_compile = {nodeid: compile_s for nodeid, (_, compile_s) in call_rows(warm_path).items()} if warm_path else {}
        warm_by_function = _by_function(warm_compile)
        durations = {nodeid: max(seconds - compile_s, 0.0) + _lookup(warm_compile, warm_by_function, nodeid, 0.0)
                     for nodeid, (seconds, compile_s) in call_rows(history_path).items()}
    if not durations and prior_path is not None:
        durations = {nodeid: seconds for nodeid, (seconds, _) in call_rows(prior_path).items()}
        by_function = _by_function(durations)
    known = [durations[n] for n in nodeids if n in durations]
    default = statistics.median(known) if known else 1.0
    return [0.0 if skip else _lookup(durations, by_function, nodeid, default) for nodeid, skip in zip(nodeids, skipped)]


def write_prior(results_path: str, out_path: Path = PRIOR_DURATIONS) -> int:
    """A shipped duration file (PRIOR_DURATIONS from a cold gate's results.json, WARM_DURATIONS from
    the same runner's next, warm one): its call rows, nothing else; returns how many."""
    results = json.loads(Path(results_path).read_text())
    rows = [{key: row[key] for key in ("nodeid", "when", "duration_s", "compile_s") if key in row}
            for row in results.get("outcomes", []) if row.get("when") == "call"]
    environment = results.get("environment", {})
    source = {"from": str(results_path), "started": results.get("started"), "wall_time_s": results.get("wall_time_s"),
              "device": environment.get("gpu") or environment.get("device")}
    lines = ",\n".join(json.dumps(row) for row in rows)  # a row a line: a refreshed prior diffs by test
    Path(out_path).write_text(f'{{"source": {json.dumps(source)},\n"outcomes": [\n{lines}\n]}}\n')
    return len(rows)


def waits_for_shards(environ=None) -> bool:
    """Whether this process was started beside shards it must wait for (the gate's exclusive one)."""
    return bool(_variable(START_AFTER_VARIABLE, environ))


def beside_shards_first(marked: list[bool]) -> list[int]:
    """Positions of the collected items with the ones marked beside_shards first, order kept otherwise."""
    return sorted(range(len(marked)), key=lambda i: not marked[i])


def gate_started(environ=None) -> float | None:
    """When the gate that started this process started it (None: not a gate's process)."""
    text = _variable(GATE_STARTED_VARIABLE, environ)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def process_timeline(started: float, waited_s: float, environ=None) -> dict | None:
    """A gate process's start-up (from the gate starting it to pytest's configure, `started`) and
    its wait for the shards (`waited_s`), in seconds; None outside a gate."""
    began = gate_started(environ)
    if began is None:
        return None
    return {"startup_s": round(max(started - began, 0.0), 2), "waited_s": round(waited_s, 2)}


_waited = {"seconds": 0.0}


def seconds_waited() -> float:
    """Seconds this process has spent in wait_for_start, all calls together."""
    return _waited["seconds"]


def wait_for_start(environ=None, poll_s: float = 0.2) -> bool:
    """Block until the file named by START_AFTER_VARIABLE exists (True), or the process that
    started this one is gone (False: nobody will create it). Returns True at once when unset or
    already there, so every place that must not share the device may call it."""
    flag = _variable(START_AFTER_VARIABLE, environ)
    if not flag or Path(flag).exists():
        return True
    parent, started = os.getppid(), time.perf_counter()
    try:
        while not Path(flag).exists():
            if os.getppid() != parent:
                return False
            time.sleep(poll_s)
        return True
    finally:
        _waited["seconds"] += time.perf_counter() - started


if __name__ == "__main__":
    import sys

    targets = {"prior": PRIOR_DURATIONS, "warm": WARM_DURATIONS}
    if len(sys.argv) != 3 or sys.argv[1] not in targets:
        sys.exit(f"usage: python -m harness.sharding prior COLD_RESULTS_JSON   (writes {PRIOR_DURATIONS})\n"
                 f"       python -m harness.sharding warm WARM_RESULTS_JSON    (writes {WARM_DURATIONS})")
    print(f"{write_prior(sys.argv[2], targets[sys.argv[1]])} call durations written to {targets[sys.argv[1]]}")

"""Split one run over several processes that share a device: the gate's parallel phase (issue 15).

A 135M-parameter model leaves an H200 idle most of the time: the gate's tests are bound by Python
(generate()'s per-token loop, tracing, compiling), not by the GPU. So the gate runs its tests in
two phases:

1. every test that does not measure the device runs in ``jobs`` pytest processes at once; each
   process collects the whole run and takes work from it as it goes: before running a group of
   items (consecutive items of one test function: its parametrisations for one model, so session
   fixtures and compiled kernels are built once per group) it claims the group by creating a file
   in a directory every process shares (``--shard-claims DIR``). A process that finishes early
   takes more, so no durations need to be known in advance (a cold runner compiles for minutes in
   one test and milliseconds in the next);
2. the tests marked ``exclusive`` (they time the device or read its memory: benchmarks, serving
   speed, the memory suites) run afterwards in one process, alone on the device. That process
   starts with the shards (imports, collection) and waits for ``START_AFTER_VARIABLE``'s file.

While shards share the device, a memory meter cannot use NVML's device-wide reading (it would
count the other shards' memory); ``SHARED_DEVICE_VARIABLE`` tells it so, and it keeps the
allocator's per-process peaks.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterator

SHARED_DEVICE_VARIABLE = "HARNESS_SHARED_DEVICE"
START_AFTER_VARIABLE = "HARNESS_START_AFTER"
EXCLUSIVE_MARKER = "exclusive"


def function_key(nodeid: str) -> str:
    """The test function an item belongs to: its node id without the parametrisation."""
    return nodeid.split("[", 1)[0]


def item_groups(nodeids: list[str]) -> list[list[int]]:
    """Runs of consecutive positions whose items belong to one test function."""
    groups: list[list[int]] = []
    for position, nodeid in enumerate(nodeids):
        if groups and function_key(nodeids[groups[-1][-1]]) == function_key(nodeid):
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


def file_claim(directory: Path) -> Callable[[str], bool]:
    """claim(key) -> True for exactly one of the processes sharing `directory` (an exclusive create)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def claim(key: str) -> bool:
        path = directory / hashlib.sha1(key.encode()).hexdigest()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {key}\n")
        return True

    return claim


def claimed_run(nodeids: list[str], claim: Callable[[str], bool]) -> Iterator[tuple[int, int | None]]:
    """(position to run, position this process runs next or None) over the groups this process
    claims, in collection order. The group after the current one is claimed before the current
    one's last item runs, because pytest tears fixtures down by the next item."""
    pending = iter(item_groups(nodeids))

    def next_group() -> list[int] | None:
        for group in pending:
            if claim(f"{group[0]}:{nodeids[group[0]]}"):
                return group
        return None

    current = next_group()
    while current:
        following = None
        for j, position in enumerate(current):
            if j + 1 < len(current):
                yield position, current[j + 1]
            else:
                following = next_group()
                yield position, following[0] if following else None
        current = following


def device_is_shared(environ=None) -> bool:
    return bool((environ if environ is not None else os.environ).get(SHARED_DEVICE_VARIABLE))


def wait_for_start(environ=None, poll_s: float = 0.2) -> bool:
    """Block until the file named by START_AFTER_VARIABLE exists (True), or the process that
    started this one is gone (False: nobody will create it). Returns True at once when unset."""
    flag = (environ if environ is not None else os.environ).get(START_AFTER_VARIABLE)
    if not flag:
        return True
    parent = os.getppid()
    while not Path(flag).exists():
        if os.getppid() != parent:
            return False
        time.sleep(poll_s)
    return True

"""Persistent compile caches, so a second gate run on the same runner pays no compile.

torch.compile's inductor keeps compiled FX graphs and autotuning results in a cache directory, and
Triton its compiled kernels; by default both live under /tmp and are keyed by nothing the harness
controls. The harness points them at its own cache directory (`harness.config.cache_root()`),
one folder per torch version, transformers version and device, so a runner keeps them between
runs and a library or driver upgrade starts clean. A variable the user already set is kept.

`bytecode_kept()` does the same for Python's bytecode where the environment forbids writing it
beside the sources, so the gate's processes stop compiling torch's sources at every start.

`cache_use()` reads inductor's own counters at the end of a run: hits and misses of the FX-graph
cache, which the report shows (a warm run should have hits and no misses).

`refuse_eager_fallback()` makes a compiled function that has been recompiled too often fail
instead of quietly running uncompiled (see RECOMPILE_LIMIT).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")

# torch.compile stops compiling a function after `recompile_limit` graphs (8 by default) and from
# then on runs it eagerly, for the rest of the process, with one log line. Every torch.compile of
# one function shares that count: the kernel suite's flex_attention search used the 8 up in its first
# examples and every later example, and transformers' own compiled flex_attention in the model
# suites after it, ran the unfused eager path while reported as the compiled kernel. The harness
# makes that an error, and sizes the limit for its largest bounded search: the full profile's flex
# kernel search compiles at most (9 shape buckets x 3 mask kinds + 5 pinned hard cases) x 3 dtypes,
# ~100 graphs (harness.equivalence.attention_cases.KERNEL_BUCKET_SETS), in one process.
RECOMPILE_LIMIT = 128


def cache_key(device) -> str:
    import torch
    import transformers

    name = "cpu"
    if getattr(device, "type", str(device)) == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}-sm{props.major}{props.minor}"
    text = f"torch{torch.__version__}-transformers{transformers.__version__}-{name}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def enable_persistent_compile_caches(root: Path, device) -> dict[str, str]:
    """Set the cache variables (those not already set) to folders under ``root``; returns what
    each variable points at now."""
    base = Path(root) / "compile" / cache_key(device)
    for variable, folder in zip(CACHE_VARIABLES, ("inductor", "triton")):
        if not os.environ.get(variable):
            path = base / folder
            path.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(path)
    return {variable: os.environ[variable] for variable in CACHE_VARIABLES}


def bytecode_kept(environ: dict, root: Path) -> dict:
    """``environ`` for the gate's processes, with Python bytecode written under ``root``/bytecode where
    ``environ`` forbids writing it beside the sources (a non-empty PYTHONDONTWRITEBYTECODE).

    The lent GPU machine sets that variable and its torch is installed without bytecode, so each of
    the gate's processes compiled torch's sources again at every start, warm runs included (session
    20, H100, 16 CPUs: 9.4-11 s from start to pytest's configure for each of the 7 processes). The
    variable's intent, no bytecode files beside the sources or in the installed packages, is kept:
    they go to the harness's cache. A PYTHONPYCACHEPREFIX the user set is kept too."""
    if not environ.get("PYTHONDONTWRITEBYTECODE"):
        return dict(environ)
    env = {name: value for name, value in environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    if not env.get("PYTHONPYCACHEPREFIX"):
        env["PYTHONPYCACHEPREFIX"] = str(Path(root) / "bytecode")
    return env


def refuse_eager_fallback(limit: int = RECOMPILE_LIMIT) -> None:
    """From now on in this process, a function compiled more than ``limit`` times raises
    torch._dynamo's FailOnRecompileLimitHit instead of running uncompiled."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * limit)
    config.fail_on_recompile_limit_hit = True


def cache_use() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process so far (0 when nothing compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    inductor = counters.get("inductor", {})
    return {"fxgraph_cache_hit": int(inductor.get("fxgraph_cache_hit", 0)),
            "fxgraph_cache_miss": int(inductor.get("fxgraph_cache_miss", 0))}



def probes_file(device) -> Path:
    """Where capability probes that worked on this machine are remembered: beside the compile
    caches, under the same key (a torch, transformers or device change starts clean)."""
    from harness.config import cache_root

    return cache_root() / "compile" / cache_key(device) / "probes-that-worked.json"


def remembered_probe(name: str, device, dtype, probe, *, packages: tuple[str, ...] = ()) -> str | None:
    """``probe()`` (None when it worked, else why not), unless it already worked on this machine
    with these torch/transformers versions and these versions of ``packages``.

    Two probes cost seconds in every pytest process (the gate's shards, the harness's own
    subprocess runs): flex_attention's compiles a kernel (~9 s on the 2-core CPU) and bitsandbytes'
    import compiles its ops (~4 s). A success is remembered; a failure is probed again next time
    (a compiler or package installed since may fix it)."""
    import json
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "absent"

    path = probes_file(device)
    key = "/".join([name, str(dtype)] + [f"{p}=={version(p)}" for p in packages])
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key) is True:
        return None
    err = probe()
    if err is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = path.with_name(f"{path.name}.{os.getpid()}")
            fresh.write_text(json.dumps({**known, key: True}, indent=1, sort_keys=True))
            os.replace(fresh, path)  # processes probing side by side never leave a torn file
        except OSError:
            pass  # a read-only cache only costs the next process the probe
    return err

"""Run configuration: what one run validates, where the harness caches things, the user's
--thresholds file (each rule family reads its own section of it), byte sizes as users write them.

The numeric comparison rules themselves live in harness.equivalence.tolerances.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessUsageError

DEFAULT_MODEL = "smollm2-135m"
# The corpus and haystack texts the quality checks read, shipped inside the package.
DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class RunConfig:
    """What one pytest run validates, resolved from the command line."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    device: str = "auto"
    dtype: str = "auto"
    attn: tuple[str, ...] = ()
    memory_budget_bytes: int | None = None
    report_dir: str | None = None
    seed: int = 0
    allow_remote_code: bool = False
    allow_pickle: bool = False
    thresholds_file: str | None = None


# The command line: the options a run is configured from (the plugin registers them in its
# "harness" group; run_config reads their values) and the markers the suites put on tests.
OPTIONS = (
    ("--model", dict(action="append", default=None, metavar="SPEC",
                     help=f"model(s) under test, repeatable or comma-separated: {DEFAULT_MODEL} (default), a local "
                          "HF directory, a .gguf file, a hub id in the local cache, tiny:<arch>, tiny:all, random:<shape>")),
    ("--device", dict(default="auto", help="auto (default), cpu, cuda or cuda:N")),
    ("--dtype", dict(default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")),
    ("--attn", dict(default="", metavar="IMPLS",
                    help="comma-separated attention implementations to test (default: every one available)")),
    ("--memory-budget", dict(default=None, metavar="SIZE", help="device memory budget for every test, e.g. 12GiB")),
    ("--report-dir", dict(default=None, metavar="DIR",
                          help="write report.md, results.json, capabilities.json and junit.xml under DIR/<run>/")),
    ("--seed", dict(type=int, default=0, help="seed for inputs drawn by the suites (default 0)")),
    ("--thresholds", dict(default=None, metavar="FILE", help="JSON file overriding tolerances and thresholds")),
    ("--allow-remote-code", dict(action="store_true", help="allow models that ship their own Python code")),
    ("--allow-pickle", dict(action="store_true", help="allow pickle (.bin/.pt) checkpoints")),
    ("--run-slow", dict(action="store_true", help="also run tests marked slow (the full profile)")),
    ("--shard", dict(default=None, metavar="K/N",
                     help="run only the K-th of N parts of the collected tests (whole test functions; "
                          "harness.gate runs N such processes side by side)")),
)
MARKERS = (
    "gpu: needs a CUDA device; skipped with the reason on CPU",
    "slow: part of the full profile; runs only with --run-slow",
    "acceptance: checks that need trained weights",
    "exclusive: times the device or reads its memory: harness.gate runs it alone "
    "on the device, after the tests it runs side by side",
    "beside_shards: an exclusive test whose set-up times nothing (a compile warm-up): harness.gate "
    "runs it first and sets it up while the side-by-side tests still run",
    "needs(capability, ...): skip unless every named capability is available here",
    "memory_budget(size): fail the test when its peak memory exceeds size, e.g. '12GiB'; "
    "memory_budget(None) exempts a test from --memory-budget",
)


def run_config(options: dict) -> RunConfig:
    """RunConfig from the command line's values, keyed by pytest's option destinations ('model',
    'memory_budget', ...: the plugin passes vars(config.option))."""
    raw = options.get("model") or [DEFAULT_MODEL]
    models = tuple(m.strip() for value in raw for m in value.split(",") if m.strip())
    budget = options.get("memory_budget")
    return RunConfig(
        models=models or (DEFAULT_MODEL,),
        device=options["device"],
        dtype=options["dtype"],
        attn=tuple(a.strip() for a in options["attn"].split(",") if a.strip()),
        memory_budget_bytes=parse_bytes(budget) if budget else None,
        report_dir=options.get("report_dir"),
        seed=options["seed"],
        allow_remote_code=options["allow_remote_code"],
        allow_pickle=options["allow_pickle"],
        thresholds_file=options.get("thresholds"),
    )


def read_json_file(path: Path, label: str):
    """A user's JSON file, or a one-line usage error naming it by `label` and the parser's complaint."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise HarnessUsageError(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_thresholds_section(path: str | None, section: str) -> dict:
    """The `section` object of the user's --thresholds JSON file ({} without a file or section).
    Tolerances, quantization thresholds and the NIAH grid each read their own section through this."""
    if not path:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessUsageError(f"--thresholds: no such file: {path}")
    data = read_json_file(p, f"--thresholds: {path}")
    found = data.get(section, {}) if isinstance(data, dict) else None
    if not isinstance(found, dict):
        raise HarnessUsageError(f"--thresholds: {path} must hold an object with a '{section}' object")
    return found


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'12GiB', '500 MB', '1024' -> bytes."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise HarnessUsageError(f"cannot read {text!r} as a size; use e.g. 12GiB, 500MB or a number of bytes")
    try:
        return int(float(num) * _UNITS[unit])
    except ValueError:
        raise HarnessUsageError(f"cannot read {text!r} as a size; use e.g. 12GiB, 500MB or a number of bytes") from None


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def cache_root() -> Path:
    """Where converted models live: $LLM_HARNESS_CACHE, else the user's cache dir."""
    env = os.environ.get("LLM_HARNESS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llm-harness"))



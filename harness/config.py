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


def read_thresholds_section(path: str | None, section: str) -> dict:
    """The `section` object of the user's --thresholds JSON file ({} without a file or section).
    Tolerances, quantization thresholds and the NIAH grid each read their own section through this."""
    if not path:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessUsageError(f"--thresholds: no such file: {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise HarnessUsageError(f"--thresholds: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
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



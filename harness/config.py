"""Run configuration and the harness's numeric rules.

Every tolerance lives here, once, with the reason for its number. Suites import these names;
users override them per run with ``--thresholds FILE`` (a JSON object of the same field names).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessUsageError

DEFAULT_MODEL = "smollm2-135m"


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


@dataclass(frozen=True)
class Tolerances:
    """Comparison rules shared by every suite. Each number says why it is what it is."""

    # flash-attn's own tests: a kernel may be at most 2x as far from the fp32/fp64 reference as
    # PyTorch's same-precision implementation is. We use the same factor; it absorbs reordering
    # of the softmax/matmul reductions but not a wrong scale, mask or head mapping.
    attention_error_factor: float = 2.0
    # flash-attn adds 1e-5 in causal/split-KV cases; FA3 derives slack from the reference's own
    # rounding. We take max(this, 2 * rounding of the reference in the compared dtype).
    attention_abs_slack: float = 1e-5
    # Model-level comparison across layers accumulates the per-layer factor; transformers uses
    # atol 1e-2..3e-2 for bf16. We keep the k*eager rule but allow a larger factor because each
    # layer re-rounds its residual stream.
    model_error_factor: float = 4.0
    # Greedy tokens: a divergence is accepted only at a near-tie of the reference, i.e. where the
    # reference's top-2 logit margin is below this (in logits), and the other run's token must be
    # in the reference's top-k. fp32 near-ties below 1e-3 are rounding noise; bf16 rounds logits
    # of magnitude ~20 to ~0.06, so the margin scales with the dtype (see token_margin()).
    token_margin_fp32: float = 1e-3
    token_margin_half: float = 0.15
    token_topk: int = 5

    def token_margin(self, dtype_name: str) -> float:
        return self.token_margin_fp32 if dtype_name in ("float32", "float64") else self.token_margin_half


def load_tolerances(path: str | None) -> Tolerances:
    """Tolerances with the user's overrides from a JSON file applied (unknown keys are errors)."""
    base = Tolerances()
    if not path:
        return base
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessUsageError(f"--thresholds: no such file: {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise HarnessUsageError(f"--thresholds: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    known = {f.name for f in dataclasses.fields(Tolerances)}
    section = data.get("tolerances", {}) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise HarnessUsageError(f"--thresholds: {path} must hold an object with a 'tolerances' object")
    unknown = sorted(set(section) - known)
    if unknown:
        raise HarnessUsageError(f"--thresholds: unknown tolerance(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **{k: float(v) if k != "token_topk" else int(v) for k, v in section.items()})


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



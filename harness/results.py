"""Results as data: what a check compared, what it saw, what it allowed, and where.

Suites attach these to their test (through the plugin's `record_result` fixture); the report is a
view of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

# A check that ran but could say nothing about this model (e.g. prompt lookup that never accepted a
# draft): the suite skips with a reason starting with this prefix, and the run records the outcome
# "inconclusive" instead of "skipped", so the report can tell "not run" from "ran, proved nothing".
INCONCLUSIVE = "inconclusive"
INCONCLUSIVE_PREFIX = INCONCLUSIVE + ": "


def inconclusive_reason(why: str) -> str:
    return INCONCLUSIVE_PREFIX + why


def suite_of(nodeid: str) -> str:
    """The suite a test belongs to, by its node id: its file's stem (every Result row and outcome row)."""
    return Path(nodeid.split("::")[0]).stem


def skip_outcome(reason: str) -> str:
    return INCONCLUSIVE if reason.startswith(INCONCLUSIVE_PREFIX) else "skipped"


@dataclass
class Result:
    suite: str
    check: str
    metric: str
    value: float | str | None
    threshold: float | str | None = None
    passed: bool | None = None
    where: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("value", "threshold"):
            if isinstance(d[key], float) and not math.isfinite(d[key]):
                d[key] = str(d[key])
        return d

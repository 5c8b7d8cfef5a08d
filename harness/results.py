"""Results as data: what a check compared, what it saw, what it allowed, and where.

Suites attach these to their test (through the plugin's `record_result` fixture); the report is a
view of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# the check name of a variant the model under test refused (plugin's model factory); the report
# shows these rows in the capability matrix
MODEL_CAPABILITY = "model capability"


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

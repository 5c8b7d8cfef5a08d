"""Profiles: how much one run checks, in one table (issue 17).

A profile sets together what would otherwise be separate switches: whether the tests marked
``slow`` run (pytest's ``--run-slow``) and how hard hypothesis searches (its profile of the same
name, selected with HYPOTHESIS_PROFILE) and on how many shapes the attention kernels that compile per
shape (flex_attention, flash-attn-4 on CUDA) are checked: ``quick``, three buckets that every case,
the pinned hard cases too, is moved onto; ``wide``, nine, with the hard cases at their own shapes
(harness.equivalence.attention_cases.KERNEL_BUCKET_SETS). The other kernels search every shape.

- ``ci``: the default, and the gate's ``quick`` profile: bounded for the 2-core CI machine and a
  gate in minutes; derandomised, so a rerun checks the same inputs (``--seed`` still moves values);
- ``full``: the gate's ``full`` profile, the acceptance check: slow tests, 400 examples, every shape;
- ``explore``: seed sweeps (examples/seed-sweep.sh): ci's budget, shapes drawn from
  ``--hypothesis-seed`` instead of a fixed search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    run_slow: bool  # the tests marked slow run too (pytest --run-slow)
    max_examples: int  # hypothesis examples per search
    derandomize: bool  # hypothesis draws the same examples every run
    compiled_kernel_shapes: str  # "quick" | "wide": harness.equivalence.attention_cases.KERNEL_BUCKET_SETS


PROFILES = {p.name: p for p in (
    Profile("ci", run_slow=False, max_examples=30, derandomize=True, compiled_kernel_shapes="quick"),
    Profile("full", run_slow=True, max_examples=400, derandomize=False, compiled_kernel_shapes="wide"),
    Profile("explore", run_slow=False, max_examples=30, derandomize=False, compiled_kernel_shapes="quick"),
)}
DEFAULT = "ci"
# `python -m harness.gate --profile NAME` -> the profile it runs
GATE_PROFILES = {"quick": PROFILES["ci"], "full": PROFILES["full"]}


def active(environ=None) -> Profile:
    """The profile HYPOTHESIS_PROFILE names (the default without it; an unknown name: the default)."""
    return PROFILES.get((environ if environ is not None else os.environ).get("HYPOTHESIS_PROFILE", DEFAULT),
                        PROFILES[DEFAULT])


def register_hypothesis_profiles(environ=None) -> None:
    """Register every profile with hypothesis and load the active one; suites' own @settings still
    override per test where a search needs it."""
    from hypothesis import HealthCheck, settings

    for profile in PROFILES.values():
        settings.register_profile(profile.name, max_examples=profile.max_examples, derandomize=profile.derandomize,
                                  deadline=None, print_blob=True,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(active(environ).name)

"""The model factory keeps the run's own variant and bounds the others (what made the 7B gate run
the H100 out of memory in session 2 was three 7B variants plus a float32 reference)."""

import torch

from harness.models import resolve_model
from harness.model_factory import ModelFactory


def test_run_variant_stays_loaded_while_other_variants_take_turns():
    spec = resolve_model("tiny:llama")[0]
    factory = ModelFactory(spec, torch.device("cpu"), torch.float32, keep=1)
    base = factory("eager")
    sdpa = factory("sdpa")
    assert factory("sdpa") is sdpa  # reused, not rebuilt
    other = factory("eager", dtype=torch.float64)  # a second non-base variant: evicts sdpa, not the base
    assert factory("eager") is base
    assert other.dtype == torch.float64
    assert factory("sdpa") is not sdpa  # sdpa was evicted and is built again
    assert factory("eager") is base

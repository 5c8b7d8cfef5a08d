"""The model factory keeps the run's own variant and bounds the others (what made the 7B gate run
the H100 out of memory in session 2 was three 7B variants plus a float32 reference)."""

import torch

from harness.models.loading import resolve_model
from harness.models.factory import ModelFactory


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


def test_the_fixture_turns_a_refused_variant_into_a_skip_and_keeps_clear():
    """The plugin's model_factory fixture: the suites call it, read .spec and call .clear()."""
    import pytest

    from harness.plugin import _SkippingFactory

    spec = resolve_model("tiny:llama")[0]
    factory = ModelFactory(spec, torch.device("cpu"), torch.float32, refused={"sdpa": "refused for a test"})
    wrapped = _SkippingFactory(factory)
    assert wrapped.spec is spec and wrapped("eager") is factory("eager")
    with pytest.raises(pytest.skip.Exception, match="refused for a test"):
        wrapped("sdpa")
    wrapped.clear()
    assert not factory._cache

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


def test_a_variant_that_cannot_fit_the_free_device_memory_is_a_skip_with_the_numbers(monkeypatch):
    """On an 80 GB H100 the float32 pass of a 7B bf16 run (27 GB beside the run's 13.5 GB) ran out of
    memory (session 12): the factory predicts a variant's weights from the run's own and refuses
    one that would not fit, without recording the refusal against the attention implementation."""
    import pytest

    from harness.errors import VariantRefused
    from harness.models import factory as factory_module

    spec = resolve_model("tiny:llama")[0]
    factory = ModelFactory(spec, torch.device("cpu"), torch.bfloat16)
    base = factory("eager")
    base_bytes = factory_module._model_bytes(base)
    factory.device = torch.device("cuda")  # the check reads the device's memory only on CUDA
    total = 100 * base_bytes
    free = {"bytes": 6 * base_bytes + 1}  # float32 weights: 2 x base; headroom: 5 % of total = 5 x base
    monkeypatch.setattr(factory_module, "free_device_bytes", lambda device: (free["bytes"], total))
    monkeypatch.setattr(factory_module, "release_device_memory", lambda device: None)
    monkeypatch.setattr(ModelFactory, "_variant_slots", lambda self: self.keep)
    factory.device = torch.device("cpu")
    other = factory("sdpa")  # a bf16 variant, evicted before the float32 one is refused
    factory.device = torch.device("cuda")
    with pytest.raises(VariantRefused, match=r"with sdpa in float32 needs .* of weights; .* are free"):
        factory("sdpa", dtype=torch.float32)
    assert list(factory._cache) == [factory._base_key] and other is not None
    assert "sdpa" not in factory.refused  # memory, not a capability: a variant that fits still loads
    factory._refuse_unless_it_fits("sdpa", torch.bfloat16)  # 1 x base + 5 x base of headroom: fits in 6
    free["bytes"] = 7 * base_bytes + 1  # 2 x base of weights + 5 x base of headroom: fits
    factory._refuse_unless_it_fits("sdpa", torch.float32)
    free["bytes"] = 7 * base_bytes - 1024
    with pytest.raises(VariantRefused):
        factory._refuse_unless_it_fits("sdpa", torch.float32)

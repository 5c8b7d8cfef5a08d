"""The attention backend registry (harness.backends.attention): one record per backend, read by the
capability matrix and every attention suite."""

import contextlib

import pytest
import torch

from harness.backends.kernels import KernelImpl, eager_attention
from harness.backends import attention as registry
from harness.backends.capabilities import detect


def test_the_capability_matrix_lists_every_backend_in_registry_order():
    rows = [c.name for c in detect(torch.device("cpu"), torch.float32) if c.category == "attention"]
    assert rows == list(registry.ATTENTION_BACKENDS)


def test_each_backend_knows_its_transformers_name_and_context():
    assert registry.model_attention("sdpa_math")[0] == "sdpa"
    assert registry.model_attention("flash_attention_2")[0] == "flash_attention_2"
    with registry.model_attention("sdpa_math")[1]():
        pass
    with pytest.raises(Exception, match="unknown attention backend 'nope'; known: eager, sdpa_math"):
        registry.model_attention("nope")


def test_cuda_limits_and_dtypes_come_from_the_record():
    flash = registry.ATTENTION_BACKENDS["sdpa_flash"]
    assert flash.kernel_on("cpu", torch.float32) is flash.kernel  # the CPU kernel takes every input
    assert flash.kernel_on("cuda", torch.float32) == "sdpa_flash has no float32 kernel on CUDA"
    on_cuda = flash.kernel_on("cuda", torch.bfloat16)
    assert not on_cuda.dense_masks and not on_cuda.windows and on_cuda.causal_square_only
    math = registry.ATTENTION_BACKENDS["sdpa_math"]
    assert math.kernel_on("cuda", torch.float32) is math.kernel


def test_a_new_backend_is_one_register_call(monkeypatch):
    """What adding a backend takes: one record; the suites' parametrisation and the matrix follow."""
    monkeypatch.setattr(registry, "ATTENTION_BACKENDS", registry.ATTENTION_BACKENDS.copy())
    registry.register(registry.AttentionBackend(
        "eager_copy", KernelImpl("eager_copy", eager_attention), "eager", lambda device, dtype: (True, "test double"),
        context=contextlib.nullcontext))
    assert "eager_copy" in registry.fused_backends()
    assert registry.model_attention("eager_copy")[0] == "eager"
    assert registry.ATTENTION_BACKENDS["eager_copy"].capability("cpu", torch.float32).available
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.ATTENTION_BACKENDS["eager"])

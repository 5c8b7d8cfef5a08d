"""The attention backends: one record each (issue 17).

A record says everything the harness needs to validate one backend: its kernel in the harness's
calling convention (harness.backends.kernels; a KernelImpl with the inputs it accepts), the
``attn_implementation`` name transformers loads it by and the context a forward runs in (SDPA's
backends are forced with ``sdpa_kernel``), how to probe whether it runs here (the capability
matrix, harness.backends.capabilities), which inputs its CUDA kernels refuse, and whether transformers
compiles it per shape on the CPU. The kernel, model, dispatch and long-context suites, the model
capability probe and the capability matrix all iterate ``ATTENTION_BACKENDS``; adding a backend is
one ``register`` call below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from harness.backends.kernels import KernelImpl, eager_attention, flash_attn_package_impl, flex_attention_impl, sdpa_attention
from harness.backends.capabilities import Capability, dtype_name, try_probe
from harness.backends import Registry

Probe = Callable[[object, object], tuple[bool, str]]  # (device, dtype) -> (runs here, what was found or why not)


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # the capability name: --attn, the matrix, the report
    kernel: KernelImpl
    attn_implementation: str  # what transformers' from_pretrained / set_attn_implementation takes
    probe: Probe
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    cuda_limits: dict = field(default_factory=dict)  # KernelImpl fields its CUDA kernels restrict
    cuda_dtypes: tuple[str, ...] | None = None  # dtypes its CUDA kernels compute in (None: every one)
    compiles_model_per_shape_on_cpu: bool = False  # transformers compiles it with inductor per shape
    # The speed and memory suites measure generate() with this record's attn_implementation (once per
    # implementation: the first measured record of it names the capability those tests need)
    measured: bool = False

    def capability(self, device, dtype) -> Capability:
        available, reason = self.probe(device, dtype)
        return Capability(self.name, "attention", available, reason)

    def kernel_on(self, device_type: str, dtype) -> KernelImpl | str:
        """The kernel with the inputs it accepts on this device and dtype, or why it cannot run."""
        if device_type != "cuda":
            return self.kernel
        if self.cuda_dtypes is not None and dtype_name(dtype) not in self.cuda_dtypes:
            return f"{self.name} has no {dtype_name(dtype)} kernel on CUDA"
        return dataclasses.replace(self.kernel, **self.cuda_limits) if self.cuda_limits else self.kernel


ATTENTION_BACKENDS: Registry = Registry("attention backend")


def register(backend: AttentionBackend) -> AttentionBackend:
    return ATTENTION_BACKENDS.register(backend)


def fused_backends() -> list[str]:
    """Every backend the suites compare against eager."""
    return [name for name in ATTENTION_BACKENDS if name != "eager"]


def measured_backends() -> list[AttentionBackend]:
    """The records whose attn_implementation the speed and memory suites measure, one per implementation."""
    seen: dict[str, AttentionBackend] = {}
    for backend in ATTENTION_BACKENDS.values():
        if backend.measured:
            seen.setdefault(backend.attn_implementation, backend)
    return list(seen.values())


def model_attention(name: str) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """(attn_implementation for from_pretrained / model_factory, context manager to run the forward in)."""
    backend = ATTENTION_BACKENDS.get_record(name)
    return backend.attn_implementation, backend.context


# ---------------------------------------------------------------------------------------------
# Probes: run the backend for real on a tiny input where that is cheap (version checks alone miss
# broken builds and unsupported dtypes)


def _always(reason: str) -> Probe:
    return lambda device, dtype: (True, reason)


def _sdpa_probe(sdp_backend: str, needs_cuda: str | None = None) -> Probe:
    def probe(device, dtype):
        if needs_cuda and device.type != "cuda":
            return False, needs_cuda
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)

        def run():
            with sdpa_kernel(getattr(SDPBackend, sdp_backend)):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        err = try_probe(run)
        return err is None, err or f"ran on {device.type} in {dtype_name(dtype)}"

    return probe


def _flex_probe(device, dtype):
    import torch

    def run():
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.randn(1, 2, 128, 64, device=device, dtype=dtype)
        torch.compile(flex_attention, dynamic=False)(q, q, q)

    from harness.performance.compile_cache import remembered_probe

    err = remembered_probe("flex_attention", device, dtype, lambda: try_probe(run))
    return err is None, err or f"compiled and ran on {device.type}"


def _package_probe(module: str, min_cc: tuple[int, int], package: str, rocm: bool = False) -> Probe:
    def probe(device, dtype):
        import torch

        try:
            present = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            present = False
        if not present:
            return False, f"package missing: {package}"
        if device.type != "cuda":
            return False, "needs a CUDA device; this run is on CPU"
        if torch.version.hip is not None and not rocm:
            return False, "not built for ROCm"
        cc = torch.cuda.get_device_capability(device)
        if cc < min_cc:
            return False, f"needs compute capability >= {min_cc[0]}.{min_cc[1]}, device has {cc[0]}.{cc[1]}"
        err = try_probe(lambda: importlib.import_module(module))
        return err is None, err or f"{module} imports"

    return probe


def _sdpa_context(sdp_backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, sdp_backend))


# ---------------------------------------------------------------------------------------------
# The registry

register(AttentionBackend("eager", KernelImpl("eager", eager_attention), "eager", _always("plain PyTorch matmul + softmax"),
                          measured=True))


def _sdpa(name: str, sdp_backend: str, **kwargs) -> AttentionBackend:
    return register(AttentionBackend(
        name, KernelImpl(name, functools.partial(sdpa_attention, backend=sdp_backend)), "sdpa",
        kwargs.pop("probe", None) or _sdpa_probe(sdp_backend), context=functools.partial(_sdpa_context, sdp_backend),
        **kwargs))


# On CUDA the flash and cuDNN SDPA kernels take no dense mask or window, only SDPA's top-left
# causal flag, and no float32
_FUSED_SDPA_ON_CUDA = dict(cuda_limits=dict(dense_masks=False, windows=False, causal_square_only=True),
                           cuda_dtypes=("float16", "bfloat16"))
# The speed and memory suites measure transformers' "sdpa" as users run it (PyTorch picks the kernel);
# the math kernel, present on every device, is the capability that entry needs
_sdpa("sdpa_math", "MATH", measured=True)
_sdpa("sdpa_efficient", "EFFICIENT_ATTENTION")
_sdpa("sdpa_flash", "FLASH_ATTENTION", **_FUSED_SDPA_ON_CUDA)
_sdpa("sdpa_cudnn", "CUDNN_ATTENTION", probe=_sdpa_probe(
    "CUDNN_ATTENTION", needs_cuda="cuDNN attention needs a CUDA device; this run is on CPU"), **_FUSED_SDPA_ON_CUDA)
register(AttentionBackend("flex_attention", KernelImpl("flex_attention", flex_attention_impl, compiles_per_shape_on=("cuda",)),
                          "flex_attention", _flex_probe, compiles_model_per_shape_on_cpu=True))

# flash-attn packages: causal and windows only (padding needs their varlen API), fp16/bf16 only
_FLASH_KERNEL = dict(dense_masks=False, additive_masks=False, low_precision_only=True, head_dim_multiple=8)
for _name, _module, _kernel_module, _min_cc, _package in (
        ("flash_attention_2", "flash_attn_2_cuda", "flash_attn", (8, 0), "flash-attn 2 (pip install flash-attn)"),
        ("flash_attention_3", "flash_attn_interface", "flash_attn_interface", (9, 0),
         "flash-attn 3 (hopper/ build of flash-attention)"),
        ("flash_attention_4", "flash_attn.cute", "flash_attn.cute", (9, 0), "flash-attn-4 (pip install flash-attn-4)")):
    register(AttentionBackend(_name, KernelImpl(_name, flash_attn_package_impl(_kernel_module), **_FLASH_KERNEL,
                                                compiles_per_shape_on=("cuda",) if _name == "flash_attention_4" else ()),
                              _name, _package_probe(_module, _min_cc, _package, rocm=_name == "flash_attention_2"),
                              measured=_name == "flash_attention_2"))

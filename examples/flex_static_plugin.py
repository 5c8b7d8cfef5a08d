"""pytest -p examples.flex_static_plugin: the kernel suite with flex_attention compiled for static
shapes (one kernel per input shape) instead of transformers' automatic dynamic shapes, to compare
the two on a GPU (examples/gpu-session.sh flex)."""

import functools

import torch

import harness.backends.kernels as kernels


@functools.lru_cache(maxsize=None)
def _static_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


kernels._compiled_flex = _static_flex

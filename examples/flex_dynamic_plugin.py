"""pytest -p examples.flex_dynamic_plugin: the kernel suite with flex_attention compiled as transformers
compiles it (automatic dynamic shapes) instead of the harness's static shapes, to compare the two on
a GPU (examples/gpu-session.sh flex)."""

import functools

import torch

import harness.backends.kernels as kernels


@functools.lru_cache(maxsize=None)
def _dynamic_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


kernels._compiled_flex = _dynamic_flex

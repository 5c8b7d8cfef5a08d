"""Fixtures shared by the suites."""

import pytest

from harness import capabilities
from harness import generation as gen


@pytest.fixture(scope="session")
def dtype_name(dtype):
    """The run's compute dtype by name, as the comparison rules take it ('bfloat16')."""
    return capabilities.dtype_name(dtype)


@pytest.fixture(scope="session")
def pad(tokenizer):
    return gen.pad_id(tokenizer)


@pytest.fixture
def select_attention(request, require, run_config, device):
    """select_attention(backend) -> (attn_implementation, context factory), or a skip that says why:
    not chosen by --attn, missing from the capability matrix, or a backend transformers compiles per
    shape (flex_attention) on CPU without --run-slow (inductor: minutes per shape on 2 cores)."""
    from harness.backends.attention import ATTENTION_BACKENDS, model_attention

    def select(backend: str):
        if run_config.attn and backend not in run_config.attn:
            pytest.skip(f"{backend} not selected by --attn {','.join(run_config.attn)}")
        require(backend)
        if (ATTENTION_BACKENDS[backend].compiles_model_per_shape_on_cpu and device.type == "cpu"
                and not request.config.getoption("--run-slow")):
            pytest.skip(f"slow on CPU: transformers compiles {backend} with inductor (minutes per shape on 2 cores); "
                        "the kernel suite checks it on CPU, --run-slow runs it here, the GPU run always does")
        return model_attention(backend)

    return select


@pytest.fixture(scope="session")
def speed_spec(model_spec):
    """The model under test, for speed measurements; a skip for the tiny presets."""
    if model_spec.kind == "preset" and model_spec.name.startswith("tiny:"):
        pytest.skip(f"{model_spec.name} is a correctness fixture (hidden size 64): its speed says nothing; "
                    "speed benchmarks run on the default model or a random:<shape> preset")
    return model_spec

"""Fixtures shared by the suites."""

import pytest

from harness.backends import capabilities
from harness.inference import generation as gen


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


@pytest.fixture(scope="session")
def prompt_inputs(tokenizer, run_config, device):
    """The run's chat prompt (drawn by --seed), tokenized with the chat template, on the device."""
    return gen.chat_inputs(tokenizer, gen.prompt_for_seed(run_config.seed), device)


@pytest.fixture
def agrees(dtype_name, tolerances, tokenizer, record_result):
    """agrees(reference, run, check, lossy_kv=False, **details): asserts harness.equivalence.token_agreement's
    rule for two greedy runs and records the result; ``lossy_kv`` compares at a quantized KV
    cache's precision (harness.equivalence.tolerances.QUANTIZED_KV_PRECISION) instead of the run's dtype."""
    from harness.equivalence.tolerances import QUANTIZED_KV_PRECISION
    from harness.equivalence.token_agreement import compare_runs, record_fields

    def check(reference, run, check_name, *, lossy_kv=False, **details):
        result = compare_runs(reference, run, dtype_name=QUANTIZED_KV_PRECISION if lossy_kv else dtype_name,
                              tolerances=tolerances, decode=lambda t: tokenizer.decode([t]))
        record_result(check_name, **record_fields(result), **details)
        assert result.passed, result.message
        return result

    return check


@pytest.fixture(scope="session")
def quantizable(model_spec):
    """The model under test, for quantized variants; a skip for presets: they are built from configs
    in memory, and bitsandbytes quantizes at load time from a checkpoint."""
    if model_spec.kind == "preset":
        pytest.skip(f"{model_spec.name} is a preset built in memory: quantization loads a checkpoint "
                    "(the default model, a GGUF or a model directory)")
    return model_spec


@pytest.fixture
def attn_variant(model_factory):
    """attn_variant(attn, **factory_kwargs) -> the model variant running attn_implementation=attn,
    or a skip where the model runs another one or cannot switch after loading (e.g. Falcon keeps
    the implementation it was built with): the variants would be one model."""

    def get(attn: str, **kwargs):
        model = model_factory(attn, **kwargs)
        actual = model.config._attn_implementation
        if actual != attn or not getattr(model, "_can_set_attn_implementation", lambda: True)():
            pytest.skip(f"asked for attn_implementation={attn!r}, but {type(model).__name__} "
                        f"{'runs ' + repr(actual) if actual != attn else 'cannot switch implementation after loading'}; "
                        "the variants would be one model")
        return model

    return get


@pytest.fixture(scope="session")
def counts(reference_model):
    """Parameter counts of the model under test (harness.performance.predictions.parameter_counts)."""
    from harness.performance.predictions import parameter_counts

    return parameter_counts(reference_model.config)


@pytest.fixture(autouse=True)
def benchmarks_are_timed(request):
    """A speed benchmark skips, saying why, where pytest-benchmark times nothing (pytest -n, or
    --benchmark-disable) instead of failing on empty statistics."""
    if "benchmark" in request.fixturenames:
        from harness.reporting.outcomes import benchmark_off_reason

        reason = benchmark_off_reason(request.config)
        if reason:
            pytest.skip(reason)

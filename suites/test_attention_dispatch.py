"""Each layer's attention call gives eager's answer on eager's own inputs, through the model's dispatch.

Every attention module of the model under test hands its attention function a query, key and
value (after RoPE, with the KV cache), a mask built for that implementation, its scaling and
window. harness.equivalence.layer_attention records those calls in an eager run and replays eager's q/k/v into
the function transformers dispatches to for each backend (``ALL_ATTENTION_FUNCTIONS``, the same
lookup the model does), so the integration layer is exercised with real, trained inputs while
nothing else differs. Each call's output must obey the kernel rule of harness.equivalence.compare against
float64 eager on the same inputs, on the max error and on the RMS error (a bias spread over every
position shows in the RMS where bf16 rounding outliers set the max).

Scenarios: a left-padded prefill, a cached decode (two steps after a left-padded prefill) and,
for sliding-window models, a prefill past the window. On CUDA the check also runs in float32
(float64 truth), where rounding is 2^16 times smaller than in bf16 and any systematic error
shows; on CPU the run is float32 already.
"""

import pytest
import torch

from harness.backends.attention import fused_backends
from harness.backends.capabilities import dtype_name
from harness.equivalence.layer_attention import (DispatchNotRecorded, batch_lengths, compare_layer_calls, padded_token_batch, record_eager_calls,
                                     reference_outputs, replay_through_dispatch)

SCENARIOS = {  # scenario -> (decode steps, padding side)
    "left_padded_prefill": (0, "left"),
    "cached_decode": (2, "left"),
    "past_sliding_window": (0, "left"),
}
PRECISIONS = ["run", "float32"]


@pytest.fixture(scope="session")
def recorded_eager_calls():
    """(model, scenario, seed, dtype) -> (ids, mask, eager calls, float64 outputs): once per run."""
    return {}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("backend", fused_backends())
def test_each_attention_call_matches_eager_on_its_inputs(backend, scenario, precision, model_spec, model_factory, device,
                                                         dtype, tolerances, run_config, select_attention,
                                                         recorded_eager_calls, record_result):
    attn_implementation, context = select_attention(backend)
    if precision == "float32":
        if device.type != "cuda" or dtype == torch.float32:
            pytest.skip(f"the run itself is float32 on {device.type}; the extra float32 pass is for reduced-precision GPU runs")
        dtype = torch.float32
    decode_steps, side = SCENARIOS[scenario]
    key = (model_spec.name, scenario, run_config.seed, str(dtype))
    if key not in recorded_eager_calls:
        # eager is needed only to record; held past that, a float32 copy of a 7B model stays beside
        # the fused one (the factory's eviction cannot free what a test still holds)
        eager = model_factory("eager", dtype=dtype)
        lengths = batch_lengths(eager.config, scenario, run_config.seed, base=20, spread=12)
        if lengths is None:
            pytest.skip("the model has no sliding window")
        ids, mask = padded_token_batch(eager.config, lengths, side, run_config.seed, device)
        try:
            calls = record_eager_calls(eager, ids, mask, decode_steps)
        except DispatchNotRecorded as exc:
            pytest.skip(str(exc))
        recorded_eager_calls[key] = (ids, mask, calls, reference_outputs(calls))
        del eager
    ids, mask, calls, refs = recorded_eager_calls[key]
    model = model_factory(attn_implementation, dtype=dtype)
    if model.config._attn_implementation != attn_implementation:
        pytest.skip(f"asked for {attn_implementation}, {type(model).__name__} runs {model.config._attn_implementation}")
    try:
        with context():
            outputs = replay_through_dispatch(model, attn_implementation, calls, ids, mask, decode_steps=decode_steps)
    except DispatchNotRecorded as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        if "No available kernel" in str(exc) or "only support" in str(exc):
            pytest.skip(f"{backend} cannot run these inputs in {dtype_name(dtype)}: {str(exc).splitlines()[0]}")
        raise
    verdict = compare_layer_calls(outputs, calls, refs, mask, max_factor=tolerances.attention_error_factor,
                                  rms_factor=tolerances.attention_rms_factor, slack=tolerances.attention_abs_slack,
                                  name=f"{backend} {scenario}")
    dtype_label = dtype_name(dtype)
    for statistic, deciding in verdict.deciding.items():
        record_result("attention calls vs eager", f"{statistic} error / allowed", round(deciding.error / deciding.allowed, 4),
                      threshold=1, passed=deciding.passed, where=f"{backend}/{scenario}/{dtype_label}",
                      ratio_vs_eager=round(deciding.ratio, 4), factor=deciding.factor, call=deciding.message.split(":")[1])
    assert verdict.passed, verdict.message

"""Switching the attention implementation gives the same model.

For the model under test, every attention implementation the machine offers runs the same inputs
as eager attention in the run's dtype and as a high-precision eager reference (the same weights
upcast: float64 on CPU, float32 on GPU). Every layer's hidden states and the logits must obey the k x eager rule of
harness.equivalence.compare (factor ``model_error_factor``): the implementation may be at most k times as
far from the reference as eager attention is. Padding positions are excluded. A failure names
the first diverging layer, the error, the tolerance and the (batch, token) position.

Inputs: one sequence; a left-padded and a right-padded batch; for sliding-window models a length
past the window; and cached decoding (q_len = 1 against a KV cache) of a left-padded batch.
Token ids are drawn from ``--seed``, so repeated runs with different seeds probe different inputs.
"""

import pytest
import torch

from harness.equivalence.attention_model import (compare_model_outputs, known_disagreement, model_forward, padded_position_ids,
                                     reference_context, upcast_reference)
from harness.equivalence.compare import error_over_allowed
from harness.equivalence.layer_attention import batch_lengths, padded_token_batch
from harness.backends.attention import fused_backends
from harness.backends.capabilities import dtype_name
from harness.equivalence.compare import compare_tensors
from harness.performance.memory import release_device_memory

BACKENDS = fused_backends()
SCENARIOS = ["single", "left_padded", "right_padded", "past_sliding_window"]


def _reference_dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def _lengths(model_spec, model, scenario, seed) -> list[int]:
    """Sequence lengths per batch row; short for the 30-layer default model on CPU (CI budget)."""
    deep = model.config.num_hidden_layers > 8
    lengths = batch_lengths(model.config, scenario, seed, base=12 if deep else 24, spread=8 if deep else 16)
    if lengths is None:
        pytest.skip(f"{model_spec.name} has no sliding window")
    return lengths


def _forward(model, ids, mask, context=None):
    return model_forward(model, ids, mask, context)


@pytest.fixture(scope="session")
def reference_outputs():
    """(model name, scenario, seed, which) -> outputs, so eager and the reference run once each."""
    return {}


def _reference_model(cache, model_spec, model_factory, device):
    """The eager model's own weights upcast (float64 on CPU, float32 on GPU); one model kept at a time."""
    if cache.get("reference_model_name") != model_spec.name:
        cache["reference_model"] = None
        cache["reference_model"] = upcast_reference(model_factory("eager"), _reference_dtype(device))
        cache["reference_model_name"] = model_spec.name
    return cache["reference_model"]


def _sized(cache, key, input_ids, model_spec, model_factory, device, dtype, run_config):
    """Size the comparison for ``key`` before anything of it is built (harness.models.reference_sizing; on
    CUDA only): where the upcast copy and the activations would not fit beside what is held, the
    reference's decoder layers stream from host memory, or the test skips with the numbers."""
    from harness.models.reference_sizing import plan_model_reference

    if key + ("plan",) not in cache:
        batch, length = input_ids.shape
        cache[key + ("plan",)] = plan_model_reference(
            model_factory("eager"), device, dtype, _reference_dtype(device), requested=length, minimum=length,
            batch=batch, budget_bytes=run_config.memory_budget_bytes, placements=("device", "layers"), kv_cache=True)
    plan = cache[key + ("plan",)]
    if plan.skip:
        pytest.skip(f"{model_spec.name}, {tuple(input_ids.shape)} tokens: {plan.skip}")
    return plan


def _reference_outputs(cache, key, run, model_spec, model_factory, device, plan):
    """run(reference model) once per key, placed as ``plan`` says. On CUDA an upcast model over
    2 GiB (a 7B model is 27 GB in float32) is dropped after each use, so it never sits beside the
    variants the factory holds."""
    from harness.models.reference_build import planned_reference

    if key not in cache:
        if plan.placement != "device":
            with planned_reference(model_factory("eager"), plan, _reference_dtype(device)) as reference:
                cache[key] = run(reference)
            return cache[key]
        reference = _reference_model(cache, model_spec, model_factory, device)
        cache[key] = run(reference)
        if device.type == "cuda" and sum(p.numel() * p.element_size() for p in reference.parameters()) > 2 << 30:
            del reference
            cache["reference_model"] = cache["reference_model_name"] = None
            release_device_memory(device)
    return cache[key]


def _run(fn, backend, model_spec):
    """Run a forward; a backend torch cannot dispatch for this model's inputs is a skip that says so."""
    try:
        return fn()
    except RuntimeError as exc:
        if "No available kernel" in str(exc):
            pytest.skip(f"{backend} cannot run {model_spec.name}'s attention inputs: torch found no kernel "
                        f"({str(exc).splitlines()[0]})")
        raise


def _assert_or_known(config, passed: bool, message: str) -> None:
    known = known_disagreement(config)
    if not passed and known:
        pytest.xfail(f"{known}: {message}")
    assert passed, message


def _cached(cache, key, fn):
    if key not in cache:
        cache[key] = fn()
    return cache[key]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_states_and_logits_match_eager(backend, scenario, model_spec, model_factory, device, dtype, tolerances,
                                              run_config, select_attention, record_result, reference_outputs):
    attn_implementation, context = select_attention(backend)
    seed = run_config.seed
    eager = model_factory("eager")
    lengths = _lengths(model_spec, eager, scenario, seed)
    ids, mask = padded_token_batch(eager.config, lengths, "right" if scenario == "right_padded" else "left", seed + 1, device)
    key = (model_spec.name, scenario, seed)
    model = model_factory(attn_implementation)
    assert model.config._attn_implementation == attn_implementation, (
        f"asked for {attn_implementation}, model runs {model.config._attn_implementation}: the comparison would be vacuous")
    plan = _sized(reference_outputs, key, ids, model_spec, model_factory, device, dtype, run_config)
    base = _cached(reference_outputs, key + ("eager",), lambda: _forward(eager, ids, mask))
    ref = _reference_outputs(reference_outputs, key + ("reference",),
                             lambda reference: _forward(reference, ids, mask, reference_context),
                             model_spec, model_factory, device, plan)
    out = _run(lambda: _forward(model, ids, mask, context), backend, model_spec)

    layers, logits = compare_model_outputs(out, base, ref, mask, tolerances=tolerances,
                                           name=f"{backend} vs eager, {scenario} {lengths}")
    record_result("attention_model", "max error / allowed error", error_over_allowed(layers, logits), threshold=1.0,
                  passed=layers.passed and logits.passed, where=f"{backend}/{scenario}/{dtype_name(dtype)}",
                  rule=f"error <= {tolerances.model_error_factor:g} x eager error + slack", ratio_vs_eager=round(logits.ratio, 3),
                  logits_error=logits.error, eager_logits_error=logits.baseline_error,
                  tightest_layer=layers.layer, layer_ratio=round(layers.ratio, 3))
    _assert_or_known(eager.config, layers.passed, layers.message)
    _assert_or_known(eager.config, logits.passed, logits.message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decode_last_token_logits_match_eager(backend, model_spec, model_factory, device, dtype, tolerances,
                                                     run_config, select_attention, record_result, reference_outputs):
    """Prefill all but the last token of a left-padded batch, then decode it (q_len=1 against the cache)."""
    attn_implementation, context = select_attention(backend)
    seed = run_config.seed
    eager = model_factory("eager")
    lengths = _lengths(model_spec, eager, "left_padded", seed + 7)
    ids, mask = padded_token_batch(eager.config, lengths, "left", seed + 8, device)

    def decode(model, ctx=None):
        import contextlib

        position_ids = padded_position_ids(mask)
        with torch.no_grad(), (ctx or contextlib.nullcontext)():
            prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                            use_cache=True)
            step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=position_ids[:, -1:],
                         past_key_values=prefill.past_key_values, use_cache=True)
        return step.logits[:, -1]

    key = (model_spec.name, "decode", seed)
    model = model_factory(attn_implementation)
    plan = _sized(reference_outputs, key, ids, model_spec, model_factory, device, dtype, run_config)
    base = _cached(reference_outputs, key + ("eager",), lambda: decode(eager))
    ref = _reference_outputs(reference_outputs, key + ("reference",), lambda reference: decode(reference, reference_context),
                             model_spec, model_factory, device, plan)
    out = _run(lambda: decode(model, context), backend, model_spec)
    verdict = compare_tensors(out, base, ref, factor=tolerances.model_error_factor,
                              slack_floor=tolerances.attention_abs_slack,
                              what=f"{backend} cached-decode last-token logits {lengths}", position_names=("batch", "vocab"))
    record_result("attention_decode", "max error / allowed error", error_over_allowed(verdict), threshold=1.0,
                  passed=verdict.passed, where=f"{backend}/decode/{dtype_name(dtype)}",
                  rule=f"error <= {tolerances.model_error_factor:g} x eager error + slack",
                  ratio_vs_eager=round(verdict.ratio, 3), error=verdict.error, eager_error=verdict.baseline_error)
    _assert_or_known(eager.config, verdict.passed, verdict.message)

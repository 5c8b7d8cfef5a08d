"""Fits in memory? Predicted vs measured memory, and how prefill memory grows with length.

- Weights: parameters x bytes per element (per quantisation scheme) vs what loading really holds.
- KV cache: 2 x layers x batch x KV heads x head_dim x tokens x bytes vs what a prefill keeps.
- Eager attention: its N x N score matrices vs the extra peak over a fused kernel.
- Growth: prefill peak at doubling lengths; eager must grow quadratically, fused kernels
  (SDPA, flash-attn) linearly.
- The seed's rule of thumb, "about 2 x billions of parameters GB in bf16", on a 7B shape (GPU).

How memory is measured (allocator + NVML on CUDA, the process's resident high-water mark on CPU)
is in harness/performance/memory.py; each recorded result says which method it used.
"""

import math

import pytest
import torch

from harness.backends.capabilities import dtype_name
from harness.performance.memory import (MODEL_STORAGE_METHOD, is_out_of_memory, measure_peak, model_storage_bytes,
                            release_device_memory)
from harness.performance.predictions import (SCALING_CHECK, attention_scores_bytes, attention_shape, fit_growth,
                                 kv_bytes_per_token, predict_eager_attention_peak_bytes,
                                 predict_kv_cache_bytes, predict_weight_bytes)
from harness.models.loading import load_model
from harness.backends.attention import measured_backends
from harness.backends.quantization import get_scheme, measured_schemes, quantization_config
from harness.performance.utilisation import prefill_flops

# exclusive: these tests read the device's memory (NVML counts every process), so harness.gate runs
# them alone on it
pytestmark = pytest.mark.exclusive

# A CPU run keeps each prefill under this many FLOPs (a few seconds on 2 cores); bigger ones need
# --run-slow. On CUDA every length runs.
CPU_PREFILL_FLOPS = 1e11
# Sizes chosen so that what is measured stands far above the CPU resident set's noise (~1 MiB).
KV_TARGET_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}
SCORES_TARGET_BYTES = {"cpu": 32 * 2**20, "cuda": 2 * 2**30}
GROWTH_LONGEST = {"cpu": 2048, "cuda": 16384}
GROWTH_POINTS = {"cpu": 3, "cuda": 5}


@pytest.fixture(scope="session")
def seed(run_config):
    return run_config.seed


@pytest.fixture(scope="session")
def shape(reference_model):
    return attention_shape(reference_model.config)


def _max_positions(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def _has_alibi(config) -> bool:
    return bool(getattr(config, "alibi", False)) or config.model_type in ("bloom", "mpt")


def _affordable(request, device, counts, shape, batch: int, seq_len: int) -> None:
    flops = prefill_flops(counts, shape, batch, seq_len)
    if device.type == "cpu" and flops > CPU_PREFILL_FLOPS and not request.config.getoption("--run-slow"):
        pytest.skip(f"a {seq_len}-token prefill is {flops / 1e9:.0f} GFLOP, too slow for a CPU run "
                    f"(limit {CPU_PREFILL_FLOPS / 1e9:.0f}); pass --run-slow or run on a GPU")


def _token_ids(batch: int, seq_len: int, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (batch, seq_len), generator=gen).to(device)


def _warm_up(model, device, seed: int) -> None:
    """One short forward: library code and lazily mapped weights become resident before measuring."""
    with torch.inference_mode():
        model(_token_ids(1, 8, device, seed))
    release_device_memory(device)


def _prefill_peak(model, ids):
    """Peak memory of a cache-less prefill through the decoder only (no logits: the LM head's
    batch x N x vocab output would hide attention's share)."""
    with torch.inference_mode(), measure_peak(ids.device) as peak:
        model.base_model(ids, use_cache=False)
    return peak


@pytest.mark.parametrize("scheme", ["none", *measured_schemes()])
def test_weight_bytes_match_prediction(scheme, model_spec, reference_model, counts, device, dtype, tolerances,
                                       require, record_result, seed, request):
    quantization = None
    if scheme != "none":
        request.getfixturevalue("quantizable")
        if device.type == "cpu":
            pytest.skip("on CPU the checkpoint is memory-mapped and bitsandbytes keeps its quantisation state "
                        "outside the parameters, so neither allocation counters nor the model's storages hold "
                        "the whole footprint; CUDA's allocator counts it exactly")
        require(get_scheme(scheme).capability)
        quantization = quantization_config(scheme, compute_dtype=dtype)
    predicted = predict_weight_bytes(counts, dtype, scheme)
    _warm_up(reference_model, device, seed)
    with measure_peak(device) as peak:
        model = load_model(model_spec, device=device, dtype=dtype, attn_implementation="eager",
                           quantization_config=quantization)
        _warm_up(model, device, seed)
    if device.type == "cuda":
        measured, method = peak.retained_bytes, peak.method
    else:
        measured, method = model_storage_bytes(model), MODEL_STORAGE_METHOD
    del model
    release_device_memory(device)
    ratio = measured / predicted.bytes
    passed = abs(ratio - 1) <= tolerances.memory_prediction_rel_error
    record_result("weights", "measured/predicted", ratio, threshold=f"1±{tolerances.memory_prediction_rel_error}",
                  passed=passed, where=f"{scheme}, {dtype_name(dtype)}", predicted_bytes=predicted.bytes,
                  measured_bytes=measured, breakdown=predicted.breakdown, method=method)
    assert passed, (f"weights ({scheme}): measured {measured / 2**20:.1f} MiB vs predicted {predicted.bytes / 2**20:.1f} MiB "
                    f"({counts.total:,} params; {predicted.breakdown}), ratio {ratio:.3f} outside "
                    f"1±{tolerances.memory_prediction_rel_error} [{method}]")


def test_kv_cache_bytes_match_prediction(request, model_spec, reference_model, counts, shape, device, dtype, tolerances,
                                         record_result, seed):
    seq_len = 128
    if shape.sliding_window and shape.sliding_window < seq_len:
        pytest.skip(f"sliding window of {shape.sliding_window} tokens: the cache keeps only the window, not "
                    "the full-length layers this prediction is for (suites/test_kv_cache_memory.py checks windows)")
    per_token = kv_bytes_per_token(shape, dtype)
    batch = max(1, round(KV_TARGET_BYTES[device.type] / (per_token * seq_len)))
    _affordable(request, device, counts, shape, batch, seq_len)
    predicted = predict_kv_cache_bytes(shape, batch, seq_len, dtype)
    ids = _token_ids(batch, seq_len, device, seed)
    _warm_up(reference_model, device, seed)
    with torch.inference_mode(), measure_peak(device) as peak:
        out = reference_model.base_model(ids, use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        del out
    measured = peak.retained_bytes
    tensor_bytes = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                       for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t))
    del cache
    release_device_memory(device)
    ratio = measured / predicted
    passed = abs(ratio - 1) <= tolerances.memory_prediction_rel_error
    record_result("kv cache", "measured/predicted", ratio, threshold=f"1±{tolerances.memory_prediction_rel_error}",
                  passed=passed, where=f"batch {batch} x {seq_len} tokens", predicted_bytes=predicted,
                  measured_bytes=measured, cache_tensor_bytes=tensor_bytes, method=peak.method)
    assert passed, (f"KV cache after a {batch}x{seq_len} prefill: measured {measured / 2**20:.2f} MiB vs predicted "
                    f"{predicted / 2**20:.2f} MiB (2 x {shape.layers} layers x {shape.kv_heads} KV heads x "
                    f"{shape.head_dim} dims x {torch.empty((), dtype=dtype).element_size()} B per token), ratio {ratio:.3f}; "
                    f"the cache's own tensors hold {tensor_bytes / 2**20:.2f} MiB [{peak.method}]")


def test_eager_attention_scores_match_prediction(request, model_spec, attn_variant, counts, shape, device, dtype,
                                                 tolerances, require, record_result, seed):
    require("sdpa_flash" if device.type == "cpu" else "sdpa_efficient")
    models = {attn: attn_variant(attn) for attn in ("eager", "sdpa")}
    config = models["eager"].config
    if _has_alibi(config):
        pytest.skip("ALiBi models build a batch x heads x N x N bias for every implementation, so no fused "
                    "run exists to subtract")
    per_n2 = attention_scores_bytes(1, shape.heads, 1, 1, dtype)
    target = math.sqrt(SCORES_TARGET_BYTES[device.type] / per_n2)
    seq_len = min(_max_positions(config), 2 ** round(math.log2(target)))
    _affordable(request, device, counts, shape, 1, seq_len)
    ids = _token_ids(1, seq_len, device, seed)
    peaks = {}
    for attn, model in models.items():
        _prefill_peak(model, ids[:, :64])  # first-call allocations (kernels, workspaces) out of the way
        peaks[attn] = _prefill_peak(model, ids)
    measured = peaks["eager"].increase_bytes - peaks["sdpa"].increase_bytes
    one_matrix = per_n2 * seq_len**2
    copies = measured / one_matrix
    predicted = predict_eager_attention_peak_bytes(shape, 1, seq_len, dtype)
    low, high = tolerances.eager_min_score_copies, tolerances.eager_max_score_copies
    passed = low <= copies <= high
    record_result("eager attention scores", "extra peak / one score matrix", copies, threshold=f"{low}..{high}",
                  passed=passed, where=f"N={seq_len}", measured_bytes=measured, one_score_matrix_bytes=one_matrix,
                  predicted_bytes=predicted, measured_over_predicted=measured / predicted, method=peaks["eager"].method)
    assert passed, (f"eager attention at N={seq_len}: peak exceeds SDPA's by {measured / 2**20:.1f} MiB = {copies:.2f} "
                    f"score matrices of {one_matrix / 2**20:.1f} MiB (allowed {low}..{high}; transformers' eager path "
                    f"predicts {predicted / 2**20:.1f} MiB) [{peaks['eager'].method}]")


@pytest.mark.parametrize("attn", [pytest.param(b.attn_implementation, marks=pytest.mark.needs(b.name))
                                  for b in measured_backends()])
def test_prefill_peak_memory_growth(attn, request, model_spec, model_factory, attn_variant, counts, shape, device, dtype,
                                    tolerances, run_config, record_result, seed):
    if run_config.attn and attn not in run_config.attn:
        pytest.skip(f"--attn {','.join(run_config.attn)} excludes {attn}")
    config = model_factory("eager").config
    fused = attn != "eager"
    longest = min(GROWTH_LONGEST[device.type], _max_positions(config))
    if fused and _has_alibi(config):
        pytest.skip("ALiBi models pass a batch x heads x N x N bias to the fused kernel, so its memory grows as N^2 too")
    if attn == "sdpa" and shape.sliding_window and shape.sliding_window < longest:
        pytest.skip(f"a {shape.sliding_window}-token sliding window reaches SDPA as a batch x 1 x N x N mask, which grows "
                    "as N^2 (flash-attn takes the window natively)")
    lengths = [longest >> k for k in reversed(range(GROWTH_POINTS[device.type]))]
    _affordable(request, device, counts, shape, 1, longest)
    if device.type == "cuda":
        model_factory.clear()  # other cached variants would leave less room for the longest prompts
    model = attn_variant(attn)
    ids = _token_ids(1, longest, device, seed)
    _prefill_peak(model, ids[:, : lengths[0]])
    measured = {}
    for n in lengths:
        oom = None
        try:
            peak = _prefill_peak(model, ids[:, :n])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            oom = f"{type(exc).__name__}"
        if oom:  # outside the except, so the failed prefill's tensors are freed before the next length
            release_device_memory(device)
            predicted = predict_eager_attention_peak_bytes(shape, 1, n, dtype) if not fused else None
            record_result(SCALING_CHECK, "peak increase MiB", "out of memory", where=f"{attn} N={n}", model=model_spec.name,
                          attn=attn, seq_len=n, increase_bytes=None, out_of_memory=True, predicted_eager_extra_bytes=predicted)
            continue
        measured[n] = peak.increase_bytes
        record_result(SCALING_CHECK, "peak increase MiB", round(peak.increase_bytes / 2**20, 1), where=f"{attn} N={n}",
                      model=model_spec.name, attn=attn, seq_len=n, increase_bytes=peak.increase_bytes,
                      peak_bytes=peak.peak_bytes, out_of_memory=False, method=peak.method)
    if len(measured) < 3:
        pytest.fail(f"{attn}: only {len(measured)} of the lengths {lengths} fit in memory; cannot fit a curve", pytrace=False)
    fit = fit_growth(list(measured), list(measured.values()))
    per_n2 = attention_scores_bytes(1, shape.heads, 1, 1, dtype)
    copies = fit.quadratic / per_n2
    table = ", ".join(f"N={n}: {b / 2**20:.1f} MiB" for n, b in measured.items())
    if fused:
        passed = copies <= tolerances.fused_max_score_fraction
        threshold = f"<= {tolerances.fused_max_score_fraction} score matrices per N^2"
        message = (f"{attn} prefill memory grows quadratically: fitted N^2 term holds {copies:.2f} score matrices "
                   f"(limit {tolerances.fused_max_score_fraction}); log-log slope {fit.exponent:.2f}; {table}")
    else:
        passed = copies >= tolerances.eager_min_score_copies
        threshold = f">= {tolerances.eager_min_score_copies} score matrices per N^2"
        message = (f"eager prefill memory does not grow quadratically: fitted N^2 term holds only {copies:.2f} score "
                   f"matrices (need {tolerances.eager_min_score_copies}); log-log slope {fit.exponent:.2f}; {table}")
    record_result(SCALING_CHECK + " (fit)", "score matrices per N^2", copies, threshold=threshold, passed=passed,
                  where=attn, exponent=fit.exponent, quadratic=fit.quadratic, linear=fit.linear, constant=fit.constant,
                  lengths=list(measured), increases=list(measured.values()))
    assert passed, message


@pytest.mark.gpu
def test_rule_of_thumb_two_bytes_per_parameter_in_half_precision(model_spec, model_factory, counts, device, dtype,
                                                                  record_result, tolerances):
    if dtype not in (torch.bfloat16, torch.float16):
        pytest.skip(f"the rule of thumb is for bf16/fp16; this run is in {dtype}")
    model_factory.clear()
    with measure_peak(device) as peak:
        model_factory("eager")
    measured_gb = peak.retained_bytes / 1e9
    rule_gb = 2 * counts.total / 1e9
    ratio = measured_gb / rule_gb
    passed = abs(ratio - 1) <= tolerances.memory_prediction_rel_error
    record_result("rule of thumb", "measured GB / (2 x billions of params)", ratio,
                  threshold=f"1±{tolerances.memory_prediction_rel_error}", passed=passed,
                  where=f"{counts.total / 1e9:.2f} B params", measured_gb=measured_gb, rule_gb=rule_gb,
                  nvml_used_peak_bytes=peak.nvml_used_peak, method=peak.method)
    assert passed, (f"{counts.total / 1e9:.2f} B parameters in {dtype}: weights hold {measured_gb:.2f} GB, the rule of "
                    f"thumb says {rule_gb:.2f} GB (ratio {ratio:.3f}) [{peak.method}]")

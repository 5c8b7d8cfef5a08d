"""The KV cache holds exactly what the formula says, and GQA/MQA shrink it by their head ratio.

    bytes = 2 x layers x kv_heads x head_dim x seq_len x batch x bytes per element

(per layer: sliding-window layers hold their window, static layers their max_cache_len slots).
Measured = the bytes of the tensors a real cache object holds after a generate() call.
"""

import pytest
import torch

from harness.inference import generation as gen
from harness.backends import cache as caches
from harness.performance import kv_cache
from harness.performance import predictions
from harness.models.presets import build_preset

BATCH = 2  # > 1 so a formula that forgets the batch factor fails


MEMORY_NEW_TOKENS = 4  # the size check needs a filled cache, not a long generation


def _filled_cache(model, tokenizer, cache_name, run_config):
    prompts = [gen.prompt_for_seed(run_config.seed, offset=i) for i in range(BATCH)]
    inputs = gen.batch_inputs(tokenizer, prompts, model.device)
    max_cache_len = inputs["input_ids"].shape[1] + MEMORY_NEW_TOKENS
    cache = caches.get_cache_type(cache_name).build(model, max_cache_len)
    gen.generate_greedy(model, inputs, label=cache_name, pad_token_id=gen.pad_id(tokenizer), new_tokens=MEMORY_NEW_TOKENS,
                        disable_compile=True, **{gen.cache_kwarg(): cache})
    return cache, max_cache_len - 1, max_cache_len  # the last token is generated, never fed back


@pytest.mark.parametrize("cache_name", caches.formula_sized_cache_types())
def test_measured_cache_bytes_equal_formula(cache_name, reference_model, tokenizer, device, run_config, record_result):
    kind = caches.get_cache_type(cache_name)
    reason = kind.not_applicable(reference_model, device)
    if reason:
        pytest.skip(f"{cache_name}: {reason}")
    cache, fed_tokens, max_cache_len = _filled_cache(reference_model, tokenizer, cache_name, run_config)
    shape = predictions.attention_shape(reference_model.config)
    lengths = kind.tokens_per_layer(reference_model, fed_tokens, max_cache_len)
    element = reference_model.dtype.itemsize
    predicted = predictions.kv_cache_bytes(shape, fed_tokens, BATCH, element, layer_lengths=lengths)
    measured = kv_cache.measured_cache_bytes(cache)
    record_result("kv cache bytes", f"{cache_name}: measured bytes", measured, threshold=predicted,
                  passed=measured == predicted, where=f"batch {BATCH}, {lengths[0]} tokens/layer",
                  layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim)
    assert measured == predicted, (
        f"{cache_name} cache holds {measured} bytes; the formula 2 x {shape.layers} layers x {shape.kv_heads} kv heads x "
        f"{shape.head_dim} head_dim x {lengths} tokens x {BATCH} batch x {element} bytes gives {predicted}")


def test_model_reports_its_grouped_query_saving(reference_model, record_result):
    shape = predictions.attention_shape(reference_model.config)
    per_token = predictions.kv_cache_bytes(shape, 1, 1, reference_model.dtype.itemsize)
    mha = predictions.kv_cache_bytes(predictions.mha_equivalent(shape), 1, 1, reference_model.dtype.itemsize)
    record_result("kv cache bytes", "bytes per token (batch 1)", per_token, where=f"{shape.kv_heads} of {shape.heads} heads",
                  mha_bytes_per_token=mha, saving=round(1 - per_token / mha, 4))
    assert per_token * shape.heads == mha * shape.kv_heads


@pytest.mark.parametrize("grouped, mha, expected_ratio", [
    ("tiny:llama", "tiny:gpt2", 0.5),           # GQA 4 query / 2 KV heads vs MHA, both width 64
    ("tiny:qwen2", "tiny:gpt2", 0.5),
    ("tiny:falcon-mqa", "tiny:falcon-alibi", 0.25),  # MQA: one KV head for 4 query heads
])
def test_grouped_query_presets_shrink_the_cache_against_mha(grouped, mha, expected_ratio, record_result):
    measured = {}
    for name in (grouped, mha):
        model = build_preset(name, torch.device("cpu"), torch.float32)
        ids = torch.arange(100, 140).unsqueeze(0)
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
        measured[name] = kv_cache.measured_cache_bytes(gen.output_cache(out))
        assert model.config.hidden_size == 64
    ratio = measured[grouped] / measured[mha]
    record_result("kv cache bytes", "GQA/MQA : MHA cache ratio", round(ratio, 4), threshold=expected_ratio,
                  passed=ratio == expected_ratio, where=f"{grouped} vs {mha}")
    assert ratio == expected_ratio, f"{grouped} cache is {ratio:.3f} x {mha}'s, expected {expected_ratio} (kv_heads ratio)"

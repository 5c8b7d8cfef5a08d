"""A KV cache must not change what greedy decoding produces.

Claim under test: a KV cache "leads to identical results" and static cache + torch.compile is a
pure speed-up. Every cache type transformers offers that applies to the model is run against
the no-cache reference (every step recomputes attention over the whole sequence), N tokens forced
(HARNESS_NEW_TOKENS, default 32), compared by harness.equivalence.token_agreement's single rule: equal tokens
(or a near-tie divergence on reduced precision) and per-step logits within tolerance.
"""

import pytest

from harness.inference import generation as gen
from harness.backends import cache as caches


@pytest.fixture(scope="session")
def prompt(run_config):
    return gen.prompt_for_seed(run_config.seed)


@pytest.fixture(scope="session")
def no_cache_reference(model_spec, reference_model, prompt_inputs, pad, computed_once_per_run):
    return computed_once_per_run(f"no-cache reference: {model_spec.name}",
                                 lambda: gen.no_cache_run(reference_model, prompt_inputs, pad_token_id=pad))


@pytest.mark.parametrize("cache_name", list(caches.CACHE_TYPES))
def test_cache_type_matches_no_cache(cache_name, reference_model, device, prompt_inputs, pad, no_cache_reference, agrees,
                                     known_transformers_bug):
    kind = caches.get_cache_type(cache_name)
    reason = kind.not_applicable(reference_model, device)
    if reason:
        pytest.skip(f"{cache_name}: {reason}")
    try:
        run = caches.cached_run(reference_model, prompt_inputs, kind, pad_token_id=pad)
    except ValueError as exc:
        sliding = getattr(reference_model.config.get_text_config(decoder=True), "sliding_window", None)
        known_transformers_bug(cache_name == "offloaded-static" and bool(sliding),
                               f"the offloaded static cache of a sliding-window model fails in update() ({exc})")
        raise
    try:
        agrees(no_cache_reference, run, f"{cache_name} cache vs no cache", lossy_kv=kind.lossy)
    except AssertionError:
        if kind.accelerator_bug and device.type != "cpu":
            known_transformers_bug(True, *kind.accelerator_bug)
        raise


def test_second_turn_reusing_first_turn_cache_equals_fresh_second_turn(reference_model, tokenizer, prompt, device, pad, agrees, run_config):
    first = gen.greedy(reference_model, gen.chat_inputs(tokenizer, prompt, device), label="turn 1", pad_token_id=pad)
    follow_up = gen.prompt_for_seed(run_config.seed, offset=1)
    second_inputs = gen.second_turn_inputs(tokenizer, prompt, first, follow_up, device)
    assert gen.cache_length(first.cache) == first.sequence.shape[0] - 1  # all but the last token are cached
    fresh = gen.greedy(reference_model, second_inputs, label="turn 2 from scratch", pad_token_id=pad)
    continued = gen.greedy(reference_model, second_inputs, label="turn 2 continuing turn 1's cache",
                           pad_token_id=pad, **{gen.cache_kwarg(): first.cache})
    agrees(fresh, continued, "multi-turn continuation via past_key_values")


@pytest.mark.parametrize("cache_name", ["dynamic", "static"])
def test_cache_reused_after_reset_equals_fresh_cache(cache_name, reference_model, tokenizer, device, pad, prompt_inputs, agrees,
                                                    run_config, known_transformers_bug):
    kind = caches.get_cache_type(cache_name)
    reason = kind.not_applicable(reference_model, device)
    if reason:
        pytest.skip(f"{cache_name}: {reason}")
    other = gen.chat_inputs(tokenizer, gen.prompt_for_seed(run_config.seed, offset=3), device)
    n = gen.new_tokens_default()
    cache = kind.build(reference_model, max(other["input_ids"].shape[1], prompt_inputs["input_ids"].shape[1]) + n)
    gen.greedy(reference_model, other, label="fill", pad_token_id=pad, disable_compile=True, **{gen.cache_kwarg(): cache})
    gen.reset_cache(cache)
    known_transformers_bug(cache_name == "dynamic" and gen.cache_length(cache) > 0,
                           f"DynamicCache.reset() zeroes the keys/values but keeps their {gen.cache_length(cache)} "
                           "positions, so a reused cache attends to zeros (later releases drop them)")
    reused = gen.greedy(reference_model, prompt_inputs, label=f"{cache_name} cache after reset()", pad_token_id=pad,
                        disable_compile=True, **{gen.cache_kwarg(): cache})
    fresh = caches.cached_run(reference_model, prompt_inputs, kind, pad_token_id=pad)
    agrees(fresh, reused, f"{cache_name} cache reset vs fresh")


def test_cropped_dynamic_cache_continues_like_the_shorter_run(reference_model, prompt_inputs, pad, agrees):
    import torch

    full = caches.cached_run(reference_model, prompt_inputs, "dynamic", pad_token_id=pad)
    rollback = len(full.tokens) // 2
    gen.crop_cache(full.cache, rollback)
    shorter = full.sequence[: full.sequence.shape[0] - rollback].unsqueeze(0)
    assert gen.cache_length(full.cache) == shorter.shape[1] - 1
    inputs = {"input_ids": shorter, "attention_mask": torch.ones_like(shorter)}
    fresh = gen.greedy(reference_model, inputs, label="shorter run from scratch", pad_token_id=pad)
    cropped = gen.greedy(reference_model, inputs, label=f"dynamic cache cropped by {rollback}", pad_token_id=pad,
                         **{gen.cache_kwarg(): full.cache})
    agrees(fresh, cropped, "crop/rollback of a dynamic cache")


def test_left_padded_batch_equals_each_prompt_alone(reference_model, tokenizer, device, pad, agrees, run_config):
    prompts = [gen.prompt_for_seed(run_config.seed, offset=i) for i in range(3)]
    batch = gen.batch_inputs(tokenizer, prompts, device)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) > 1, "prompts must differ in length, or no row is padded"
    rows = gen.generate_greedy(reference_model, batch, label="left-padded batch", pad_token_id=pad)
    for i, p in enumerate(prompts):
        alone = gen.greedy(reference_model, gen.chat_inputs(tokenizer, p, device), label="alone", pad_token_id=pad)
        rows[i].label = f"row {i} of a left-padded batch of {len(prompts)} (padding {max(lengths) - lengths[i]})"
        agrees(alone, rows[i], f"batched row {i} vs alone")


def test_static_cache_compiled_equals_uncompiled_dynamic_cache(reference_model, device, prompt_inputs, pad, agrees, record_result):
    reason = caches.supports_static_cache(reference_model)
    if reason:
        pytest.skip(f"static cache + torch.compile: {reason}")
    dynamic = caches.cached_run(reference_model, prompt_inputs, "dynamic", pad_token_id=pad)
    try:
        runs = gen.compiled_static_runs(reference_model, prompt_inputs, pad_token_id=pad)
    except Exception as exc:  # inductor needs a C++ compiler on CPU; report why instead of failing
        if device.type == "cuda":
            raise
        pytest.skip(f"torch.compile (default mode) does not work on this CPU: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    record_result("static cache + torch.compile", "compile seconds (first call minus steady call)",
                  round(runs.compile_seconds, 3), where=f"mode {runs.mode}")
    record_result("static cache + torch.compile", "steady-state seconds per token",
                  round(runs.steady_step_seconds, 6), where=f"mode {runs.mode}",
                  uncompiled_dynamic_seconds_per_token=round(dynamic.seconds / len(dynamic.tokens), 6))
    agrees(dynamic, runs.first, "static+compile (first call) vs dynamic")
    agrees(dynamic, runs.steady, "static+compile (steady) vs dynamic")

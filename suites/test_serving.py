"""Does the serving path give every request what it would get alone, in less memory, faster?

Claim under test: transformers' continuous batching (`generate_batch`, `init_continuous_batching`)
with a paged KV cache is a scheduling and memory optimisation only. Requests of different lengths
(short, long, the short one a prefix of the long one, two identical prompts; chat prompts drawn
from --seed) served together, in another order, arriving mid-generation or next to a cancelled
request, must each equal the same request decoded alone with the ordinary dynamic cache, by
harness.equivalence.token_agreement's rule (harness.equivalence.serving_compare applies it to what the serving path
returns: tokens and their log-probabilities). Long prompts are prefilled in chunks (a 48-token
batch budget) over 16-token blocks. The paged cache must hold what its config says
(harness.performance.serving_memory), and on a GPU continuous batching is timed against generate() on a
padded batch (harness.performance.serving_speed). Each paged attention implementation is tried first (on a
tiny Llama); one that does not run here skips with the exception it raised.
"""

import pytest

from harness.inference import generation as gen
from harness.backends import cache as caches
from harness.inference import serving
from harness.performance import serving_memory as mem
from harness.performance import serving_speed as speed
from harness.backends.capabilities import dtype_name
from harness.equivalence.serving_compare import served_agreement
from harness.performance.timing import device_timer
from harness.equivalence.token_agreement import record_fields

SYNCED = {"timer": device_timer, "disable_gc": True}
# 16 requests are the quick gate's level (a batch where continuous batching pays); 1, 4 and 64 fill
# in the curve in the full profile (each level is ~20 s of the H200 gate's exclusive phase, which
# runs alone on the device).
CONCURRENCY = [pytest.param(1, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow), 16,
               pytest.param(64, marks=pytest.mark.slow)]
# 32 new tokens a request (64 before issue 15's cut: ~23 s of the H200 gate's exclusive phase, alone
# on the device); prefill weighs more in both paths' tokens/s alike. A baseline recorded with other
# sizes is refused by harness.performance.regression (WORKLOAD_FIELDS).
SPEED = {"shortest": 128, "longest": 512, "new_tokens": 32, "rounds": 3,
         # the eager paged path is the reference for equivalence, not a serving configuration anyone
         # deploys: its speed table costs the quick gate ~1 min on the H200, so only the full profile has it
         "full_profile_only": ("paged|eager",)}


@pytest.fixture(scope="session")
def serving_settings():
    """Half of $HARNESS_NEW_TOKENS (default 16) per request: every prompt is served three times per
    implementation, and 16 tokens already cross a block boundary in every request."""
    return serving.ServingSettings(new_tokens=max(2, gen.new_tokens_default() // 2))


@pytest.fixture(scope="session")
def serving_prompts(tokenizer, run_config) -> dict[str, list[int]]:
    """Different lengths, one prompt a prefix of another (they share their first blocks), two
    identical prompts; three distinct prompts, so three runs alone are the whole reference."""
    seed = run_config.seed
    short = gen.chat_inputs(tokenizer, gen.prompt_for_seed(seed), "cpu")["input_ids"][0].tolist()
    more = " ".join(gen.prompt_for_seed(seed, i) for i in range(1, 6))
    same = gen.chat_inputs(tokenizer, gen.prompt_for_seed(seed, 6), "cpu")["input_ids"][0].tolist()
    return {"short": short, "long": short + tokenizer(more, add_special_tokens=False)["input_ids"],
            "same-1": same, "same-2": same}


@pytest.fixture(scope="session")
def eos_ids(reference_model, tokenizer):
    return gen.eos_token_ids(reference_model, tokenizer)


@pytest.fixture(scope="session")
def alone(reference_model, serving_prompts, pad, serving_settings):
    """alone[name]: that request decoded alone with the dynamic cache, made on first use (tests
    that skip cost nothing) and once per distinct prompt (identical prompts share one run)."""
    import torch

    runs = {}

    class Alone:
        def __getitem__(self, name):
            prompt = serving_prompts[name]
            if tuple(prompt) not in runs:
                ids = torch.tensor([prompt], device=reference_model.device)
                runs[tuple(prompt)] = gen.greedy(
                    reference_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    label="the same request alone with a dynamic cache", pad_token_id=pad,
                    new_tokens=serving_settings.new_tokens)
            return runs[tuple(prompt)]

    return Alone()


@pytest.fixture(scope="session")
def serving_support():
    """(impl, model name) -> why the model cannot be served (None: it can), probed once per run."""
    return {}


@pytest.fixture
def served_model(model_factory, device, dtype, run_config, serving_support):
    """served_model(impl) -> the model variant to serve with `impl`, or a skip that says why."""

    def get(impl: str):
        base = serving.base_implementation(impl)
        if run_config.attn and base not in run_config.attn and impl not in run_config.attn:
            pytest.skip(f"{impl} not selected by --attn {','.join(run_config.attn)}")
        reason = serving.probe_implementation(impl, str(device), dtype_name(dtype))
        if reason:
            pytest.skip(f"does not run here: {reason}")
        model = model_factory(base)  # "eager" is the reference model itself
        if (impl, model_factory.spec.name) not in serving_support:
            serving_support[impl, model_factory.spec.name] = serving.model_support_reason(model, impl)
        reason = serving_support[impl, model_factory.spec.name]
        if reason:
            pytest.skip(reason)
        return model

    return get


@pytest.fixture(scope="session")
def served_together(serving_prompts, serving_settings, eos_ids):
    """together(model, impl) -> (results, cache observation) of one generate_batch call of every
    prompt, made once per model and implementation (the equivalence and memory tests share it)."""
    runs = {}

    def together(model, impl):
        if impl not in runs:
            with mem.observe_paged_cache(model) as seen:
                results = serving.generate_batch(model, impl, serving_prompts, serving_settings, eos_ids)
            runs[impl] = (results, seen)
        return runs[impl]

    return together


@pytest.fixture
def served_agrees(alone, reference_model, eos_ids, dtype_name, tolerances, tokenizer, record_result):
    """served_agrees(results, impl, how) asserts the rule for every request in `results`."""

    def check(results, impl, how):
        failures = []
        for name, served in results.items():
            result = served_agreement(alone[name], served, model=reference_model, eos_ids=eos_ids,
                                      label=f"request {name!r} served", dtype_name=dtype_name, tolerances=tolerances,
                                      decode=lambda t: tokenizer.decode([t]))
            record_result(f"served vs alone ({how})", **record_fields(result), request=name, attn=impl,
                          prompt_tokens=len(served.prompt))
            if not result.passed:
                failures.append(result.message)
        assert not failures, f"continuous batching ({impl}, {how}):\n" + "\n".join(failures)

    return check


@pytest.mark.parametrize("impl", serving.PAGED_IMPLEMENTATIONS)
def test_requests_served_together_equal_each_alone(impl, served_model, served_together, served_agrees):
    model = served_model(impl)
    results, _ = served_together(model, impl)
    served_agrees(results, impl, "all submitted together")


@pytest.mark.parametrize("impl", serving.PAGED_IMPLEMENTATIONS)
def test_other_order_and_late_arrivals_do_not_change_outputs(impl, served_model, serving_prompts, serving_settings,
                                                             eos_ids, served_agrees, record_result):
    """The requests in reverse order: the last one alone first, the others arriving once it has
    generated two tokens (their prefills are chunked in among its decode steps)."""
    model = served_model(impl)
    first, *later = list(reversed(serving_prompts))
    n = serving_settings.new_tokens
    with serving.ServingSession(model, impl, serving_settings, eos_ids) as session:
        session.add(first, serving_prompts[first])
        progress = session.wait_for_tokens(first, 2)
        for name in later:
            session.add(name, serving_prompts[name])
        results = session.collect([first, *later])
    record_result("served vs alone (other order, late arrivals)", "tokens of the first request when the others arrived",
                  progress, threshold=f"1..{n - 1}", passed=0 < progress < n, attn=impl)
    assert 0 < progress < n, (f"request {first!r} had {progress} of {n} tokens when the others arrived: "
                              "not mid-generation")
    served_agrees(results, impl, f"reverse order, the others arriving after {first!r}'s token {progress}")


@pytest.mark.parametrize("impl", serving.PAGED_IMPLEMENTATIONS)
def test_cancelled_request_does_not_change_the_others(impl, served_model, serving_prompts, serving_settings, eos_ids,
                                                      served_agrees, record_result):
    model = served_model(impl)
    names = list(serving_prompts)
    n = serving_settings.new_tokens
    with mem.observe_paged_cache(model) as seen, \
            serving.ServingSession(model, impl, serving_settings, eos_ids) as session:
        session.add("cancelled", serving_prompts["long"], max_new_tokens=4 * n)  # outlives the others unless cancelled
        for name in names:
            session.add(name, serving_prompts[name])
        progress = session.wait_for_tokens("cancelled", 2)
        session.cancel("cancelled")
        results = session.collect(names)
        cancelled = session.latest["cancelled"]
    record_result("served vs alone (a request cancelled)", "tokens of the cancelled request", len(cancelled.tokens),
                  threshold=f"< {4 * n}", passed=not cancelled.finished, attn=impl, cancelled_at=progress)
    assert not cancelled.finished, (f"the request to cancel finished ({len(cancelled.tokens)} tokens) before the "
                                    "cancel took effect")
    assert "cancelled" not in seen.last_step_requests, "the cancelled request still held blocks at the last step"
    served_agrees(results, impl, f"next to a request cancelled after its token {progress}")


@pytest.mark.parametrize("impl", serving.PAGED_IMPLEMENTATIONS)
def test_paged_cache_blocks_and_bytes_match_the_config(impl, served_model, served_together, serving_prompts,
                                                       serving_settings, record_result):
    model = served_model(impl)
    if len(set(caches.layer_types(model))) > 1:
        pytest.skip("hybrid attention: transformers pages each layer type separately (5.24 sizes sectors per group, "
                    "5.17 groups layers by their gcd), so one block is not every layer's slots")
    results, seen = served_together(model, impl)
    assert seen.steps > 0, "the model's forward pre-hook never saw a paged cache: nothing was measured"
    config, element, n = model.config, model.dtype.itemsize, serving_settings.new_tokens
    predicted = mem.predicted_storage_bytes(config, seen.num_blocks, seen.block_size, element)
    record_result("paged kv cache", "storage bytes", seen.storage_bytes, threshold=predicted,
                  passed=seen.storage_bytes == predicted, attn=impl, num_blocks=seen.num_blocks,
                  block_size=seen.block_size)
    assert (seen.num_blocks, seen.block_size) == (serving_settings.num_blocks, serving_settings.block_size), (
        f"the paged cache has {seen.num_blocks} blocks of {seen.block_size} tokens; configured "
        f"{serving_settings.num_blocks} of {serving_settings.block_size}")
    assert seen.storage_bytes == predicted, (
        f"the paged cache holds {seen.storage_bytes} bytes; the formula (layers x kv heads x head dim x "
        f"{seen.block_size} tokens x ({seen.num_blocks} + {mem.RESERVED_BLOCKS} reserved) blocks x {element} bytes) "
        f"gives {predicted}")
    wrong, needed = [], 0
    for name, served in results.items():
        held = len(served.prompt) + n - 1  # the last generated token is never fed back
        expected = [mem.predicted_blocks(held, seen.block_size, window) for window in seen.windows]
        needed += sum(expected)
        measured = seen.blocks_of(served.request_id)
        if measured != expected:
            wrong.append(f"request {name!r} ({held} tokens of KV) held {measured} blocks per attention group, "
                         f"predicted {expected}")
    block = mem.block_bytes(config, seen.block_size, element)
    paged = seen.peak_distinct_blocks * block
    static = mem.static_cache_bytes(config, caches.layer_types(model), [len(p) for p in serving_prompts.values()], n,
                                    element)
    record_result("paged kv cache", "peak bytes of the batch (paged)", paged, threshold=needed * block,
                  passed=not wrong and seen.peak_distinct_blocks <= needed, attn=impl,
                  static_cache_bytes=static, paged_over_static=round(paged / static, 4),
                  peak_blocks=seen.peak_distinct_blocks, predicted_blocks=needed)
    assert not wrong, "\n".join(wrong)
    assert seen.peak_distinct_blocks <= needed, (
        f"{seen.peak_distinct_blocks} blocks in use at the peak, more than the {needed} the requests need together")


@pytest.mark.gpu
@pytest.mark.exclusive
@pytest.mark.benchmark(group="serving", **SYNCED)
@pytest.mark.parametrize("concurrency", CONCURRENCY)
@pytest.mark.parametrize("impl", [pytest.param(impl, marks=[pytest.mark.slow] if impl in SPEED["full_profile_only"] else [])
                                  for impl in serving.PAGED_IMPLEMENTATIONS])
def test_serving_throughput_and_latency(benchmark, impl, concurrency, speed_spec, served_model, run_config, dtype_name,
                                        record_result):
    """Continuous batching (one running manager; a round is every request submitted at once, timed
    to the last result) against generate() on the same prompts left-padded into one batch. Random
    token prompts of 128-512 tokens, SPEED's new tokens each; the best of 3 rounds after a warm-up."""
    model = served_model(impl)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    eos = gen.eos_token_ids(model)
    prompts = speed.random_prompts(concurrency, SPEED["shortest"], SPEED["longest"], run_config.seed,
                                   vocab=min(1000, model.config.get_text_config(decoder=True).vocab_size))
    settings = speed.settings_for(prompts, SPEED["new_tokens"])
    rounds = []
    with serving.ServingSession(model, impl, settings, eos) as session:
        session.streaming = False
        benchmark.pedantic(lambda: rounds.append(speed.continuous_batching_round(session, prompts, f"r{len(rounds)}")),
                           rounds=SPEED["rounds"], warmup_rounds=1, iterations=1)
    generated = [speed.padded_generate_round(model, prompts, SPEED["new_tokens"], pad)
                 for _ in range(SPEED["rounds"] + 1)]
    fastest = lambda timed: min(timed[1:] or timed, key=lambda r: r.seconds)  # noqa: E731 (the first warms up)
    figures = {**fastest(rounds).figures("cb"), **fastest(generated).figures("generate")}
    figures["throughput_ratio_cb_over_generate"] = figures["cb_tokens_per_s"] / figures["generate_tokens_per_s"]
    benchmark.extra_info.update(model=speed_spec.name, kind="serving", attn=impl, dtype=dtype_name,
                                concurrency=concurrency, new_tokens=SPEED["new_tokens"],
                                prompt_lengths=[len(p) for p in prompts], **figures)
    where = f"attn={impl}, concurrency={concurrency}"
    for metric, value in figures.items():
        record_result("speed (serving)", metric, round(value, 6), where=where)

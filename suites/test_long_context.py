"""Long context: does the model find a fact anywhere in a long prompt, are positions beyond the
trained window computed as configured, do the equivalence rules still hold at thousands of
tokens, and does a long prompt fit a memory budget with fused attention where eager does not?

Needle in a haystack (harness.equivalence.niah): context lengths x needle depths, several unique needles
per cell, exact match of the number in the generated answer. CI runs a small grid; --run-slow
runs the full grid (5 depths, 4 needles, up to the model's window). Override the grid, the
acceptance threshold and the prompt format with the "niah" section of --thresholds FILE.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.inference import generation as gen
from harness.equivalence import niah, niah_views
from harness.equivalence import positions as pos
from harness.backends.capabilities import by_name, dtype_name

# Tokens generated (and compared) after a long prompt: a few on CPU, more in the full profile.
LONG_PROMPT_NEW_TOKENS = {"ci": 8, "full": 32}
CI_LONG_PROMPT = 2048
# The longest context the ci profile runs a model at on a CPU (NIAH, the long-prompt cache and
# attention checks): SmolLM2-135M prefills ~0.5 TFLOP at 2048 tokens, ~8 s a NIAH cell on the
# 2-core CI machine (6 cells: 50 s of a CI run). 1024 tokens still split the keys into blocks in
# torch's CPU flash kernel (512 keys a block); the GPU gate and --run-slow run the longer lengths.
CPU_CI_CONTEXT = 1024


def _profile(config) -> str:
    return "full" if config.getoption("--run-slow") else "ci"


def _niah_config(config, device_type: str | None = None) -> niah.NiahConfig:
    """The grid of the profile (a --thresholds "niah" section overrides it); on a CPU the ci grid
    stops at CPU_CI_CONTEXT unless that section names its own lengths."""
    base = niah.FULL_GRID if _profile(config) == "full" else niah.CI_GRID
    if _profile(config) == "ci" and device_type == "cpu":
        base = base.capped(CPU_CI_CONTEXT)
    return niah.load_config(config.getoption("--thresholds"), base)


def pytest_generate_tests(metafunc):
    if "niah_length" in metafunc.fixturenames:
        from harness.errors import HarnessUsageError

        try:
            lengths = _niah_config(metafunc.config).lengths
        except HarnessUsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("niah_length", lengths, ids=[f"ctx{n}" for n in lengths])


def _window(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


@pytest.fixture(scope="session")
def niah_config(request, device) -> niah.NiahConfig:
    return _niah_config(request.config, device.type)


@pytest.fixture(scope="session")
def long_context_attn(run_config, capabilities) -> str:
    """The implementation a long-context user runs: the first --attn, else flash-attention 2 where
    it is installed, else SDPA."""
    if run_config.attn:
        return run_config.attn[0]
    caps = by_name(capabilities)
    return "flash_attention_2" if caps.get("flash_attention_2") and caps["flash_attention_2"].available else "sdpa"


@pytest.fixture(scope="session")
def long_context_model(model_spec, model_factory, long_context_attn):
    model = model_factory(long_context_attn)
    if long_context_attn.startswith("flash") and getattr(model.config, "alibi", False):
        pytest.skip(f"{model_spec.name}: transformers' flash-attention path does not support ALiBi")
    return model


@pytest.fixture(scope="session")
def builder(tokenizer, niah_config):
    return niah.HaystackBuilder(tokenizer, niah_config.prompt)


# Cell scores outlive the session fixtures: pytest tears those down when it moves to the next
# --model and may come back for the heatmap test, which must not rerun the grid.
_SCORES: dict[tuple, list] = {}


@pytest.fixture(scope="session")
def niah_scores(trained_quality, long_context_model, long_context_attn, tokenizer, builder, niah_config,
                computed_once_per_run):
    """Cell scores per context length, computed once per run: scores(length) -> list[CellScore]."""
    needles = niah.make_needles(niah_config.needles, niah_config.seed)

    def scores(length: int) -> list:
        key = (trained_quality.name, long_context_attn, str(long_context_model.dtype), length, repr(niah_config))
        if key not in _SCORES:
            _SCORES[key] = computed_once_per_run(
                f"niah scores {key}",
                lambda: [niah.run_cell(long_context_model, tokenizer, builder, length, depth, needle,
                                       niah_config.answer_tokens)[0]
                         for depth in niah_config.depths for needle in needles])
        return _SCORES[key]

    return scores


def _skip_beyond_window(model, length: int, model_name: str) -> None:
    window = _window(model)
    if window and length > window:
        pytest.skip(f"{model_name}: context length {length} is beyond its {window}-token window")


# ---------------------------------------------------------------------------------------------
# Needle in a haystack


def test_niah_prompts_hold_one_needle_and_the_scorer_reads_only_the_answer(trained, tokenizer, builder, niah_config,
                                                                           niah_length, long_context_model):
    _skip_beyond_window(long_context_model, niah_length, trained.name)
    problems = []
    for needle in niah.make_needles(niah_config.needles, niah_config.seed):
        for depth in niah_config.depths:
            prompt = builder.build(niah_length, depth, needle, niah_config.answer_tokens)
            where = f"length {niah_length}, depth {depth:g} %, needle {needle.key!r}"
            problems += [f"{where}: {p}" for p in niah.prompt_problems(prompt, niah_config.prompt, niah_length,
                                                                      niah_config.answer_tokens)]
            problems += [f"{where}: {p}" for p in niah.scorer_controls(tokenizer, prompt, niah_config.answer_tokens,
                                                                      niah_length)]
    assert not problems, "NIAH prompt or scorer unsound:\n" + "\n".join(problems)


def test_niah_needle_depths_spread_across_the_haystack(trained, builder, niah_config):
    """The depth parameter really moves the needle: 0 % first, 100 % last, in order between."""
    needle = niah.make_needles(1, niah_config.seed)[0]
    length = min(niah_config.lengths)
    places = [builder.build(length, d, needle, niah_config.answer_tokens).needle_sentence_index
              for d in sorted(niah_config.depths)]
    last = builder.build(length, 100.0, needle, niah_config.answer_tokens).haystack_sentences
    assert places == sorted(places), f"needle positions not monotonic in depth: {places}"
    if 0.0 in niah_config.depths:
        assert places[0] == 0
    if 100.0 in niah_config.depths:
        assert places[-1] == last


def test_niah_retrieval_accuracy_at_context_length(trained, niah_scores, niah_config, niah_length, long_context_model,
                                                   long_context_attn, record_result):
    if niah_length not in niah_config.lengths:
        pytest.skip(f"ci profile on CPU: NIAH lengths up to {CPU_CI_CONTEXT} tokens (a GPU or --run-slow runs {niah_length})")
    _skip_beyond_window(long_context_model, niah_length, trained.name)
    scores = niah_scores(niah_length)
    for depth in niah_config.depths:
        cell = [s for s in scores if s.depth == depth]
        record_result("niah cell", "retrieval accuracy", niah.accuracy(cell),
                      where=f"{niah_length} tokens, depth {depth:g} %", attn=long_context_attn,
                      answers=[f"{s.key}: expected {s.expected}, answered {s.answer!r}" for s in cell])
    acc = niah.accuracy(scores)
    judged = niah_config.required_context is None or niah_length <= niah_config.required_context
    passed = acc >= niah_config.min_accuracy
    record_result("niah", "retrieval accuracy", acc, threshold=niah_config.min_accuracy if judged else "reported only",
                  passed=passed if judged else None, where=f"{niah_length} tokens ({len(scores)} cells x needles)",
                  attn=long_context_attn, required_context=niah_config.required_context)
    if not judged:
        return  # beyond the context the run requires: measured and reported (effective context), not judged
    missed = [f"depth {s.depth:g} % ({s.prompt_tokens} prompt tokens), {s.key}: expected {s.expected}, "
              f"answered {s.answer!r}" for s in scores if not s.correct]
    assert passed, (f"needle retrieval at {niah_length} tokens ({long_context_attn}): {acc:.0%} < "
                    f"{niah_config.min_accuracy:.1%}; missed:\n" + "\n".join(missed))


def _artifact_dir(run_dir, tmp_path_factory) -> Path:
    """The run's report directory, else a temporary one."""
    return run_dir if run_dir is not None else tmp_path_factory.mktemp("long_context")


def test_niah_heatmap_and_table_cover_the_grid(trained, niah_scores, niah_config, long_context_model, long_context_attn,
                                               run_dir, tmp_path_factory, record_result):
    window = _window(long_context_model)
    lengths = [n for n in niah_config.lengths if not window or n <= window]
    scores = [s for n in lengths for s in niah_scores(n)]
    out = _artifact_dir(run_dir, tmp_path_factory)
    stem = f"niah-{trained.name.replace(':', '-').replace('/', '-')}"
    png = niah_views.render_heatmap(scores, lengths, niah_config.depths, out / f"{stem}.png",
                                    f"{trained.name}, {long_context_attn}: needle retrieval ({niah_config.needles} needles/cell)")
    table = niah_views.markdown_table(scores, lengths, niah_config.depths)
    (out / f"{stem}.md").write_text(table)
    per_length = {n: niah.accuracy(s for s in scores if s.length == n) for n in lengths}
    effective = niah.effective_context(scores, lengths, niah_config.min_accuracy)
    record_result("niah heatmap", "cells", len(scores), where=str(png), table=table,
                  accuracy_per_length={str(n): round(a, 4) for n, a in per_length.items()})
    record_result("niah", "effective context (tokens)", effective if effective is not None else 0,
                  threshold=f">= {niah_config.min_accuracy:.1%} at every length up to it", where=f"window {window}",
                  required_context=niah_config.required_context)
    assert png.stat().st_size > 0
    assert len(scores) == len(lengths) * len(niah_config.depths) * niah_config.needles
    assert table.count("\n") == len(niah_config.depths) + 3


# ---------------------------------------------------------------------------------------------
# Positions beyond the trained window, against harness.equivalence.positions' independent maths


def test_rope_cos_sin_match_reference_beyond_trained_window(model_spec, long_context_model, tolerances, record_result):
    import torch

    spec = pos.rope_spec_from_config(long_context_model.config)
    rotary = pos.find_rotary_module(long_context_model)
    if spec is None or rotary is None:
        kind = "ALiBi biases" if getattr(long_context_model.config, "alibi", False) else "learned absolute positions"
        pytest.skip(f"{model_spec.name} has no rotary embeddings ({kind})")
    positions = torch.arange(2 * spec.max_position_embeddings)[None]
    ref_cos, ref_sin, angles = pos.rope_cos_sin(spec, positions)
    cos, sin = pos.model_rope_cos_sin(rotary, positions)
    units, worst, at, dim = pos.rope_error_units(cos, sin, ref_cos, ref_sin, angles)
    passed = units <= tolerances.rope_error_units
    record_result("rope vs reference", "error / (fp32 eps x (|angle|+1))", units, threshold=tolerances.rope_error_units,
                  passed=passed, where=f"position {at}, dim {dim}", rope_type=spec.rope_type, max_abs_error=worst)
    assert passed, (f"{model_spec.name} ({spec.rope_type} RoPE, theta {spec.theta:g}): cos/sin off the reference by "
                    f"{worst:.3g} at position {at} (trained window {spec.max_position_embeddings}), dim {dim}: "
                    f"{units:.1f} units > {tolerances.rope_error_units:g}")


TRAINED_WINDOW = 2048
ROPE_SCALINGS = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32.0, "beta_slow": 1.0},
}


def _scaled_llama_rotary(rope_type: str):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from harness.models.presets import get_preset

    config = get_preset("tiny:llama").make_config()
    config.max_position_embeddings = TRAINED_WINDOW
    config.rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_SCALINGS[rope_type]}
    if hasattr(config, "rope_scaling") and not isinstance(type(config).__dict__.get("rope_scaling"), property):
        config.rope_scaling = dict(config.rope_parameters)  # layouts that still read rope_scaling
    return LlamaRotaryEmbedding(config=config), config


@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_rope_scaling_is_honoured_beyond_trained_window(rope_type, tolerances, record_result):
    import torch

    rotary, config = _scaled_llama_rotary(rope_type)
    spec = pos.rope_spec_from_config(config)
    assert spec.rope_type == rope_type
    positions = torch.arange(4 * TRAINED_WINDOW)[None]
    ref_cos, ref_sin, angles = pos.rope_cos_sin(spec, positions)
    cos, sin = pos.model_rope_cos_sin(rotary, positions)
    units, worst, at, dim = pos.rope_error_units(cos, sin, ref_cos, ref_sin, angles)
    unscaled = pos.RopeSpec(spec.head_dim, spec.theta, "default", {}, spec.max_position_embeddings)
    plain_cos, plain_sin, plain_angles = pos.rope_cos_sin(unscaled, positions)
    scaling_effect = pos.rope_error_units(cos, sin, plain_cos, plain_sin, plain_angles)[1]
    record_result("rope scaling vs reference", "error / (fp32 eps x (|angle|+1))", units,
                  threshold=tolerances.rope_error_units, passed=units <= tolerances.rope_error_units,
                  where=f"{rope_type}, position {at}, dim {dim}", max_abs_error=worst, change_vs_unscaled=scaling_effect)
    assert scaling_effect > 1e-2, f"{rope_type}: the model's cos/sin equal unscaled RoPE, the scaling was ignored"
    assert units <= tolerances.rope_error_units, (
        f"{rope_type} RoPE ({ROPE_SCALINGS[rope_type]}): cos/sin off the reference by {worst:.3g} at position {at} "
        f"(trained window {TRAINED_WINDOW}), dim {dim}: {units:.1f} units > {tolerances.rope_error_units:g}")


def test_dynamic_rope_returns_to_trained_frequencies_within_the_window(tolerances):
    import torch

    rotary, config = _scaled_llama_rotary("dynamic")
    spec = pos.rope_spec_from_config(config)
    pos.model_rope_cos_sin(rotary, torch.arange(4 * TRAINED_WINDOW)[None])  # grow beyond the window first
    short = torch.arange(TRAINED_WINDOW // 2)[None]
    cos, sin = pos.model_rope_cos_sin(rotary, short)
    ref_cos, ref_sin, angles = pos.rope_cos_sin(spec, short)
    units, worst, at, _ = pos.rope_error_units(cos, sin, ref_cos, ref_sin, angles)
    assert units <= tolerances.rope_error_units, (
        f"dynamic RoPE after a {4 * TRAINED_WINDOW}-token pass keeps its grown base for a {short.shape[1]}-token "
        f"one: off by {worst:.3g} at position {at}")


def test_alibi_bias_extends_with_length(model_spec, model_factory, tolerances, record_result):
    import torch

    model = model_factory("sdpa")
    cfg = model.config
    if not getattr(cfg, "alibi", False):
        pytest.skip(f"{model_spec.name} does not use ALiBi")
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    slopes = pos.alibi_slopes(heads)
    window = _window(model) or 2048
    for length in (64, window + 256):
        ids = torch.randint(3, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        masks = pos.captured_attention_masks(model, ids)
        assert masks and masks[0] is not None and masks[0].shape[-1] == length, (
            f"no {length}-wide attention bias reached the attention layers")
        # Falcon divides the bias by sqrt(head_dim) along with the scores; undo that before comparing
        observed = pos.relative_bias(masks[0], scale=math.sqrt(head_dim))
        reference = pos.alibi_bias(heads, length)
        causal = torch.isfinite(reference)
        query = torch.arange(length, dtype=torch.float64)[:, None].expand(length, length)
        allowed = tolerances.alibi_rounding_rel * slopes[:, None, None] * query + 1e-6
        excess = ((observed - reference).abs() - allowed).masked_fill(~causal, float("-inf"))
        worst = (observed - reference).abs().masked_fill(~causal, 0).max().item()
        h, rest = divmod(int(excess.argmax()), length * length)
        i, j = divmod(rest, length)
        # decided per position (each has its own allowance): show the largest error / allowance
        over = ((observed - reference).abs() / allowed).masked_fill(~causal, 0).max().item()
        record_result("alibi vs reference",
                      f"max bias error / ({tolerances.alibi_rounding_rel:g} x slope x query + 1e-6)", over,
                      threshold=1.0, passed=bool(excess.max() <= 0), where=f"{length} tokens (window {window})",
                      max_abs_error=worst)
        assert excess.max() <= 0, (f"ALiBi bias at {length} tokens off the reference slopes {slopes.tolist()}: "
                                   f"head {h}, query {i}, key {j}: {observed[h, i, j]:.4g} vs {reference[h, i, j]:.4g}")
        future = masks[0][0].double().cpu().masked_fill(causal, float("-inf"))
        assert future.max() < -1e4, f"ALiBi mask at {length} tokens lets a query see a later key"


# ---------------------------------------------------------------------------------------------
# Equivalence rules at long prompts


def _long_prompt(model, tokenizer, run_config, new_tokens: int, profile: str) -> dict:
    import torch

    window = _window(model) or CI_LONG_PROMPT
    ci_length = CPU_CI_CONTEXT if model.device.type == "cpu" else CI_LONG_PROMPT
    length = window if profile == "full" else min(ci_length, window)
    builder = niah.HaystackBuilder(tokenizer)
    needle = niah.make_needles(1, run_config.seed)[0]
    prompt = builder.build(length, 50.0, needle, new_tokens)
    ids = torch.tensor([prompt.input_ids], device=model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _no_cache_over_sequence(model, run: gen.GreedyRun, eos_token_ids: list[int]) -> gen.GreedyRun:
    """The no-cache reference for a cached greedy run, in one forward: causal attention makes the
    logits at position t of (prompt + generated tokens) exactly what a cache-free step t computes.
    The step scores mask every EOS id as min_new_tokens did during generation."""
    import torch

    steps = len(run.tokens)
    with torch.inference_mode():
        logits = model(input_ids=run.sequence[None].to(model.device), use_cache=False).logits[0]
    logits = logits[run.prompt_length - 1: run.prompt_length - 1 + steps].float().cpu()
    scores = logits.clone()
    scores[:, eos_token_ids] = float("-inf")
    return gen.GreedyRun(label="no cache", prompt_length=run.prompt_length, tokens=tuple(scores.argmax(-1).tolist()),
                         scores=scores, logits=logits)


def test_cache_matches_no_cache_on_long_prompt(model_spec, long_context_model, long_context_attn, tokenizer, dtype,
                                               tolerances, run_config, request, record_result):
    from harness.equivalence.token_agreement import compare_runs, record_fields

    profile = _profile(request.config)
    n = LONG_PROMPT_NEW_TOKENS[profile]
    inputs = _long_prompt(long_context_model, tokenizer, run_config, n, profile)
    cached = gen.greedy(long_context_model, inputs, label="dynamic cache", pad_token_id=gen.pad_id(tokenizer),
                        new_tokens=n, use_cache=True)
    reference = _no_cache_over_sequence(long_context_model, cached, gen.eos_token_ids(long_context_model, tokenizer))
    result = compare_runs(reference, cached, dtype_name=dtype_name(dtype), tolerances=tolerances,
                          decode=lambda t: tokenizer.decode([t]))
    record_result("long prompt: cache vs no cache", prompt_tokens=int(inputs["input_ids"].shape[1]),
                  attn=long_context_attn, **record_fields(result))
    assert result.passed, f"{inputs['input_ids'].shape[1]}-token prompt, {long_context_attn}: {result.message}"


LONG_ATTENTION_PROMPT = {"cpu": CPU_CI_CONTEXT, "cuda": None}  # None: the model's whole window (or the longest that fits)


def test_long_prompt_attention_matches_eager(model_spec, model_factory, long_context_attn, device, dtype, tolerances,
                                             run_config, record_result):
    """The attention suite's rule (harness.equivalence.attention_model.compare_model_outputs) at thousands of tokens,
    where fused kernels split the keys into many blocks: every layer and the logits of the
    long-context implementation against eager, both measured against the upcast reference.
    On a GPU the prompt is the model's window, or the longest (at least the CPU length) for which
    harness.models.reference_sizing predicts that the reference and the comparison fit beside the variants."""
    import torch

    from harness.equivalence.attention_model import compare_model_outputs, known_disagreement, model_forward
    from harness.equivalence.compare import error_over_allowed
    from harness.models.reference_build import reference_outputs
    from harness.models.reference_sizing import plan_model_reference

    if long_context_attn == "eager":
        pytest.skip("--attn eager: the long-context implementation is the baseline itself")
    eager, fused = model_factory("eager"), model_factory(long_context_attn)  # held before sizing the rest
    window = _window(eager) or CI_LONG_PROMPT
    reference_dtype = torch.float64 if device.type == "cpu" else torch.float32
    plan = plan_model_reference(eager, device, dtype, reference_dtype,
                                requested=min(window, LONG_ATTENTION_PROMPT[device.type] or window),
                                minimum=min(window, LONG_ATTENTION_PROMPT["cpu"]),
                                budget_bytes=run_config.memory_budget_bytes)
    if plan.skip:
        pytest.skip(f"{model_spec.name}: {plan.skip}")
    length = plan.length
    gen_ = torch.Generator().manual_seed(run_config.seed)
    ids = torch.randint(3, eager.config.vocab_size, (1, length), generator=gen_).to(device)
    mask = torch.ones_like(ids)
    base = model_forward(eager, ids, mask, use_cache=False)
    ref = reference_outputs(eager, ids, mask, plan, reference_dtype)
    out = model_forward(fused, ids, mask, use_cache=False)
    layers, logits = compare_model_outputs(out, base, ref, mask, tolerances=tolerances,
                                           name=f"{long_context_attn} vs eager, {length}-token prompt")
    record_result("long prompt: attention vs eager", "max error / allowed error",
                  error_over_allowed(layers, logits), threshold=1.0,
                  passed=layers.passed and logits.passed,
                  where=f"{long_context_attn}/{length} tokens/{dtype_name(dtype)}"
                        + (f"; {plan.note}" if plan.note else ""),
                  rule=f"error <= {tolerances.model_error_factor:g} x eager error + slack",
                  ratio_vs_eager=round(max(layers.ratio, logits.ratio), 3), tightest_layer=layers.layer,
                  **plan.details())
    said = f" ({plan.note})" if plan.note else ""
    known = known_disagreement(eager.config)
    if not (layers.passed and logits.passed) and known:
        pytest.xfail(f"{known}: {layers.message}{said}")
    assert layers.passed, layers.message + said
    assert logits.passed, logits.message + said


# ---------------------------------------------------------------------------------------------
# Memory: a long prompt under a budget


@pytest.mark.gpu
@pytest.mark.exclusive
@pytest.mark.memory_budget(None)
def test_long_prompt_fits_budget_with_fused_attention_but_not_with_eager(model_spec, model_factory, long_context_attn,
                                                                         tokenizer, device, dtype, run_config,
                                                                         record_result):
    import torch

    from harness.config import format_bytes
    from harness.performance.memory import measure_peak, release_device_memory
    from harness.performance.predictions import attention_shape, predict_eager_attention_peak_bytes

    peaks = {}
    for impl in (long_context_attn, "eager"):
        model = model_factory(impl)
        assert model.config._attn_implementation == impl, (
            f"asked for {impl} attention, the loader gave {model.config._attn_implementation}: the comparison would be vacuous")
        inputs = _long_prompt(model, tokenizer, run_config, 1, "full")
        release_device_memory(device)
        with measure_peak(device) as peak:
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)
        peaks[impl] = peak.increase_bytes
    length = int(inputs["input_ids"].shape[1])
    predicted_eager_extra = predict_eager_attention_peak_bytes(attention_shape(model.config), 1, length, dtype)
    # The budget sits half the predicted eager score matrices above the fused peak: fused attention
    # must fit it, eager (which materialises those matrices) must not. (Not --memory-budget: the
    # plugin applies that to the whole test call, which includes the eager run meant to exceed it.)
    budget = int(peaks[long_context_attn] + predicted_eager_extra / 2)
    fused, eager = peaks[long_context_attn], peaks["eager"]
    record_result("long prompt memory", f"{long_context_attn} prefill peak increase", fused, threshold=budget,
                  passed=fused <= budget, where=f"{length} tokens")
    record_result("long prompt memory", "eager prefill peak increase", eager, threshold=f"> {budget}",
                  passed=eager > budget, where=f"{length} tokens", predicted_eager_extra=predicted_eager_extra)
    numbers = (f"{length}-token prefill: {long_context_attn} {format_bytes(fused)}, eager {format_bytes(eager)}, "
               f"budget {format_bytes(budget)} (predicted eager score matrices {format_bytes(predicted_eager_extra)})")
    assert fused <= budget, f"{long_context_attn} does not fit the budget: {numbers}"
    assert eager > budget, f"eager fits the budget it should exceed: {numbers}"

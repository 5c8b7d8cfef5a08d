"""Switching the attention implementation gives the same model.

For the model under test, every attention implementation the machine offers runs the same inputs
as eager attention in the run's dtype and as a high-precision eager reference (float64 on CPU,
float32 on GPU). Every layer's hidden states and the logits must obey the k x eager rule of
harness.compare (factor ``model_error_factor``): the implementation may be at most k times as
far from the reference as eager attention is. Padding positions are excluded. A failure names
the first diverging layer, the error, the tolerance and the (batch, token) position.

Inputs: one sequence; a left-padded and a right-padded batch; for sliding-window models a length
past the window; and cached decoding (q_len = 1 against a KV cache) of a left-padded batch.
Token ids are drawn from ``--seed``, so repeated runs with different seeds probe different inputs.
"""

import pytest
import torch

from harness.attention import MODEL_ATTENTION, model_attention
from harness.compare import compare_tensors, first_diverging_layer

BACKENDS = [name for name in MODEL_ATTENTION if name != "eager"]
SCENARIOS = ["single", "left_padded", "right_padded", "past_sliding_window"]


def _reference_dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def _lengths(model_spec, model, scenario, seed) -> list[int]:
    """Sequence lengths per batch row; short for the 30-layer default model on CPU (CI budget)."""
    gen = torch.Generator().manual_seed(seed)
    window = getattr(model.config, "sliding_window", None)
    if scenario == "past_sliding_window":
        if not window:
            pytest.skip(f"{model_spec.name} has no sliding window")
        return [2 * window + 3 + int(torch.randint(0, window, (1,), generator=gen)), window + 1]
    longest = 24 + int(torch.randint(0, 16, (1,), generator=gen))
    if scenario == "single":
        return [longest]
    return [longest, longest - 9, longest - 17]


def _inputs(model, lengths, side, seed, device):
    """Random token ids (not the pad id) padded on ``side``; returns input_ids, attention_mask."""
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, vocab, (n,), generator=gen)
        tokens[tokens == pad] = 3
        span = slice(longest - n, longest) if side == "left" else slice(0, n)
        ids[row, span], mask[row, span] = tokens, 1
    return ids.to(device), mask.to(device)


def _forward(model, ids, mask, context=None):
    import contextlib

    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    with torch.no_grad(), (context or contextlib.nullcontext)():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    return out


@pytest.fixture(scope="session")
def reference_outputs():
    """(model name, scenario, seed, attn, dtype) -> outputs, so eager and the reference run once."""
    return {}


def _selected(name, require, run_config):
    if run_config.attn and name not in run_config.attn:
        pytest.skip(f"{name} not selected by --attn {','.join(run_config.attn)}")
    require(name)
    return model_attention(name)


def _cached(cache, key, fn):
    if key not in cache:
        cache[key] = fn()
    return cache[key]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_states_and_logits_match_eager(backend, scenario, model_spec, model_factory, device, dtype, tolerances,
                                              run_config, require, record_result, reference_outputs):
    attn_implementation, context = _selected(backend, require, run_config)
    seed = run_config.seed
    eager = model_factory("eager")
    lengths = _lengths(model_spec, eager, scenario, seed)
    ids, mask = _inputs(eager, lengths, "right" if scenario == "right_padded" else "left", seed, device)
    key = (model_spec.name, scenario, seed)
    base = _cached(reference_outputs, key + ("eager",), lambda: _forward(eager, ids, mask))
    ref = _cached(reference_outputs, key + ("reference",),
                  lambda: _forward(model_factory("eager", dtype=_reference_dtype(device)), ids, mask))
    model = model_factory(attn_implementation)
    assert model.config._attn_implementation == attn_implementation, (
        f"asked for {attn_implementation}, model runs {model.config._attn_implementation}: the comparison would be vacuous")
    out = _forward(model, ids, mask, context)

    factor, slack = tolerances.model_error_factor, tolerances.attention_abs_slack
    layers = first_diverging_layer(out.hidden_states, base.hidden_states, ref.hidden_states, mask, factor, slack,
                                   name=f"{backend} vs eager, {scenario} {lengths}")
    logits = compare_tensors(out.logits, base.logits, ref.logits, factor=factor, slack_floor=slack, mask=mask,
                             what=f"{backend} logits, {scenario} {lengths}", position_names=("batch", "token", "vocab"))
    record_result("attention_model", "error_ratio_vs_eager", round(logits.ratio, 3), threshold=factor,
                  passed=layers.passed and logits.passed, where=f"{backend}/{scenario}/{str(dtype).removeprefix('torch.')}",
                  logits_error=logits.error, eager_logits_error=logits.baseline_error,
                  tightest_layer=layers.layer, layer_ratio=round(layers.ratio, 3))
    assert layers.passed, layers.message
    assert logits.passed, logits.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decode_last_token_logits_match_eager(backend, model_spec, model_factory, device, dtype, tolerances,
                                                     run_config, require, record_result, reference_outputs):
    """Prefill all but the last token of a left-padded batch, then decode it (q_len=1 against the cache)."""
    attn_implementation, context = _selected(backend, require, run_config)
    seed = run_config.seed
    eager = model_factory("eager")
    lengths = _lengths(model_spec, eager, "left_padded", seed + 7)
    ids, mask = _inputs(eager, lengths, "left", seed + 7, device)

    def decode(model, ctx=None):
        import contextlib

        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), (ctx or contextlib.nullcontext)():
            prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                            use_cache=True)
            step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=position_ids[:, -1:],
                         past_key_values=prefill.past_key_values, use_cache=True)
        return step.logits[:, -1]

    key = (model_spec.name, "decode", seed)
    base = _cached(reference_outputs, key + ("eager",), lambda: decode(eager))
    ref = _cached(reference_outputs, key + ("reference",),
                  lambda: decode(model_factory("eager", dtype=_reference_dtype(device))))
    out = decode(model_factory(attn_implementation), context)
    verdict = compare_tensors(out, base, ref, factor=tolerances.model_error_factor,
                              slack_floor=tolerances.attention_abs_slack,
                              what=f"{backend} cached-decode last-token logits {lengths}", position_names=("batch", "vocab"))
    record_result("attention_decode", "error_ratio_vs_eager", round(verdict.ratio, 3),
                  threshold=tolerances.model_error_factor, passed=verdict.passed,
                  where=f"{backend}/decode/{str(dtype).removeprefix('torch.')}", error=verdict.error,
                  eager_error=verdict.baseline_error)
    assert verdict.passed, verdict.message

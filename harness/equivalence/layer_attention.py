"""Each layer's attention call, made the way the model makes it, on the same inputs for every backend.

Why: the end-to-end rule (harness.equivalence.attention_model.compare_model_outputs) measures hidden states after the
whole network. In bf16 the network's own rounding (every matmul, norm and MLP) dominates eager's
distance to the reference, so a systematic attention error of a few percent hides in it (H200:
a softmax scale 3 % too large passed every model-level test in bf16). Here only the attention
call differs:

1. the eager run of the model is recorded: for every attention module and call (prefill, then
   each decode step), the query/key/value the module hands to its attention function (after
   RoPE, with the KV cache already concatenated), its keyword arguments (scaling, sliding
   window, ...) and eager's output;
2. the backend's model runs the same token ids; transformers looks up *its* attention function
   in ``ALL_ATTENTION_FUNCTIONS`` and builds *its* mask, as in production, and a wrapper around
   that function swaps in the recorded query/key/value of the same module and call before
   calling it, so the backend's integration layer (mask format, GQA, scaling, window, padding)
   runs on exactly eager's inputs;
3. the truth is eager attention in float64 on the same inputs (harness.backends.kernels's reference
   kernel, with eager's mask).

Each layer's output is then judged by harness.equivalence.compare with two statistics: the max error (the
flash-attn rule, ``attention_error_factor``) and the RMS error (``attention_rms_factor``), which
a bias spread over every position raises even where the max of bf16 rounding hides it.
Padding query rows are excluded (their output is undefined).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch

from harness.equivalence.attention_model import _reference_attention_forward, padded_position_ids


class DispatchNotRecorded(RuntimeError):
    """The model computes attention without transformers' attention interface (e.g. Falcon)."""


@dataclass
class AttentionCall:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict
    output: torch.Tensor | None = None  # (batch, q_len, heads, head_dim), transformers' layout


@dataclass
class LayerCalls:
    """Recorded calls in model order: calls[i] is the i-th attention call of the run."""

    calls: list[AttentionCall] = field(default_factory=list)
    modules: list[torch.nn.Module] = field(default_factory=list)
    layer_index: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)  # 0 = prefill, 1.. = decode steps


def _layer_of(module, order: dict) -> int:
    index = getattr(module, "layer_idx", None)
    return int(index) if index is not None else order.setdefault(id(module), len(order))


@contextlib.contextmanager
def _patched(mapping: dict, name: str, value):
    """Replace ``mapping[name]`` (a module's ``vars()`` or transformers' registry) for the block."""
    old = mapping[name]
    mapping[name] = value
    try:
        yield old
    finally:
        mapping[name] = old


def _eager_namespace(model):
    """The modeling module whose ``eager_attention_forward`` the model's attention layers call."""
    names = {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    found = [sys.modules[n] for n in names if hasattr(sys.modules.get(n), "eager_attention_forward")]
    if len(found) != 1:
        raise DispatchNotRecorded(f"{type(model).__name__} does not call transformers' attention interface "
                                  "(no eager_attention_forward in its modeling file), so per-layer calls cannot be recorded")
    return found[0]


def _run(model, ids, mask, decode_steps: int, context=None):
    """A prefill of all but the last ``decode_steps`` tokens, then one cached decode step per token."""
    positions = padded_position_ids(mask)
    split = ids.shape[1] - decode_steps
    with torch.no_grad(), (context or contextlib.nullcontext)():
        out = model(input_ids=ids[:, :split], attention_mask=mask[:, :split], position_ids=positions[:, :split],
                    use_cache=decode_steps > 0)
        for t in range(split, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                        past_key_values=out.past_key_values, use_cache=True)


def record_eager_calls(eager_model, ids, mask, decode_steps: int = 0) -> LayerCalls:
    """Run the eager model and record every attention call's inputs and output."""
    namespace = _eager_namespace(eager_model)
    recorded, order, steps = LayerCalls(), {}, {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, **kwargs)
        layer = _layer_of(module, order)
        recorded.calls.append(AttentionCall(query, key, value, attention_mask, dict(kwargs), output))
        recorded.modules.append(module)
        recorded.layer_index.append(layer)
        recorded.step.append(steps.get(layer, 0))
        steps[layer] = steps.get(layer, 0) + 1
        return output, weights

    with _patched(vars(namespace), "eager_attention_forward", recording) as original:
        _run(eager_model, ids, mask, decode_steps)
    if not recorded.calls:
        raise DispatchNotRecorded(f"{type(eager_model).__name__} made no call to eager_attention_forward")
    return recorded


def replay_through_dispatch(model, attn_implementation: str, eager_calls: LayerCalls, ids, mask, *,
                            decode_steps: int = 0, context=None) -> list[torch.Tensor]:
    """Run ``model`` (loaded with ``attn_implementation``); its attention function, as registered
    in transformers at this moment (a planted fault included), receives eager's recorded
    query/key/value for the same call. Returns the outputs in call order."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    if attn_implementation not in mapping:
        raise DispatchNotRecorded(f"{attn_implementation!r} is not in transformers' attention interface")
    outputs: list[torch.Tensor] = []

    def replaying(module, query, key, value, attention_mask, **kwargs):
        index = len(outputs)
        if index >= len(eager_calls.calls):
            raise DispatchNotRecorded(f"{attn_implementation} made more attention calls than eager ({index + 1})")
        call = eager_calls.calls[index]
        if (call.query.shape, call.key.shape) != (query.shape, key.shape):
            raise DispatchNotRecorded(f"{attn_implementation} call {index} has query/key shapes {tuple(query.shape)}/"
                                      f"{tuple(key.shape)}, eager's were {tuple(call.query.shape)}/{tuple(call.key.shape)}")
        output, weights = original(module, call.query, call.key, call.value, attention_mask, **kwargs)
        outputs.append(output)
        return output, weights

    with _patched(mapping, attn_implementation, replaying) as original:
        _run(model, ids, mask, decode_steps, context)
    if len(outputs) != len(eager_calls.calls):
        raise DispatchNotRecorded(f"{attn_implementation} made {len(outputs)} attention calls, eager {len(eager_calls.calls)}")
    return outputs


def reference_outputs(eager_calls: LayerCalls, dtype=torch.float64) -> list[torch.Tensor]:
    """Eager attention in ``dtype`` on every recorded call's inputs (eager's mask, scaling, window)."""
    refs = []
    for module, call in zip(eager_calls.modules, eager_calls.calls):
        mask = None if call.mask is None else call.mask.to(dtype) if call.mask.dtype != torch.bool else call.mask
        kwargs = {k: v for k, v in call.kwargs.items() if k in ("scaling", "sliding_window", "dropout")}
        out, _ = _reference_attention_forward(module, call.query.to(dtype), call.key.to(dtype), call.value.to(dtype),
                                              mask, **kwargs)
        refs.append(out)
    return refs


@dataclass(frozen=True)
class LayerAttentionVerdict:
    """The first call that breaks a rule (``deciding``), or when all pass the tightest call per
    statistic. ``deciding[statistic]`` is a harness.equivalence.compare.Verdict: error / allowed <= 1 passes."""

    passed: bool
    message: str
    deciding: dict  # "max"/"rms" -> Verdict (the failing one, else the tightest)


def compare_layer_calls(outputs, eager_calls: LayerCalls, refs, mask, *, max_factor: float, rms_factor: float,
                        slack: float, name: str) -> LayerAttentionVerdict:
    """Both statistics of harness.equivalence.compare on every recorded call; the first failing call names
    its layer, step, statistic, value and limit. Padding query rows are not compared."""
    from harness.equivalence.compare import compare_tensors

    tightest: dict = {}
    for index, (out, call, ref) in enumerate(zip(outputs, eager_calls.calls, refs)):
        rows = _query_rows(mask, eager_calls, index, out.shape[1])
        layer, step = eager_calls.layer_index[index], eager_calls.step[index]
        where = f"{name}: layer {layer} attention call, {'prefill' if step == 0 else f'decode step {step}'}"
        for statistic, factor in (("max", max_factor), ("rms", rms_factor)):
            verdict = compare_tensors(out, call.output, ref, factor=factor, slack_floor=slack, mask=rows,
                                      what=where, position_names=("batch", "token", "head", "dim"), statistic=statistic)
            if not verdict.passed:
                return LayerAttentionVerdict(False, f"first diverging attention call: {verdict.message}",
                                             {**tightest, statistic: verdict})
            if statistic not in tightest or _margin(verdict) > _margin(tightest[statistic]):
                tightest[statistic] = verdict
    message = (f"{name}: all {len(outputs)} attention calls within both rules; tightest max: {tightest['max'].message}; "
               f"tightest rms: {tightest['rms'].message}")
    return LayerAttentionVerdict(True, message, tightest)


def _margin(verdict) -> float:
    return verdict.error / verdict.allowed if verdict.allowed else float("inf")


def _query_rows(mask, eager_calls: LayerCalls, index: int, q_len: int) -> torch.Tensor:
    """(batch, q_len) keep-mask of the call's query tokens: prefill = the first tokens, decode step
    s = token (prefill length + s - 1)."""
    step = eager_calls.step[index]
    prefill_len = eager_calls.calls[_first_call_of_layer(eager_calls, eager_calls.layer_index[index])].query.shape[2]
    start = 0 if step == 0 else prefill_len + step - 1
    return mask[:, start:start + q_len].bool()


def _first_call_of_layer(eager_calls: LayerCalls, layer: int) -> int:
    return eager_calls.layer_index.index(layer)


def batch_lengths(config, scenario: str, seed: int, *, base: int, spread: int) -> list[int] | None:
    """Sequence lengths per batch row of an attention scenario, drawn from ``seed``: "past_sliding_window"
    has one row past twice the window and one just past it (None: the model has no window); "single"
    one row of ``base`` plus a draw below ``spread`` tokens; every other scenario three rows of
    decreasing length (padding in two of them)."""
    gen = torch.Generator().manual_seed(seed)
    window = getattr(config, "sliding_window", None)
    if scenario == "past_sliding_window":
        if not window:
            return None
        return [2 * window + 3 + int(torch.randint(0, window, (1,), generator=gen)), window + 1]
    longest = base + int(torch.randint(0, spread, (1,), generator=gen))
    return [longest] if scenario == "single" else [longest, longest - 5, longest - 9]


def padded_token_batch(config, lengths, side: str, seed: int, device):
    """Random token ids (never the pad id) of the given lengths, padded on ``side`` ("left" or
    "right") to the longest; returns (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, config.vocab_size, (n,), generator=gen)
        tokens[tokens == pad] = 3
        span = slice(longest - n, longest) if side == "left" else slice(0, n)
        ids[row, span], mask[row, span] = tokens, 1
    return ids.to(device), mask.to(device)

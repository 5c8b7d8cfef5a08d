"""Model-level attention checks: forwards with padding-aware positions, the upcast eager reference,
known disagreements between transformers' own attention paths, and the rule the model suites apply
to a variant's hidden states and logits."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from harness.backends.kernels import eager_attention


# ---------------------------------------------------------------------------------------------
# Model level: the check the model suite (and the planted-fault tests) run


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift RoPE/learned positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def model_forward(model, input_ids, attention_mask, context=None, use_cache=None):
    """One no-grad forward with every layer's hidden states, inside ``context`` (e.g. sdpa_kernel).
    ``use_cache=False`` keeps no KV cache in the outputs (long prompts: it is as big as the keys
    and values of every layer); None leaves the model's default."""
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), (context or contextlib.nullcontext)():
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=padded_position_ids(attention_mask), output_hidden_states=True, **kwargs)


def upcast_reference(model, dtype=torch.float64, device=None, layers_device=None):
    """The same weights in a wider dtype: the truth the k x eager rule measures against.

    Loading the model again in float64 is not the same thing for random-weight presets (their
    initialisation draws different numbers per dtype), and a reference with other weights would
    make every comparison vacuous.

    The reference attention is this module's ``eager_attention`` registered with transformers as
    ``REFERENCE_ATTENTION``, not transformers' own "eager"/"sdpa": transformers' eager path turns
    the fully masked query rows of left padding into NaN in float64 (two finfo.min biases
    overflow to -inf, and the NaN reaches real tokens through 0 x NaN in the next layer), and
    "sdpa" is the name a planted fault (or a user's override) replaces. Falcon does not dispatch
    through transformers' registry, so it keeps its SDPA path run with the math kernel
    (``reference_context()``), which gives fully masked rows 0 as well.

    The copy is made tensor by tensor straight into ``dtype`` (no second copy in the model's
    dtype), on ``device`` (default: the model's), decoder layers on ``layers_device`` (default:
    ``device``; harness.models.reference_build streams them from there). How big a reference a device
    can take, and which placement to use, is harness.models.reference_sizing's business.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from harness.models.reference_build import upcast_copy

    AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention_forward)
    AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)  # bool masks (True = attend) or None
    reference = upcast_copy(model, dtype, device=device, layers_device=layers_device).to(dtype)
    reference.set_attn_implementation("sdpa" if reference.config.model_type == "falcon" else REFERENCE_ATTENTION)
    return reference


REFERENCE_ATTENTION = "harness_eager_reference"


def _reference_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                                 **kwargs):
    """transformers' attention-function signature around eager_attention (masks: bool, additive, or None)."""
    mask, causal, window = attention_mask, False, None
    if mask is None:  # sdpa_mask skipped a plain causal (or sliding-window) mask
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1
        window = kwargs.get("sliding_window") or None
    elif mask.dtype != torch.bool:
        mask = torch.where(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"), mask)
    out = eager_attention(query, key, value, mask=mask, causal=causal, window=window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def reference_context():
    """The context the upcast reference runs in (SDPA forced to its math kernel, for Falcon)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@dataclass(frozen=True)
class KnownDisagreement:
    """A disagreement between transformers' own attention paths, keyed by what causes it (an
    architecture feature and the transformers releases it was seen in), not by a model's name:
    a user's checkpoint with the same feature gets the same explanation. Suites record it as an
    expected failure, only when it occurs, so a fix shows up as a pass."""

    feature: str
    applies: Callable  # (config) -> bool
    transformers: str  # version specifier where it was seen
    explanation: str


KNOWN_DISAGREEMENTS = (
    KnownDisagreement(
        feature="Falcon with ALiBi",
        applies=lambda config: config.model_type == "falcon" and bool(getattr(config, "alibi", False)),
        transformers=">=5.17,<6",
        explanation="modeling_falcon.py builds the ALiBi bias into the SDPA mask but adds it to the scores in eager; "
                    "the two differ by ~20 % of a hidden value at layer 1 while eager is within 4e-8 of the float64 "
                    "reference (seen with transformers 5.17 and 5.24, torch 2.11/2.13)"),
)


def known_disagreement(config) -> str | None:
    """The explanation of a known transformers disagreement that applies to this model, or None."""
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = Version(transformers.__version__)
    for known in KNOWN_DISAGREEMENTS:
        if known.applies(config) and version in SpecifierSet(known.transformers):
            return (f"known transformers disagreement for {known.feature} (transformers {known.transformers}): "
                    f"{known.explanation}")
    return None




def compare_model_outputs(out, eager_out, reference_out, attention_mask, *, tolerances, name: str):
    """(layers verdict, logits verdict) of harness.equivalence.compare's k x eager rule; padding excluded. The
    numbers are the run's Tolerances: model_error_factor (k), attention_abs_slack, reference_logit_gap.

    Raises ValueError when the reference cannot be the same weights, since then the rule would
    accept anything: the embeddings (hidden state 0) must agree within rounding, and eager's
    logits may be at most ``reference_logit_gap`` x the largest reference logit away from the
    reference at the median position (see Tolerances.reference_logit_gap for the measured values).
    """
    from harness.equivalence.compare import (compare_tensors, first_diverging_layer, max_abs_error, reference_rounding,
                                 typical_position_error)

    factor, slack, max_reference_gap = (tolerances.model_error_factor, tolerances.attention_abs_slack,
                                        tolerances.reference_logit_gap)
    embeddings_gap = max_abs_error(eager_out.hidden_states[0], reference_out.hidden_states[0], attention_mask)
    embeddings_rounding = 2.0 * reference_rounding(reference_out.hidden_states[0], eager_out.hidden_states[0].dtype,
                                                   attention_mask)
    scale = float(reference_out.logits.abs().max())
    # the typical position, not the worst: another model differs everywhere, while bf16 drifts far at a few
    logits_gap = typical_position_error(eager_out.logits, reference_out.logits, attention_mask)
    if embeddings_gap > embeddings_rounding or logits_gap > max_reference_gap * scale:
        raise ValueError(f"{name}: eager and the reference are not the same model: embeddings differ by "
                         f"{embeddings_gap:.3g} (rounding {embeddings_rounding:.3g}), logits by {logits_gap:.3g} "
                         f"at the median position (allowed {max_reference_gap:g} x {scale:.3g})")

    layers = first_diverging_layer(out.hidden_states, eager_out.hidden_states, reference_out.hidden_states,
                                   attention_mask, factor, slack, name=name)
    logits = compare_tensors(out.logits, eager_out.logits, reference_out.logits, factor=factor, slack_floor=slack,
                             mask=attention_mask, what=f"{name}: logits", position_names=("batch", "token", "vocab"))
    return layers, logits

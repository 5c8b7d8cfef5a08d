"""Decoding shortcuts that must not change greedy output: assisted (speculative) decoding with a
draft model (a truncated copy of the target, or a small preset sharing its vocabulary) and
prompt-lookup decoding; the runs go through harness.inference.generation's forced-length greedy run."""

from __future__ import annotations

import copy

from harness.errors import HarnessUsageError
from harness.inference.generation import GreedyRun, greedy


def truncated_copy(model, keep_layers: int):
    """An assistant for speculative decoding: the target's first `keep_layers` blocks with the
    target's embeddings and head (same tokenizer, shares no tensors with the target)."""
    import torch
    from transformers import AutoModelForCausalLM

    total = model.config.get_text_config(decoder=True).num_hidden_layers
    if not 0 < keep_layers < total:
        raise HarnessUsageError(f"truncated_copy: keep_layers must be in 1..{total - 1}, got {keep_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = keep_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:keep_layers]
    with torch.device(model.device):
        assistant = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, _unexpected = assistant.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not getattr(config, "tie_word_embeddings", False)]
    if missing:
        raise HarnessUsageError(f"truncated_copy: weights missing for {missing[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        assistant.tie_weights()
    try:
        assistant.set_attn_implementation(model.config._attn_implementation)
    except (ValueError, AttributeError):
        pass
    assistant.eval()
    return assistant


def small_preset_assistant(model, preset: str = "tiny:llama"):
    """A different, smaller model sharing the target's vocabulary: a 1-layer copy of a tiny preset.
    Its drafts are mostly wrong, which exercises the rejection path that a truncated copy of a
    degenerate random model (always the same token) may never reach."""
    from harness.models.presets import TOKENIZER_VOCAB, build_preset

    vocab = model.config.get_text_config(decoder=True).vocab_size
    if vocab != TOKENIZER_VOCAB:
        raise HarnessUsageError(f"the tiny presets use a {TOKENIZER_VOCAB}-token vocabulary; this model has {vocab}")
    return truncated_copy(build_preset(preset, model.device, model.dtype), 1)


def drafted_tokens(run: GreedyRun) -> int:
    """Draft tokens proposed: the assistant produces one per forward call."""
    return run.assistant_forward_calls


def assisted_run(model, assistant, inputs, *, pad_token_id: int, label: str, new_tokens: int | None = None) -> GreedyRun:
    return greedy(model, inputs, label=label, pad_token_id=pad_token_id, new_tokens=new_tokens, assistant_model=assistant)


def prompt_lookup_run(model, inputs, *, pad_token_id: int, num_tokens: int = 10, new_tokens: int | None = None) -> GreedyRun:
    return greedy(model, inputs, label=f"prompt lookup decoding ({num_tokens} tokens)", pad_token_id=pad_token_id,
                  new_tokens=new_tokens, prompt_lookup_num_tokens=num_tokens)

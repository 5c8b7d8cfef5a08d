"""Planted faults for the cache and decoding-shortcut suites. Each is a context manager that
patches one transformers class or function for the duration, then restores it.

Every fault is confined to the path it breaks (cached decode, a static slot, verification of
drafts), so the no-cache reference stays correct and only the comparison can catch it.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def patched(owner, name, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _is_decode_step(key_states) -> bool:
    return key_states.shape[-2] == 1


@contextlib.contextmanager
def cache_drops_newest_kv():
    """A dynamic cache returns the new key/value for this step but never stores it."""
    from transformers.cache_utils import DynamicLayer

    def make(original):
        def update(self, key_states, value_states, *args, **kwargs):
            if not (self.is_initialized and _is_decode_step(key_states)):
                return original(self, key_states, value_states, *args, **kwargs)
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

        return update

    with patched(DynamicLayer, "update", make):
        yield


@contextlib.contextmanager
def cache_duplicates_newest_kv():
    """A dynamic cache stores the new key/value twice (returns the right tensors this step)."""
    from transformers.cache_utils import DynamicLayer

    def make(original):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = original(self, key_states, value_states, *args, **kwargs)
            if _is_decode_step(key_states) and keys.shape[-2] > 1:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            return keys, values

        return update

    with patched(DynamicLayer, "update", make):
        yield


@contextlib.contextmanager
def rope_position_off_by_one_in_cached_decode():
    """Llama's rotary embedding sees position p+1 when one token is decoded against a cache
    (the no-cache path always passes the whole sequence, so it is untouched)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def make(original):
        def forward(self, x, position_ids, *args, **kwargs):
            if position_ids.shape[-1] == 1:
                position_ids = position_ids + 1
            return original(self, x, position_ids, *args, **kwargs)

        return forward

    with patched(LlamaRotaryEmbedding, "forward", make):
        yield


@contextlib.contextmanager
def static_slot_written_at_wrong_index():
    """A decode step's key/value land in the previous slot of the static cache (its own slot stays zero)."""
    from transformers.cache_utils import StaticLayer

    def make(original):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = original(self, key_states, value_states, *args, **kwargs)
            if _is_decode_step(key_states):
                slot = int(self.get_seq_length()) - 1
                for buffer in (self.keys, self.values):
                    buffer[:, :, slot - 1] = buffer[:, :, slot]
                    buffer[:, :, slot] = 0
            return keys, values

        return update

    with patched(StaticLayer, "update", make):
        yield


@contextlib.contextmanager
def sliding_window_ignored_in_cached_decode():
    """Mistral's cached decode keeps every key and masks causally only: the window is forgotten
    once a cache is in use (prefill and the no-cache path still apply it)."""
    from transformers import cache_utils, masking_utils
    from transformers.models.mistral import modeling_mistral

    def make(original):
        def create_mask(*args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and cache.get_seq_length() > 0:
                return masking_utils.create_causal_mask(*args, **kwargs)
            return original(*args, **kwargs)

        return create_mask

    with contextlib.ExitStack() as stack:
        for mapping, full in ((cache_utils.DYNAMIC_LAYER_TYPE_MAPPING, cache_utils.DynamicLayer),
                              (cache_utils.STATIC_LAYER_TYPE_MAPPING, cache_utils.StaticLayer)):
            stack.enter_context(_mapping_entry(mapping, "sliding_attention", full))
        stack.enter_context(patched(modeling_mistral, "create_sliding_window_causal_mask", make))
        yield


@contextlib.contextmanager
def _mapping_entry(mapping, key, value):
    original = mapping[key]
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = original


@contextlib.contextmanager
def assisted_decoding_accepts_any_draft():
    """Verification of drafted tokens is rigged: wherever a Llama forward sees a next token in its
    input, that token gets the top logit, so every draft is 'chosen' by the target. Only positions
    before the last are touched, so plain greedy (which reads the last position) is unaffected."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    def make(original):
        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None or input_ids.shape[1] < 2 or out.logits is None:
                return out
            kept, length = out.logits.shape[1], input_ids.shape[1]
            for j in range(kept):
                position = length - kept + j
                if position + 1 < length:
                    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
                    draft = input_ids[:, position + 1]
                    out.logits[rows, j, draft] = out.logits[:, j].max(dim=-1).values + 10.0
            return out

        return forward

    with patched(LlamaForCausalLM, "forward", make):
        yield


FAULTS = {
    "cache_drops_newest_kv": cache_drops_newest_kv,
    "cache_duplicates_newest_kv": cache_duplicates_newest_kv,
    "rope_position_off_by_one_in_cached_decode": rope_position_off_by_one_in_cached_decode,
    "static_slot_written_at_wrong_index": static_slot_written_at_wrong_index,
    "sliding_window_ignored_in_cached_decode": sliding_window_ignored_in_cached_decode,
    "assisted_decoding_accepts_any_draft": assisted_decoding_accepts_any_draft,
}

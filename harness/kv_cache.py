"""KV-cache size: the formula, and the bytes a real cache object holds.

    bytes = 2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes per element

summed per layer, because a sliding-window layer holds at most its window, and a static layer
always holds max_cache_len slots. GQA/MQA shrink kv_heads, which is the whole saving they offer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    attention_heads: int


def kv_shape(config) -> KVShape:
    """Layers, KV heads and head size as the cache stores them (Falcon multi_query means 1 KV head)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1
    else:
        kv_heads = (getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVShape(text.num_hidden_layers, int(kv_heads), int(head_dim), int(heads))


def kv_cache_bytes(shape: KVShape, seq_len: int, batch: int, bytes_per_element: int,
                   layer_lengths: list[int] | None = None) -> int:
    """The formula. layer_lengths: tokens held per layer when they differ (sliding windows)."""
    per_token = 2 * shape.kv_heads * shape.head_dim * batch * bytes_per_element
    if layer_lengths is None:
        return per_token * shape.layers * seq_len
    if len(layer_lengths) != shape.layers:
        raise ValueError(f"{len(layer_lengths)} layer lengths for {shape.layers} layers")
    return per_token * sum(layer_lengths)


def held_tokens(cache) -> list[int]:
    """Tokens' worth of slots each layer of a cache object holds (its allocated length, not its fill)."""
    return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def measured_cache_bytes(cache) -> int:
    """Bytes of every distinct tensor storage a cache's layers hold (keys, values, quantised parts)."""
    import torch

    seen: dict[int, int] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            visit(getattr(layer, name, None))
    return sum(seen.values())


def mha_equivalent(shape: KVShape) -> KVShape:
    """The same width with one KV head per query head: what GQA/MQA are saving against."""
    return KVShape(shape.layers, shape.attention_heads, shape.head_dim, shape.attention_heads)

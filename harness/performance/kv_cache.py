"""The bytes a real KV-cache object holds, per layer and in total (the formula they are compared
with is harness.performance.predictions.kv_cache_bytes)."""

from __future__ import annotations



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

"""What the paged KV cache of the serving path holds, measured while it runs, against the formula.

A paged cache is `num_blocks` blocks of `block_size` token slots for every layer, plus two
reserved blocks (transformers keeps a read-trash and a write-trash block that padding tokens use),
so its storage is harness.performance.kv_cache's formula with seq_len = block_size x (num_blocks + 2), batch 1.
A request holding L tokens of KV (prompt + generated - 1: the last token is never fed back) needs
ceil(L / block_size) blocks, or ceil(min(L, window) / block_size) in a sliding-window layer group.

Measured by a forward pre-hook on the model (continuous batching calls the model with the paged
cache as its `cache` keyword): the cache's tensors, and after each scheduling step the block table
of every request, per attention group. transformers 5.24 keeps one flat byte tensor and
`cache_allocators`; 5.17 keeps per-layer key/value tensors and `group_cache_managers`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from harness.performance import predictions

# transformers' read-trash and write-trash blocks: 5.17 adds 2 blocks; 5.24 2 sectors, a sector being
# lcm(block bytes, 128) bytes, i.e. one block whenever a block's bytes are a multiple of 128 (every
# model here: 2 x kv heads x head_dim x 16 tokens x >= 2 bytes); otherwise the check says by how much
RESERVED_BLOCKS = 2


def cache_tensors(cache) -> list:
    """The tensors holding the paged cache's keys and values."""
    if hasattr(cache, "cache_tensor"):  # 5.24: one flat byte tensor shared by all allocators
        return [cache.cache_tensor]
    return list(cache.key_cache) + list(cache.value_cache)  # 5.17: per layer of a group


def storage_bytes(cache) -> int:
    seen: dict[int, int] = {}
    for tensor in cache_tensors(cache):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def block_size(cache) -> int:
    if hasattr(cache, "cache_allocators"):  # 5.24: every allocator pages by the configured page size
        return min(a.tokens_per_page for a in cache.cache_allocators.values())
    return int(cache.block_size)


def groups(cache) -> list:
    """The attention groups' allocators, each with a `block_table` dict: request id -> block ids."""
    if hasattr(cache, "cache_allocators"):
        return list(cache.cache_allocators.values())
    return list(cache.group_cache_managers)


def group_window(group) -> int | None:
    """The sliding window a group's layers keep, None for full attention."""
    window = getattr(group, "sliding_window", None)
    return int(window) if window else None


@dataclass
class PagedCacheObservation:
    """What the pre-hook saw over a run."""

    steps: int = 0
    storage_bytes: int = 0
    num_blocks: int = 0
    block_size: int = 0
    windows: list = field(default_factory=list)  # per group: None or its sliding window
    max_blocks: dict = field(default_factory=dict)  # (group, request id) -> most blocks it held
    peak_distinct_blocks: int = 0  # most distinct blocks in use at one step, all groups together
    last_step_requests: set = field(default_factory=set)  # requests holding blocks at the last forward

    def blocks_of(self, request_id: str) -> list[int]:
        return [self.max_blocks.get((g, request_id), 0) for g in range(len(self.windows))]


@contextlib.contextmanager
def observe_paged_cache(model):
    """Record the paged cache's geometry and every request's block table at each forward."""
    seen = PagedCacheObservation()

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or not hasattr(cache, "extend_read_and_write_indices"):
            return
        if seen.steps == 0:
            seen.storage_bytes, seen.num_blocks = storage_bytes(cache), int(cache.num_blocks)
            seen.block_size, seen.windows = block_size(cache), [group_window(g) for g in groups(cache)]
        seen.steps += 1
        distinct, holders = 0, set()
        for index, group in enumerate(groups(cache)):
            tables = dict(group.block_table)
            holders.update(r for r, blocks in tables.items() if blocks)
            distinct += len({b for blocks in tables.values() for b in blocks})
            for request_id, blocks in tables.items():
                key = (index, request_id)
                seen.max_blocks[key] = max(seen.max_blocks.get(key, 0), len(blocks))
        seen.peak_distinct_blocks = max(seen.peak_distinct_blocks, distinct)
        seen.last_step_requests = holders

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def predicted_storage_bytes(config, num_blocks: int, block_tokens: int, bytes_per_element: int) -> int:
    """The formula for a paged cache of `num_blocks` blocks (plus the reserved ones)."""
    return predictions.kv_cache_bytes(predictions.attention_shape(config), block_tokens * (num_blocks + RESERVED_BLOCKS), 1,
                                   bytes_per_element)


def predicted_blocks(held_tokens: int, block_tokens: int, window: int | None) -> int:
    """Blocks a request holding `held_tokens` tokens of KV needs in a group (window: sliding)."""
    return math.ceil((min(held_tokens, window) if window else held_tokens) / block_tokens)


def block_bytes(config, block_tokens: int, bytes_per_element: int) -> int:
    """One block: block_tokens slots of every layer."""
    return predictions.kv_cache_bytes(predictions.attention_shape(config), block_tokens, 1, bytes_per_element)


def static_cache_bytes(config, layer_types: list[str], prompt_lengths: list[int], new_tokens: int,
                       bytes_per_element: int) -> int:
    """The same batch in a static cache: every row padded to the longest prompt + new tokens, a
    sliding-window layer holding at most its window (as StaticCache sizes it)."""
    length = max(prompt_lengths) + new_tokens
    window = getattr(config.get_text_config(decoder=True), "sliding_window", None)
    lengths = [min(length, window) if window and kind == "sliding_attention" else length for kind in layer_types]
    return predictions.kv_cache_bytes(predictions.attention_shape(config), length, len(prompt_lengths), bytes_per_element,
                                   layer_lengths=lengths)

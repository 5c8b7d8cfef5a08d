"""Planted faults for the serving suite: each breaks one part of continuous batching's paged KV
cache or its scheduler. Context managers that patch transformers' continuous-batching internals for
the duration, then restore them; the ordinary (non-paged) cache the references use is untouched.

The classes moved between releases: the allocators live in `continuous_batching.cache_allocators`
in 5.24 and in `continuous_batching.cache_manager` in 5.17; both keep `block_table` (request id ->
block ids) and compute the physical slots of a request in `get_read_indices` / `get_write_indices`
(index path) and `fill_block_table` (the flash decode path). The scheduler's `_schedule_request`,
which cuts a prompt into prefill chunks, is the same in both.
"""

from __future__ import annotations

import contextlib

from tests.generation_faults import patched


def _allocator_classes() -> list[type]:
    try:  # 5.24
        from transformers.generation.continuous_batching.cache_allocators import (
            FullAttentionCacheAllocator, SlidingAttentionCacheAllocator)
    except ImportError:  # 5.17
        from transformers.generation.continuous_batching.cache_manager import (
            FullAttentionCacheAllocator, SlidingAttentionCacheAllocator)
    return [FullAttentionCacheAllocator, SlidingAttentionCacheAllocator]


@contextlib.contextmanager
def _patch_own_methods(names: tuple[str, ...], make):
    """Patch each allocator class's own definition of `names` (not inherited ones)."""
    with contextlib.ExitStack() as stack:
        for cls in _allocator_classes():
            for name in names:
                if name in cls.__dict__:
                    stack.enter_context(patched(cls, name, make))
        yield


def _foreign_table(allocator, request_id: str) -> list[int] | None:
    """The victim (the request holding the most blocks, ties by id) gets its last block-table
    entry replaced by a block of another request that it does not share (prefix caching shares
    first blocks); None for every other request."""
    tables = {r: b for r, b in allocator.block_table.items() if b}
    if request_id not in tables or len(tables) < 2:
        return None
    if request_id != max(tables, key=lambda r: (len(tables[r]), r)):
        return None
    own = tables[request_id]
    foreign = next((block for r, blocks in sorted(tables.items()) if r != request_id
                    for block in blocks if block not in own), None)
    return None if foreign is None else own[:-1] + [foreign]


@contextlib.contextmanager
def block_table_entry_points_at_other_request():
    """A block-table entry of one request points at another request's block: its newest tokens
    are written over the other's and read back from there."""

    def make(original):
        def method(self, request_id, *args, **kwargs):
            table = _foreign_table(self, request_id)
            if table is None:
                return original(self, request_id, *args, **kwargs)
            own = self.block_table[request_id]
            self.block_table[request_id] = table
            try:
                return original(self, request_id, *args, **kwargs)
            finally:
                self.block_table[request_id] = own

        return method

    with _patch_own_methods(("get_read_indices", "get_write_indices", "fill_block_table"), make):
        yield


def _tokens_per_block(allocator) -> int:
    return int(getattr(allocator, "tokens_per_page", None) or allocator.block_size)  # 5.24 / 5.17


@contextlib.contextmanager
def kv_written_one_slot_late():
    """One request's keys/values (the lowest request id holding blocks) land in the slot of the
    position after their own (where that slot is not allocated yet, the token overwrites the slot
    before it): its reads find every token one place off and its first slot stale."""
    def make(original):
        def get_write_indices(self, request_id, past_length, query_length):
            holders = sorted(r for r, blocks in self.block_table.items() if blocks)
            if not holders or request_id != holders[0]:
                return original(self, request_id, past_length, query_length)
            capacity = _tokens_per_block(self) * len(self.block_table[request_id])
            late = [min(position + 1, capacity - 1) for position in range(past_length, past_length + query_length)]
            return [original(self, request_id, position, 1)[0] for position in late]

        return get_write_indices

    with patched(_allocator_classes()[0], "get_write_indices", make):  # full-attention layers
        yield


@contextlib.contextmanager
def chunked_prefill_drops_last_prompt_token():
    """When a prompt is prefilled in several chunks, the scheduler's final chunk leaves out the
    prompt's last token: the request decodes from a prompt one token short."""
    from transformers.generation.continuous_batching.requests import RequestStatus
    from transformers.generation.continuous_batching.scheduler import Scheduler

    def make(original):
        def _schedule_request(self, state, request_tokens, token_budget, *args, **kwargs):
            resumed = state.status == RequestStatus.PREFILLING  # a split prefill continues
            result = original(self, state, request_tokens, token_budget, *args, **kwargs)
            if resumed and not state.remaining_prefill_tokens and len(state.tokens_to_process) > 1:
                state.tokens_to_process = state.tokens_to_process[:-1]
            return result

        return _schedule_request

    with patched(Scheduler, "_schedule_request", make):
        yield


FAULTS = {
    "block_table_entry_points_at_other_request": block_table_entry_points_at_other_request,
    "kv_written_one_slot_late": kv_written_one_slot_late,
    "chunked_prefill_drops_last_prompt_token": chunked_prefill_drops_last_prompt_token,
}

"""Serving throughput and latency: continuous batching against generate() on a left-padded batch.

Per run of B concurrent requests of different prompt lengths, each generating exactly N tokens:
throughput = B x N / wall seconds; TTFT per request = its first token's host timestamp minus its
submission; TPOT = the gaps between its tokens. Continuous batching records those per request
(`record_timestamps`); generate() on a padded batch gives every row the same stamps (one streamer,
harness.performance.timing.TokenClock). Host perf_counter stamps: each is taken after the tokens reached the
host, so the device work before it is complete.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from harness.inference import serving
from harness.performance.timing import TokenClock, percentile, synchronize


@dataclass(frozen=True)
class ServingRound:
    """One timed round: wall seconds, generated tokens, and per-request latencies."""

    seconds: float
    tokens: int
    ttft: list[float]
    tpot: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def figures(self, prefix: str) -> dict:
        return {f"{prefix}_tokens_per_s": self.tokens_per_s, f"{prefix}_seconds": self.seconds,
                f"{prefix}_ttft_p50_s": percentile(self.ttft, 50), f"{prefix}_ttft_p90_s": percentile(self.ttft, 90),
                f"{prefix}_tpot_p50_s": percentile(self.tpot, 50) if self.tpot else float("nan"),
                f"{prefix}_tpot_p90_s": percentile(self.tpot, 90) if self.tpot else float("nan")}


def random_prompts(count: int, shortest: int, longest: int, seed: int, vocab: int = 1000) -> list[list[int]]:
    """`count` prompts of random token ids (10..vocab) with lengths spread over [shortest, longest]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=gen).tolist()
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


def settings_for(prompts: list[list[int]], new_tokens: int, block_size: int = 256) -> serving.ServingSettings:
    """A paged cache with room for the whole batch at once (twice the blocks it needs, so the
    scheduler never waits for memory), transformers' default block size, CUDA-graph and decode
    fast-path choices, a 2048-token step budget (paged eager's score matrix stays a few GB at 64
    requests), and prefix caching off: every round submits the same prompts, and cache hits on
    the previous round's blocks would skip prefills that generate() has to compute."""
    needed = sum(math.ceil((len(p) + new_tokens) / block_size) for p in prompts)
    return serving.ServingSettings(new_tokens=new_tokens, block_size=block_size, num_blocks=2 * needed + 8,
                                   max_batch_tokens=2048, allow_block_sharing=False, use_cuda_graph=None,
                                   decode_fast_path=True, record_timestamps=True, timeout_s=600.0)


def continuous_batching_round(session: serving.ServingSession, prompts: list[list[int]], tag: str) -> ServingRound:
    """Submit every prompt at once to a running session, wait for all; the session outlives the round."""
    names = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for name, prompt in zip(names, prompts):
        session.add(name, prompt)
    results = session.collect(names)
    seconds = time.perf_counter() - start
    served = list(results.values())
    return ServingRound(seconds, sum(len(r.tokens) for r in served), [r.ttft for r in served],
                        [t for r in served for t in r.token_latencies])


def padded_generate_round(model, prompts: list[list[int]], new_tokens: int, pad_token_id: int) -> ServingRound:
    """generate() on the prompts left-padded into one batch, exactly `new_tokens` tokens per row."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    clock = TokenClock()
    synchronize(model.device)
    start = time.perf_counter()
    clock.start()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad_token_id, streamer=clock)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    rows = len(prompts)
    return ServingRound(seconds, rows * new_tokens, [clock.time_to_first_token] * rows, clock.token_latencies * rows)

"""The serving path: transformers' continuous batching (`generate_batch`, `init_continuous_batching`)
with a paged KV cache, run so that each request's output can be compared with the same request
decoded alone (harness.equivalence.serving_compare) and the paged cache measured (harness.performance.serving_memory).

Lengths are forced as in harness.inference.generation: every request generates exactly N tokens because
the end-of-sequence ids are suppressed (the processing min_new_tokens applies to the reference)
and stopping on them is disabled. Greedy only; log-probabilities of the chosen tokens are returned
(the serving path's only per-step scores). CUDA graphs stay off (the paged bookkeeping under test
is the same; the speed benchmark uses transformers' defaults), and so does flash's block-table decode
path (it wants 256-token pages; the suite pages by 16 tokens).

transformers 5.17 vs 5.24: the block size is `block_size` in 5.17 and `page_size` in 5.24;
`paged|sdpa` and `paged|flash_attention_*` are registered attention functions in 5.17, while 5.24
serves SDPA and flash through their plain names (only `paged|eager` keeps the prefix) and would
switch SDPA to flash by itself unless `auto_switch_to_flash=False`. Both are handled here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import time
from dataclasses import dataclass

PAGED_IMPLEMENTATIONS = ("paged|sdpa", "paged|eager", "paged|flash_attention_2", "paged|flash_attention_3",
                         "paged|flash_attention_4")


@dataclass(frozen=True)
class ServingSettings:
    """The paged cache and scheduler a run uses. Small blocks and a small token budget on purpose:
    every request spans several blocks and long prompts are prefilled in chunks."""

    new_tokens: int
    block_size: int = 16
    num_blocks: int = 96
    max_batch_tokens: int = 48
    allow_block_sharing: bool = True  # prefix caching: identical prompt blocks are shared
    use_cuda_graph: bool | None = False  # None: transformers decides (the benchmark)
    # flash's block-table decode path (flash_attn_with_kvcache) wants 256-token pages; off, decodes
    # read the cache through the same index path as prefills, which small blocks exercise
    decode_fast_path: bool = False
    record_timestamps: bool = False
    timeout_s: float = 300.0


@dataclass
class ServedRequest:
    """One request's outcome from the serving path."""

    request_id: str
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    error: str | None = None
    finished: bool = False
    created: float = 0.0
    timestamps: list[float] | None = None

    @property
    def ttft(self) -> float | None:
        return self.timestamps[0] - self.created if self.timestamps else None

    @property
    def token_latencies(self) -> list[float]:
        stamps = self.timestamps or []
        return [b - a for a, b in zip(stamps, stamps[1:])]


def _served(output, prompt) -> ServedRequest:
    return ServedRequest(output.request_id, list(prompt), list(output.generated_tokens), list(output.logprobs or []),
                         output.error, output.is_finished(), output.created_time,
                         list(output.timestamps) if output.timestamps is not None else None)


# ---------------------------------------------------------------------------------------------
# Version differences


def _config_fields() -> set[str]:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}


def cb_config(settings: ServingSettings):
    """A ContinuousBatchingConfig for `settings` in this transformers version's field names."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    fields = _config_fields()
    kwargs = dict(num_blocks=settings.num_blocks, max_batch_tokens=settings.max_batch_tokens,
                  allow_block_sharing=settings.allow_block_sharing, return_logprobs=True,
                  use_cuda_graph=settings.use_cuda_graph,
                  max_blocks_per_request=None if settings.decode_fast_path else 0)
    kwargs["page_size" if "page_size" in fields else "block_size"] = settings.block_size
    if "auto_switch_to_flash" in fields:  # 5.24: keep the implementation asked for
        kwargs["auto_switch_to_flash"] = False
    return ContinuousBatchingConfig(**kwargs)


def registered_name(impl: str) -> str:
    """The attention function name this transformers version serves `impl` under: 5.17 registers
    paged|sdpa / paged|flash_attention_*; 5.24 only paged|eager (SDPA and flash read the paged
    cache under their plain names)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    registered = impl in ALL_ATTENTION_FUNCTIONS.valid_keys()
    return impl if registered or impl == "paged|eager" else impl.removeprefix("paged|")


def base_implementation(impl: str) -> str:
    """The same kernel without paging, which the model variant is loaded with."""
    return impl.removeprefix("paged|")


# What a model's own code raises when it was not written for the paged cache's calling convention
# (seen: GPT-NeoX in transformers 5.24 calls cache.update(k, v, layer_idx) without the kwargs
# PagedAttentionCache.update requires; Falcon in transformers 5.25 calls cache.get_seq_length(),
# which PagedAttentionCache does not have). A crash of any other kind stays a failure.
_PAGED_API_MISMATCH = re.compile(r"PagedAttentionCache\.\w+\(\) (missing \d+ required|got an unexpected)"
                                 r"|'PagedAttentionCache' object has no attribute '\w+'")


def model_support_reason(model, impl: str = "paged|eager") -> str | None:
    """None when the model can be served with paged attention, else why not: it cannot switch to a
    paged implementation, or its modeling code does not call the paged cache the way continuous
    batching needs (a one-request probe on the model itself; the same probe passed on a tiny Llama)."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return (f"{type(model).__name__} does not use transformers' AttentionInterface, so it cannot switch to a "
                "paged attention implementation (continuous batching needs one)")
    try:
        generate_batch(model, impl, {"probe": list(range(10, 22))},
                       ServingSettings(new_tokens=2, num_blocks=8, max_batch_tokens=16, timeout_s=60), [])
    except RuntimeError as exc:
        mismatch = _PAGED_API_MISMATCH.search(str(exc))
        if mismatch:
            import transformers

            return (f"{type(model).__name__}'s modeling code does not support continuous batching in transformers "
                    f"{transformers.__version__}: {mismatch.group(0)}...")
    return None


@contextlib.contextmanager
def paged_attention(model, impl: str):
    """The model switched to `impl` (its registered name) for the duration, then restored."""
    original = model.config._attn_implementation
    target = registered_name(impl)
    model.set_attn_implementation(target)
    try:
        if model.config._attn_implementation != target:
            raise RuntimeError(f"{type(model).__name__} stayed on attention {model.config._attn_implementation!r} "
                               f"when switched to {target!r}")
        yield
    finally:
        model.set_attn_implementation(original)


def generation_config(new_tokens: int, eos_ids: list[int]):
    """Greedy, exactly `new_tokens` tokens: EOS suppressed (as min_new_tokens does for the
    reference) and never a stop condition."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1,
                            suppress_tokens=list(eos_ids) or None)


# ---------------------------------------------------------------------------------------------
# Runs


@contextlib.contextmanager
def _frozen_heap():
    """transformers' continuous batching calls gc.collect() twice when it stops; with a test
    session's heap that was most of a short run (0.8 of 1.2 s on CPU). Objects alive before the run
    are frozen (gc.freeze) for its duration, so those collections only walk what the run created."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_outputs(results: dict, wanted: list[str], impl: str) -> None:
    missing = [rid for rid in wanted if rid not in results]
    failed = {rid: r.error for rid, r in results.items() if r.error}
    if missing or failed:
        raise RuntimeError(f"continuous batching ({impl}) lost requests {missing} / failed {failed}")


def generate_batch(model, impl: str, prompts: dict[str, list[int]], settings: ServingSettings,
                   eos_ids: list[int]) -> dict[str, ServedRequest]:
    """All `prompts` submitted together through model.generate_batch; results by the caller's names."""
    names = list(prompts)
    # no inference_mode here: 5.17's generation thread does not inherit it, and tensors made under it
    # in this thread cannot be updated there (transformers runs the loop under no_grad itself)
    with _frozen_heap(), paged_attention(model, impl):
        outputs = model.generate_batch([prompts[n] for n in names], generation_config=generation_config(
            settings.new_tokens, eos_ids), continuous_batching_config=cb_config(settings),
            record_timestamps=settings.record_timestamps, progress_bar=False)
    # generate_batch names requests req_<i> in input order
    by_name = {name: _served(outputs[f"req_{i}"], prompts[name]) for i, name in enumerate(names)
               if f"req_{i}" in outputs}
    _check_outputs(by_name, names, impl)
    return by_name


class ServingSession:
    """The manager API: requests added, cancelled and collected while the loop runs.

    with ServingSession(model, impl, settings, eos_ids) as session:
        session.add("a", ids); session.wait_for_tokens("a", 2); session.add("b", ids2)
        results = session.collect(["a", "b"])
    Requests stream by default, so progress is visible; `latest` holds each request's newest output."""

    def __init__(self, model, impl: str, settings: ServingSettings, eos_ids: list[int]):
        self.model, self.impl, self.settings, self.eos_ids = model, impl, settings, eos_ids
        self.prompts: dict[str, list[int]] = {}
        self.latest: dict[str, ServedRequest] = {}
        self.streaming = True  # False: only final outputs (less queue traffic, for timing)
        self._stack = contextlib.ExitStack()
        self.manager = None

    def __enter__(self):
        self._stack.enter_context(_frozen_heap())
        self._stack.enter_context(paged_attention(self.model, self.impl))  # no inference_mode: see generate_batch
        self.manager = self.model.init_continuous_batching(
            generation_config=generation_config(self.settings.new_tokens, self.eos_ids),
            continuous_batching_config=cb_config(self.settings))
        self.manager.start()
        self._stack.callback(self._shutdown)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def _shutdown(self) -> None:
        self.manager.stop(block=True, timeout=30)
        destroy = getattr(self.manager, "destroy", None)
        if destroy is not None:
            destroy()

    def add(self, name: str, prompt: list[int], max_new_tokens: int | None = None) -> None:
        self.prompts[name] = list(prompt)
        rid = self.manager.add_request(list(prompt), request_id=name, streaming=self.streaming,
                                       max_new_tokens=max_new_tokens or self.settings.new_tokens,
                                       record_timestamps=self.settings.record_timestamps)
        if rid != name:
            raise RuntimeError(f"continuous batching ({self.impl}) refused request {name!r}")

    def cancel(self, name: str) -> None:
        self.manager.cancel_request(name)

    def _poll(self, deadline: float) -> None:
        output = self.manager.get_result(timeout=0.02)
        if output is not None:
            self.latest[output.request_id] = _served(output, self.prompts.get(output.request_id, []))
        elif not self.manager.is_running():
            fatal = getattr(self.manager.background_thread_status, "fatal_error", None)
            raise RuntimeError(f"continuous batching ({self.impl}) stopped: {fatal!r}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"continuous batching ({self.impl}): no result within {self.settings.timeout_s} s "
                               f"(progress {({k: len(v.tokens) for k, v in self.latest.items()})})")

    def wait_for_tokens(self, name: str, count: int) -> int:
        """Block until request `name` has at least `count` tokens; returns how many it has."""
        deadline = time.perf_counter() + self.settings.timeout_s
        while name not in self.latest or len(self.latest[name].tokens) < count:
            if name in self.latest and self.latest[name].finished:
                break
            self._poll(deadline)
        return len(self.latest[name].tokens)

    def collect(self, names: list[str]) -> dict[str, ServedRequest]:
        deadline = time.perf_counter() + self.settings.timeout_s
        while not all(n in self.latest and self.latest[n].finished for n in names):
            self._poll(deadline)
        results = {n: self.latest[n] for n in names}
        _check_outputs(results, names, self.impl)
        return results


# ---------------------------------------------------------------------------------------------
# Which implementations run here


@functools.lru_cache(maxsize=None)
def probe_implementation(impl: str, device_text: str, dtype_text: str) -> str | None:
    """None when `impl` serves a tiny Llama on this device and dtype, else the reason (the
    exception it raised): probed by trying, once per run."""
    import torch

    from harness.models.presets import build_preset

    try:
        model = build_preset("tiny:llama", torch.device(device_text), getattr(torch, dtype_text),
                             attn_implementation=base_implementation(impl))
        settings = ServingSettings(new_tokens=2, num_blocks=8, max_batch_tokens=16, timeout_s=60)
        generate_batch(model, impl, {"probe": list(range(10, 22))}, settings, [])
    except Exception as exc:  # any failure means "does not run here"; the reason says which
        text = str(exc).strip().splitlines()
        return f"{impl}: {type(exc).__name__}: {text[0][:300] if text else ''}"
    return None

"""Greedy runs with and without a KV cache, every cache type transformers offers, assisted and
prompt-lookup decoding: each returns a GreedyRun (tokens + per-step scores and raw logits) that
harness.token_agreement compares with the plain no-cache run.

Lengths are forced (min_new_tokens = max_new_tokens = N, N = $HARNESS_NEW_TOKENS, default 32) so
an early EOS can never make a comparison vacuous. Works with transformers 5.17 and 5.24: 5.24
renamed `past_key_values` to `cache` (generate still accepts the old name) and added an fp8 KV
backend; both differences are handled here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from harness.errors import HarnessUsageError


def new_tokens_default() -> int:
    """N generated tokens per run: $HARNESS_NEW_TOKENS, default 32."""
    text = os.environ.get("HARNESS_NEW_TOKENS", "32")
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 2:
        raise HarnessUsageError(f"HARNESS_NEW_TOKENS={text!r}: expected an integer >= 2 (tokens generated per run)")
    return n


# Prompts for seeded runs: chat turns a trained model answers at length; random presets see the same text.
PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright while moving.",
    "Describe the water cycle to a ten year old.",
    "List some tips for writing clear emails at work.",
    "Why do leaves change colour in autumn?",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between cats and dogs as pets?",
    "Summarise the plot of a detective novel you invent.",
    "How does a refrigerator keep food cold?",
    "Plan a three day trip to a city by the sea.",
    "Explain what a prime number is and give examples.",
    "Write a letter thanking a teacher who helped you.",
    "What should someone pack for a week of hiking?",
    "Describe how bread rises when it is baked.",
    "Give advice to a student starting to learn the piano.",
    "Explain why the sky looks blue during the day.",
    "Write a poem about a lighthouse in a storm.",
    "How do bees make honey?",
    "Compare trains and planes for travelling across a country.",
    "Describe a day in the life of a farmer in spring.",
    "What are good habits for getting enough sleep?",
    "Explain how a library organises its books.",
    "Tell a fable about a fox and a crow with a moral.",
    "How would you teach a child to ride a bicycle?",
)
# 24 distinct prompts: a sweep over seeds 0-23 (examples/seed-sweep.sh) never repeats one.

# An input-grounded request: the answer repeats spans of the input, so prompt lookup finds hits.
LOOKUP_SOURCE = ("def moving_average(values, window):\n"
                 "    result = []\n"
                 "    for index in range(len(values) - window + 1):\n"
                 "        chunk = values[index:index + window]\n"
                 "        result.append(sum(chunk) / window)\n"
                 "    return result\n")


def prompt_for_seed(seed: int, offset: int = 0) -> str:
    return PROMPTS[(seed + offset) % len(PROMPTS)]


def lookup_prompt() -> str:
    return f"Repeat this Python function exactly, then rename `values` to `numbers`:\n\n{LOOKUP_SOURCE}"


def chat_inputs(tokenizer, prompt: str, device) -> dict:
    """input_ids/attention_mask of one user turn through the chat template (plain text without one)."""
    from harness.generation_basics import chat_input_ids

    return chat_input_ids(tokenizer, prompt, device)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# One greedy run


@dataclass
class GreedyRun:
    """A greedy generation of one prompt. tokens: the generated ids only; scores: the processed
    scores greedy chose from, logits: the raw logits, both (steps x vocab) float32 on CPU."""

    label: str
    prompt_length: int
    tokens: tuple[int, ...]
    scores: object
    logits: object
    seconds: float = 0.0
    target_forward_calls: int = 0
    assistant_forward_calls: int = 0
    cache: object = None
    sequence: object = None  # prompt + generated ids (1-D), to continue from

    @property
    def accepted_draft_tokens(self) -> int:
        """Tokens that came from drafts the target accepted: every target forward yields exactly one
        token of its own (the prefill's or the correction after the last accepted draft)."""
        return len(self.tokens) - self.target_forward_calls


@contextlib.contextmanager
def count_forward_calls(model):
    counter = [0]

    def hook(module, args, output):
        counter[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def cache_kwarg() -> str:
    """The name generate()/forward() take a cache under: `cache` from transformers 5.24 (the old
    `past_key_values` still works there, with a deprecation warning), `past_key_values` before."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return "cache" if "cache" in names else "past_key_values"


def output_cache(out):
    """The cache a generate() output or a forward output returns (`cache` from 5.24, else `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def generate_greedy(model, inputs: dict, *, label: str, new_tokens: int | None = None, pad_token_id: int,
                    assistant_model=None, **kwargs) -> list[GreedyRun]:
    """model.generate() greedy with scores and raw logits; one GreedyRun per batch row.
    kwargs go to generate (use_cache, past_key_values, cache_implementation, prompt_lookup_num_tokens, ...)."""
    import torch

    n = new_tokens or new_tokens_default()
    prompt_length = inputs["input_ids"].shape[1]
    with contextlib.ExitStack() as stack:
        target_calls = stack.enter_context(count_forward_calls(model))
        assistant_calls = stack.enter_context(count_forward_calls(assistant_model)) if assistant_model is not None else [0]
        if assistant_model is not None:
            kwargs["assistant_model"] = assistant_model
        stack.enter_context(torch.inference_mode())
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_scores=True, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=pad_token_id, **kwargs)
        _synchronize(model.device)
        seconds = time.perf_counter() - start
    scores = torch.stack(out.scores, dim=1).float().cpu()
    logits = torch.stack(out.logits, dim=1).float().cpu()
    runs = []
    for row in range(out.sequences.shape[0]):
        runs.append(GreedyRun(label=label, prompt_length=prompt_length,
                              tokens=tuple(out.sequences[row, prompt_length:].tolist()),
                              scores=scores[row], logits=logits[row], seconds=seconds,
                              target_forward_calls=target_calls[0], assistant_forward_calls=assistant_calls[0],
                              cache=output_cache(out), sequence=out.sequences[row]))
    return runs


def greedy(model, inputs: dict, *, label: str, pad_token_id: int, **kwargs) -> GreedyRun:
    """generate_greedy for a batch of one."""
    if inputs["input_ids"].shape[0] != 1:
        raise HarnessUsageError("greedy() takes one prompt; use generate_greedy() for batches")
    return generate_greedy(model, inputs, label=label, pad_token_id=pad_token_id, **kwargs)[0]


def no_cache_run(model, inputs, *, pad_token_id: int, new_tokens: int | None = None) -> GreedyRun:
    """The reference: every step recomputes attention over the whole sequence."""
    return greedy(model, inputs, label="no cache", pad_token_id=pad_token_id, new_tokens=new_tokens, use_cache=False)


def _synchronize(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Cache types


def layer_types(model) -> list[str]:
    """'full_attention' / 'sliding_attention' / ... per decoder layer, as transformers' caches see them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    return list(types)


def has_sliding_layers(model) -> bool:
    return any(t in ("sliding_attention", "chunked_attention") for t in layer_types(model))


def supports_static_cache(model) -> str | None:
    """None when StaticCache applies, else the reason it does not."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not declare static-cache/compile support in transformers"
    if getattr(model.config, "alibi", False):
        # Falcon sizes its ALiBi bias from the attention mask, not the static cache's length.
        return f"{type(model).__name__} with ALiBi builds its bias for the mask length, not a static cache (transformers limitation)"
    return None


def fp8_kv_available() -> bool:
    from transformers import cache_utils

    return hasattr(cache_utils, "Fp8QuantizedLayer")


@dataclass(frozen=True)
class CacheType:
    """A KV cache transformers offers. build(model, max_cache_len) returns a fresh cache object;
    not_applicable(model, device) is None or the reason to skip. lossy: stores K/V in fewer bits,
    so it is compared with its own looser rule, never the exact one."""

    name: str
    description: str
    build: Callable
    not_applicable: Callable = field(default=lambda model, device: None)
    lossy: bool = False


def _dynamic(model, max_cache_len):
    from transformers import DynamicCache

    return DynamicCache()


def _dynamic_with_config(model, max_cache_len):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _static(model, max_cache_len, offloading: bool = False):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len, offloading=offloading)


def _offloaded(model, max_cache_len):
    from transformers import DynamicCache

    return DynamicCache(config=model.config, offloading=True)


def _quantized(backend: str):
    def build(model, max_cache_len):
        from transformers import QuantizedCache

        if backend == "fp8":
            return QuantizedCache(backend="fp8", config=model.config)
        # residual_length keeps the newest tokens unquantised; set it below N so the comparison
        # really reads quantised keys/values.
        return QuantizedCache(backend=backend, config=model.config, nbits=4, q_group_size=16, residual_length=8)

    return build


def _needs_sliding(model, device):
    return None if has_sliding_layers(model) else "model has no sliding-window layers (nothing for a window cache to drop)"


def _needs_accelerator(model, device):
    if getattr(device, "type", str(device)) == "cpu":
        return "offloading moves cache layers from an accelerator to CPU; this run is on CPU"
    return None


def _static_needs(offloading: bool):
    def check(model, device):
        return (offloading and _needs_accelerator(model, device)) or supports_static_cache(model)

    return check


def _quantized_needs(backend: str):
    packages = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}

    def check(model, device):
        import transformers

        if backend == "fp8" and not fp8_kv_available():
            return f"transformers {transformers.__version__} has no fp8 KV-cache backend (added after 5.17)"
        if backend in packages:
            module, dist = packages[backend]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"QuantizedCache backend {backend!r} needs the package {dist}, which is not installed"
        if has_sliding_layers(model):
            return "QuantizedCache supports full-attention layers only; this model has sliding-window layers"
        return None

    return check


CACHE_TYPES: dict[str, CacheType] = {c.name: c for c in [
    CacheType("dynamic", "DynamicCache without a config: full-length layers, grows by concatenation", _dynamic),
    CacheType("sliding-window", "DynamicCache(config): sliding-window layers keep only the window",
              _dynamic_with_config, _needs_sliding),
    CacheType("static", "StaticCache: preallocated max_cache_len slots (sliding/hybrid layers per the config)",
              _static, _static_needs(False)),
    CacheType("offloaded", "DynamicCache(offloading=True): layers parked on CPU between uses",
              _offloaded, _needs_accelerator),
    CacheType("offloaded-static", "StaticCache(offloading=True)",
              lambda model, n: _static(model, n, offloading=True), _static_needs(True)),
    CacheType("quantized-quanto", "QuantizedCache, quanto int4 backend", _quantized("quanto"), _quantized_needs("quanto"), lossy=True),
    CacheType("quantized-hqq", "QuantizedCache, HQQ int4 backend", _quantized("hqq"), _quantized_needs("hqq"), lossy=True),
    CacheType("quantized-fp8", "QuantizedCache, fp8 e4m3 per-tensor backend", _quantized("fp8"), _quantized_needs("fp8"), lossy=True),
]}


def get_cache_type(name: str) -> CacheType:
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise HarnessUsageError(f"unknown cache type {name!r}; known: {', '.join(CACHE_TYPES)}") from None


def cached_run(model, inputs, cache_type: CacheType | str, *, pad_token_id: int, new_tokens: int | None = None,
               **kwargs) -> GreedyRun:
    """Greedy run with a fresh cache of `cache_type` passed as past_key_values."""
    kind = get_cache_type(cache_type) if isinstance(cache_type, str) else cache_type
    n = new_tokens or new_tokens_default()
    cache = kind.build(model, inputs["input_ids"].shape[1] + n)
    kwargs[cache_kwarg()] = cache
    # On GPU generate() would compile the decode step of a static cache by itself; the compiled
    # path has its own test, so this one stays eager.
    kwargs.setdefault("disable_compile", True)
    return greedy(model, inputs, label=f"{kind.name} cache", pad_token_id=pad_token_id, new_tokens=n, **kwargs)


# ---------------------------------------------------------------------------------------------
# Continuation, reset, crop


def second_turn_inputs(tokenizer, first_prompt: str, first_run: GreedyRun, second_prompt: str, device) -> dict:
    """Turn 2 of a chat as ids that extend turn 1's ids exactly (prompt + answer tokens), so a
    cache filled by turn 1 is a true prefix. The suffix comes from the chat template's own text."""
    import torch

    answer = tokenizer.decode(list(first_run.tokens), skip_special_tokens=True)
    turns = [{"role": "user", "content": first_prompt}]
    first_text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": answer},
                                                       {"role": "user", "content": second_prompt}],
                                              tokenize=False, add_generation_prompt=True)
    head = first_text + answer
    if not full_text.startswith(head):
        raise HarnessUsageError("the chat template does not render turn 1 as a prefix of turn 2; "
                                "cannot build a continuation test for this tokenizer")
    suffix = tokenizer(full_text[len(head):], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([first_run.sequence.cpu(), suffix]).unsqueeze(0).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def crop_cache(cache, tokens_to_remove: int) -> None:
    """Roll a dynamic cache back by `tokens_to_remove` (the call assisted decoding makes)."""
    if tokens_to_remove <= 0:
        raise HarnessUsageError(f"crop_cache: tokens_to_remove must be positive, got {tokens_to_remove}")
    # 5.17 deprecates and 5.24 rejects a positive argument (the old 'keep this many' meaning).
    cache.crop(-tokens_to_remove)


def reset_cache(cache) -> None:
    """cache.reset(), under inference mode like the generate() calls that filled it."""
    import torch

    with torch.inference_mode():
        cache.reset()


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """Every id generate() treats as end of sequence (and min_new_tokens masks): the generation
    config's (an int or a list) plus the tokenizer's own."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


# ---------------------------------------------------------------------------------------------
# Batching


def batch_inputs(tokenizer, prompts: list[str], device) -> dict:
    """Chat-templated prompts of different lengths, left-padded into one batch."""
    from harness.generation_basics import chat_input_ids

    rows = [chat_input_ids(tokenizer, p, "cpu")["input_ids"][0] for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer.pad({"input_ids": [r.tolist() for r in rows]}, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items()}


# ---------------------------------------------------------------------------------------------
# Static cache + torch.compile


def compile_mode_for(device) -> str:
    """'reduce-overhead' (CUDA graphs) on GPU, inductor's default mode elsewhere."""
    return "reduce-overhead" if getattr(device, "type", str(device)) == "cuda" else "default"


@dataclass
class CompiledRuns:
    first: GreedyRun  # includes compilation
    steady: GreedyRun  # same prompt, graphs already built
    mode: str

    @property
    def compile_seconds(self) -> float:
        return max(self.first.seconds - self.steady.seconds, 0.0)

    @property
    def steady_step_seconds(self) -> float:
        return self.steady.seconds / max(len(self.steady.tokens), 1)


def compiled_static_runs(model, inputs, *, pad_token_id: int, new_tokens: int | None = None,
                         mode: str | None = None) -> CompiledRuns:
    """generate() with a StaticCache and transformers' own torch.compile of the decode step
    (CompileConfig), twice: the first call compiles, the second is steady state."""
    from transformers.generation import CompileConfig

    mode = mode or compile_mode_for(model.device)
    config = CompileConfig(mode=mode, fullgraph=False)
    # generate() compiles on accelerators only unless told to; the flag is how it is told (5.17+).
    config._compile_all_devices = True
    runs = [greedy(model, inputs, label=f"static cache + torch.compile ({mode})", pad_token_id=pad_token_id,
                   new_tokens=new_tokens, cache_implementation="static", compile_config=config)
            for _ in range(2)]
    return CompiledRuns(runs[0], runs[1], mode)


# ---------------------------------------------------------------------------------------------
# Assisted and prompt-lookup decoding


def decoder_layers(model):
    """The nn.ModuleList of decoder blocks (Llama-style `.model.layers`, GPT-2/Falcon `.transformer.h`)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if layers is not None:
            return layers
    raise HarnessUsageError(f"{type(model).__name__}: cannot find its decoder layers to build a truncated assistant")


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
    from harness.presets import TOKENIZER_VOCAB, build_preset

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

"""Greedy runs with and without a KV cache, every cache type transformers offers, assisted and
prompt-lookup decoding: each returns a GreedyRun (tokens + per-step scores and raw logits) that
harness.equivalence.token_agreement compares with the plain no-cache run.

Lengths are forced (min_new_tokens = max_new_tokens = N, N = $HARNESS_NEW_TOKENS, default 32) so
an early EOS can never make a comparison vacuous. Works with transformers 5.17 and 5.24: 5.24
renamed `past_key_values` to `cache` (generate still accepts the old name) and added an fp8 KV
backend; both differences are handled here.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

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
    from harness.inference.generation_basics import chat_input_ids

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
    from harness.inference.generation_basics import chat_input_ids

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

"""Random-initialised models built from configs: tiny ones for CPU tests, large ones for GPU work.

Tiny presets cover the architecture families the seeds discuss (RoPE+GQA, sliding window,
learned absolute positions + MHA, ALiBi, multi-query, Qwen2). They share the default model's
tokenizer (vocabulary 49152) so every suite can feed them the same text.
Large presets are 1B/7B-shaped Llama/Mistral configs for memory and speed work; their weights are
random, which the report states.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from harness.errors import HarnessUsageError

TOKENIZER_VOCAB = 49152
TINY_SEED = 1234


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    description: str
    make_config: Callable[[], object]
    large: bool = False


def _tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)


def _tiny_mistral():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=TOKENIZER_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _tiny_falcon_alibi():
    from transformers import FalconConfig

    return FalconConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=True,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _tiny_falcon_mqa():
    from transformers import FalconConfig

    return FalconConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        alibi=False, multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _tiny_qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)


def _llama(hidden, inter, layers, heads, kv_heads, vocab=32000, ctx=4096, tied=False):
    def make():
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=ctx,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)

    return make


def _mistral_7b():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny:llama", "llama", "Llama-style RoPE + GQA (4 query / 2 KV heads)", _tiny_llama),
    Preset("tiny:mistral", "mistral", "Mistral-style sliding window (16 tokens) + GQA", _tiny_mistral),
    Preset("tiny:gpt2", "gpt2", "GPT-2-style learned absolute positions + MHA", _tiny_gpt2),
    Preset("tiny:falcon-alibi", "falcon", "Falcon with ALiBi position biases, MHA", _tiny_falcon_alibi),
    Preset("tiny:falcon-mqa", "falcon", "Falcon multi-query attention (one KV head) + RoPE", _tiny_falcon_mqa),
    Preset("tiny:qwen2", "qwen2", "Qwen2 RoPE + GQA with QKV bias", _tiny_qwen2),
    Preset("random:llama-1b", "llama", "1B-shaped Llama (Llama-3.2-1B dims), random weights",
           _llama(2048, 8192, 16, 32, 8, vocab=128256, ctx=16384, tied=True), large=True),
    Preset("random:llama-7b", "llama", "7B-shaped Llama (Llama-2-7B dims), random weights",
           _llama(4096, 11008, 32, 32, 32, vocab=32000, ctx=16384), large=True),
    Preset("random:mistral-7b", "mistral", "7B-shaped Mistral (GQA 32/8, sliding window 4096), random weights",
           _mistral_7b, large=True),
]}

TINY_PRESETS = tuple(name for name, p in PRESETS.items() if not p.large)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise HarnessUsageError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


# A tiny preset's initial weights by (name, dtype, seed): every variant, pytester run and suite of a
# process builds the same presets again (~130 builds in `make test`), and transformers' random
# initialisation was most of each build; later builds skip it and copy the remembered weights.
_TINY_WEIGHTS: dict[tuple, dict] = {}


def build_preset(name: str, device, dtype, seed: int = TINY_SEED, attn_implementation: str = "eager"):
    """Instantiate a preset with a fixed seed directly on `device` (no CPU copy for large ones)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # a release without it initialises every build
        no_init_weights = None
    preset = get_preset(name)
    config = preset.make_config()
    device_type = torch.device(device).type
    remembering = device_type == "cpu" and not preset.large and no_init_weights is not None
    key = (name, str(dtype), seed)
    remembered = _TINY_WEIGHTS.get(key) if remembering else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device_type == "cuda":
            torch.cuda.manual_seed_all(seed)
        with torch.device(device), (no_init_weights() if remembered is not None else contextlib.nullcontext()):
            # chosen at construction: some families (Falcon) cannot switch implementation afterwards
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if remembered is not None:
        model.load_state_dict(remembered, strict=True)
        model.tie_weights()  # no_init_weights skipped init_weights(), which ties them
    elif remembering:
        _TINY_WEIGHTS[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    return model

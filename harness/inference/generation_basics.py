"""Small generation helpers shared by suites: chat prompts with forced lengths, GGUF headers."""

from __future__ import annotations

from pathlib import Path


def chat_input_ids(tokenizer, prompt: str, device):
    """Token ids of a one-turn chat (the model's chat template), ready for generate()."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def chat_greedy_tokens(model, tokenizer, prompt: str, max_new_tokens: int = 32, min_new_tokens: int = 0) -> list[int]:
    """The token ids of the greedy answer to one chat turn (min_new_tokens forces its length)."""
    import torch

    inputs = chat_input_ids(tokenizer, prompt, model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def chat_greedy(model, tokenizer, prompt: str, max_new_tokens: int = 32, min_new_tokens: int = 0) -> str:
    """Greedy answer to one chat turn, special tokens stripped."""
    return tokenizer.decode(chat_greedy_tokens(model, tokenizer, prompt, max_new_tokens, min_new_tokens),
                            skip_special_tokens=True)


def gguf_header_for(spec) -> dict | None:
    from harness.models.loading import check_gguf, default_gguf_path

    if spec.kind == "default":
        return check_gguf(default_gguf_path())
    if spec.kind == "gguf":
        return check_gguf(Path(spec.location))
    return None

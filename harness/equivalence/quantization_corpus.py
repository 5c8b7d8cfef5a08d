"""What the quantization suite feeds the models and reads back: the bundled corpus (harness/data/corpus)
cut into windows and the logits at the positions llama.cpp scores (greedy chat answers:
harness.inference.generation_basics.chat_greedy_tokens).

As in llama.cpp (`perplexity --kl-divergence`), each window of the corpus is evaluated from its start
and only the logits of its second half are scored, so every scored token sees at least half a window
of context.
"""

from __future__ import annotations

import json

from harness.config import DATA_DIR
from harness.errors import HarnessUsageError

CORPUS_DIR = DATA_DIR / "corpus"


def corpus_text() -> str:
    """The bundled evaluation corpus (prose and code), files in name order, separated by blank lines."""
    files = sorted(p for p in CORPUS_DIR.iterdir() if p.suffix == ".txt")
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def chat_prompts() -> list[str]:
    return list(json.loads((CORPUS_DIR / "chat_prompts.json").read_text(encoding="utf-8"))["prompts"])


def corpus_windows(tokenizer, window: int, count: int | None = None):
    """The corpus as `count` (default: as many as fit) non-overlapping windows of `window` tokens."""
    import torch

    if window < 4:
        raise HarnessUsageError(f"quantization window of {window} tokens: use at least 4")
    ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
    fits = len(ids) // window
    if fits == 0 or (count is not None and count > fits):
        raise HarnessUsageError(f"the bundled corpus has {len(ids)} tokens: {count or 1} window(s) of {window} "
                                f"do not fit (at most {fits})")
    n = fits if count is None else count
    return torch.tensor(ids[:n * window], dtype=torch.long).reshape(n, window)


def scored_mask(windows):
    """llama.cpp's scoring: logits at positions window/2 .. window-2 (each predicts the next token)."""
    import torch

    n, w = windows.shape
    mask = torch.zeros(n, w, dtype=torch.bool)
    mask[:, w // 2: w - 1] = True
    return mask


def next_token_targets(windows):
    """target_ids[i, t] = windows[i, t + 1]; the last column has no target (-1, never scored)."""
    import torch

    return torch.cat([windows[:, 1:], torch.full_like(windows[:, :1], -1)], dim=1)


def window_logits(model, windows, mask, batch_size: int = 2):
    """fp32 logits at the scored positions, (n_scored, vocab), on the CPU."""
    import torch

    device = model.device
    out = []
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            logits = model(batch.to(device)).logits
            out.append(logits[mask[start:start + batch_size].to(device)].float().cpu())
    return torch.cat(out)

"""Does a checkpoint behave like trained weights? Quality checks mean nothing on random weights.

A model whose next-token distribution over ordinary English prose is almost uniform has learned
nothing: its quality failures (no "Paris", no needle retrieved, quantization agreement below a
trained model's) are about the weights, not about the optimisation under test, and the report
says so instead of blaming the harness or the kernel. Measured as the mean entropy of the
next-token distribution over the bundled corpus's first window, as a fraction of ln(vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_TOKENS = 128


@dataclass(frozen=True)
class WeightsEvidence:
    entropy_nats: float
    uniform_nats: float
    tokens: int

    @property
    def fraction(self) -> float:
        return self.entropy_nats / self.uniform_nats

    def untrained(self, limit: float) -> bool:
        return self.fraction >= limit

    def describe(self) -> str:
        return (f"mean next-token entropy {self.entropy_nats:.2f} nats over {self.tokens} tokens of the bundled prose "
                f"is {self.fraction:.2f} of a uniform distribution's {self.uniform_nats:.2f}")


def next_token_entropy(model, tokenizer) -> WeightsEvidence:
    import torch

    from harness.equivalence.quantization_corpus import corpus_text

    ids = tokenizer(corpus_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :WINDOW_TOKENS]
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    return WeightsEvidence(entropy, math.log(logits.shape[-1]), int(ids.shape[1]))

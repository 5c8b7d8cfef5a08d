"""Equivalence: the rules that say whether an optimized run still computes the same thing.

- ``tolerances``: every numeric rule once, with the measurement behind each number;
- ``compare``: a tensor against the truth, k x as far as the trusted implementation is;
- ``token_agreement``: two greedy generations, with the reference's own top-k margin;
- ``attention_cases`` / ``attention_model`` / ``layer_attention`` / ``positions``: attention at kernel,
  layer and model level, and independent RoPE/ALiBi maths;
- ``quantization``: quantized against reference (KL divergence, top-token agreement, perplexity);
- ``niah``: needle-in-a-haystack retrieval over a length x depth grid;
- ``serving_compare``: a served request against the same request decoded alone.
"""

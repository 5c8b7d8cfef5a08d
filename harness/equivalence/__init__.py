"""Equivalence: the rules that say whether an optimized run still computes the same thing.

- ``tolerances``: every numeric rule once, with the measurement behind each number;
- ``compare``: a tensor against the truth, k x as far as the trusted implementation is;
- ``token_agreement``: two greedy generations, with the reference's own top-k margin;
- ``prompt_logits``: the same rule's logits bound at every position of a forward over the prompt;
- ``attention_cases`` / ``attention_model`` / ``layer_attention`` / ``positions``: attention at kernel,
  layer and model level, and independent RoPE/ALiBi maths;
- ``quantization_*``: quantized against reference (``_agreement``: KL divergence, top-token agreement,
  perplexity; ``_corpus``, ``_layers``, ``_footprint``, ``_thresholds``);
- ``niah``: needle-in-a-haystack retrieval over a length x depth grid (``niah_views``: its table, heatmap);
- ``serving_compare``: a served request against the same request decoded alone.
"""

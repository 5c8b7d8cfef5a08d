"""Models: what to load and how (``loading``: the embedded default, local dirs, GGUF, hub cache),
random-initialised ``presets``, what a model accepts (``capabilities``), the per-run ``factory`` of
variants within a memory policy, the sizing of references before they are built
(``reference_sizing``) and building them as sized (``reference_build``), and whether weights look
trained (``weights``).
"""

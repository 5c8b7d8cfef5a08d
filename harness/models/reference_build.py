"""Building and running the upcast reference where a harness.models.reference_sizing.ReferencePlan
places it: on the device, with its decoder layers streamed from host memory one at a time
(``layers``), or on the CPU with its outputs moved back to the device (``cpu``). The copy is made
tensor by tensor straight into the reference dtype, and its weights are released after use.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from harness.models.reference_sizing import PLACEMENTS, ReferencePlan
from harness.performance.memory import release_device_memory

__all__ = ["decoder_layers", "upcast_copy", "streamed_layers", "planned_reference", "reference_outputs"]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers: the ModuleList with one entry per hidden layer."""
    n = model.config.num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no ModuleList of {n} decoder layers")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def upcast_copy(model, dtype, device=None, layers_device=None):
    """A deep copy of ``model`` with its floating-point parameters and buffers in ``dtype``, made
    one tensor at a time straight into ``device`` (default: where each tensor is), decoder layers
    into ``layers_device`` (default: ``device``). Never holds a second copy in the model's dtype.
    Tied weights stay tied (copy.deepcopy's memo)."""
    layer_ids = set()
    if layers_device is not None:
        layer_ids = {id(t) for t in [*decoder_layers(model).parameters(), *decoder_layers(model).buffers()]}
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        target = layers_device if id(t) in layer_ids else device
        target = t.device if target is None else torch.device(target)
        new = t.detach().to(device=target, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        if isinstance(t, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        memo[id(t)] = new
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def streamed_layers(model, device):
    """Run ``model``'s decoder layers (kept in host memory) on ``device``, one at a time: each
    layer's tensors are copied there just before its forward and dropped just after."""
    device = torch.device(device)
    handles = []
    for layer in decoder_layers(model):
        tensors = [*layer.parameters(), *layer.buffers()]
        host = [t.data for t in tensors]

        def load(module, args, tensors=tensors, host=host):
            for t, h in zip(tensors, host):
                t.data = h.to(device, non_blocking=True)

        def unload(module, args, output, tensors=tensors, host=host):
            for t, h in zip(tensors, host):
                t.data = h

        handles += [layer.register_forward_pre_hook(load), layer.register_forward_hook(unload)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _outputs_to(out, device):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=out.logits.to(device),
                                  hidden_states=tuple(h.to(device) for h in out.hidden_states))


@contextlib.contextmanager
def planned_reference(model, plan: ReferencePlan, reference_dtype):
    """Yields the upcast reference of ``model`` placed as ``plan`` says (``layers``: its decoder
    layers stream from host memory during every forward inside the block; ``cpu``: on the CPU, so
    its inputs must be there). Its weights are released when the block ends."""
    from harness.equivalence.attention_model import upcast_reference

    if plan.placement not in PLACEMENTS:
        raise ValueError(f"placement {plan.placement!r}: one of {PLACEMENTS}")
    device = next(model.parameters()).device
    reference = upcast_reference(model, reference_dtype, device="cpu" if plan.placement == "cpu" else None,
                                 layers_device="cpu" if plan.placement == "layers" else None)
    try:
        with (streamed_layers(reference, device) if plan.placement == "layers" else contextlib.nullcontext()):
            yield reference
    finally:
        del reference
        release_device_memory(device)


def reference_outputs(model, input_ids, attention_mask, plan: ReferencePlan, reference_dtype):
    """The upcast reference's forward (every hidden state and the logits, no KV cache) as ``plan``
    says, returned on the inputs' device; the reference's weights are released before returning."""
    from harness.equivalence.attention_model import model_forward, reference_context

    device = input_ids.device
    with planned_reference(model, plan, reference_dtype) as reference:
        if plan.placement == "cpu":
            return _outputs_to(model_forward(reference, input_ids.cpu(), attention_mask.cpu(), reference_context,
                                             use_cache=False), device)
        return model_forward(reference, input_ids, attention_mask, reference_context, use_cache=False)

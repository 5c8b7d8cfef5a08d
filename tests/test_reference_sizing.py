"""harness.models.reference_sizing: the references and comparisons the harness builds itself are sized
from its memory predictions before they are built (issue 13: the fp32 reference of a 7B model over
its whole 16384-token window ran an H200 out of memory).

Fake free-memory numbers stand for the device: too little for the whole window must give a shorter
one (the longest that fits), too little for any must give a skip that states both numbers, plenty
must give the whole window. Each fails if the plan ignored the free memory.
"""

import pytest
import torch

from harness.models import reference_build, reference_sizing as rs
from harness.config import format_bytes

GiB = 2**30

# 7B-Llama-like numbers, written out so the test does not depend on a model config
SHAPE = rs.ComparisonShape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, dtype_bytes=2,
                           reference_bytes=4, reference_weights=27 * GiB,
                           reference_layer_weights=27 * GiB // 34)
WINDOW, MINIMUM = 16384, 1024


def need(length, placement="device"):
    return rs._with_headroom(max(rs.predict_comparison_bytes(SHAPE, length, placement).values()))


def test_prediction_grows_with_the_prompt_and_counts_the_upcast_weights():
    short, long = need(1024), need(WINDOW)
    assert SHAPE.reference_weights < short < long
    # at the whole window the N^2 reference scores dominate: 3 fp32 score tensors of 32 x N x N
    assert long > 3 * 32 * WINDOW * WINDOW * 4
    assert need(1024, "layers") < short - 20 * GiB  # one layer of upcast weights, not 27 GiB
    assert need(1024, "cpu") < need(1024, "layers")


def test_plenty_of_free_memory_gives_the_whole_window():
    free = need(WINDOW) + GiB
    plan = rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free)
    assert (plan.length, plan.placement, plan.skip) == (WINDOW, "device", None)
    assert plan.note.startswith(f"reference on all {WINDOW} tokens")
    assert format_bytes(free) in plan.note


def test_little_free_memory_gives_the_longest_window_that_fits():
    free = 60 * GiB
    assert need(WINDOW) > free > need(MINIMUM)
    plan = rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free)
    assert plan.skip is None and plan.placement == "device"
    assert MINIMUM <= plan.length < WINDOW, plan
    assert plan.need_bytes == need(plan.length) <= free
    assert need(plan.length + rs.LENGTH_STEP) > free, "not the longest prompt that fits"
    assert plan.length % rs.LENGTH_STEP == 0
    # the note says what was done, with the prediction for the whole window and the free bytes
    assert f"reference on {plan.length} of {WINDOW} tokens" in plan.note
    assert format_bytes(need(WINDOW)) in plan.note and format_bytes(free) in plan.note
    details = plan.details()
    assert details["reference_tokens"] == plan.length and details["device_free_bytes"] == free


def test_less_free_memory_gives_a_shorter_window():
    lengths = [rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free * GiB).length
               for free in (120, 80, 50)]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == 3, lengths


def test_weights_that_do_not_fit_stream_layer_by_layer_then_run_on_the_cpu():
    free = (need(MINIMUM, "layers") + need(MINIMUM)) // 2  # a layer fits, the whole upcast copy does not
    plan = rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free, host_free_bytes=100 * GiB)
    assert plan.placement == "layers" and plan.length >= MINIMUM and plan.skip is None
    assert "layer by layer" in plan.note
    plan = rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free, host_free_bytes=100 * GiB,
                             placements=("device", "cpu"))
    assert (plan.placement, plan.length) == ("cpu", MINIMUM) and "on the CPU" in plan.note


def test_nothing_fits_gives_a_skip_with_the_predicted_and_the_free_bytes():
    free = 2 * GiB
    plan = rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free, host_free_bytes=100 * GiB)
    assert plan.skip, plan
    assert format_bytes(free) in plan.skip
    for placement in rs.PLACEMENTS:
        assert format_bytes(need(MINIMUM, placement)) in plan.skip, (placement, plan.skip)
    assert f"{MINIMUM} tokens" in plan.skip


def test_host_memory_that_cannot_take_the_upcast_copy_is_no_way_out():
    free = (need(MINIMUM, "layers") + need(MINIMUM)) // 2
    plan = rs.plan_reference(SHAPE, requested=WINDOW, minimum=MINIMUM, free_bytes=free, host_free_bytes=4 * GiB)
    assert plan.skip and "host" in plan.skip and format_bytes(4 * GiB) in plan.skip


def test_a_window_shorter_than_the_minimum_is_taken_whole():
    plan = rs.plan_reference(SHAPE, requested=512, minimum=MINIMUM, free_bytes=need(512))
    assert (plan.length, plan.skip) == (512, None)


def test_the_cpu_is_not_sized():
    """CI: the whole request and the float64 reference on the device as before; no note."""
    from harness.models.presets import build_preset

    model = build_preset("tiny:llama", torch.device("cpu"), torch.float32)
    plan = rs.plan_model_reference(model, torch.device("cpu"), torch.float32, torch.float64, requested=1024,
                                   minimum=1024)
    assert (plan.length, plan.placement, plan.skip, plan.note, plan.sized) == (1024, "device", None, "", False)


def test_prediction_from_a_config_uses_the_harness_memory_predictions():
    from harness.performance.predictions import parameter_counts, predict_weight_bytes
    from harness.models.presets import get_preset

    config = get_preset("random:llama-7b").make_config()
    shape = rs.comparison_shape(config, torch.bfloat16, torch.float32)
    assert shape.reference_weights == predict_weight_bytes(parameter_counts(config), torch.float32).bytes
    assert (shape.layers, shape.hidden, shape.vocab, shape.dtype_bytes, shape.reference_bytes) == (32, 4096, 32000, 2, 4)
    # the failure: a 16384-token fp32 reference beside two bf16 7B variants on a 139 GiB card
    plan = rs.plan_reference(shape, requested=16384, minimum=1024, free_bytes=113 * GiB)
    assert plan.skip is None and 1024 <= plan.length < 16384


@pytest.mark.parametrize("placement", ["layers", "cpu"])
@pytest.mark.parametrize("preset", ["tiny:llama", "tiny:gpt2"])
def test_streamed_and_cpu_references_give_the_device_reference_bit_for_bit(placement, preset):
    from harness.equivalence.attention_model import model_forward, reference_context, upcast_reference
    from harness.models.presets import build_preset

    model = build_preset(preset, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    want = model_forward(upcast_reference(model, torch.float64), ids, mask, reference_context, use_cache=False)
    plan = rs.ReferencePlan(length=40, requested=40, placement=placement)
    got = reference_build.reference_outputs(model, ids, mask, plan, torch.float64)
    assert got.logits.dtype == torch.float64
    assert torch.equal(got.logits, want.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states, strict=True))


def test_upcast_copy_keeps_ties_and_leaves_the_model_alone():
    from harness.models.presets import build_preset

    model = build_preset("tiny:gpt2", torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = reference_build.upcast_copy(model, torch.float64)
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    assert {p.dtype for p in copy.parameters()} == {torch.float64}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""Tensor parallelism: the model split over 2, 4 or 8 ranks by transformers' own plan
(tp_plan="auto", one torchrun process per rank, harness.inference.tp_worker) gives the logits and greedy
tokens of the single-device run, by the rules every suite uses.

On CUDA each rank count up to the visible GPUs runs with nccl; on CPU two gloo processes check the
same path. NVLink multicast is off in every process (harness.inference.distributed). Under pytest-xdist a
worker owns one GPU, so these tests skip there: run this file on its own, without -n.
"""

import os

import pytest

from harness.equivalence.prompt_logits import compare_prompt_logits
from harness.gpu_workers import PINNED_GPU_ENV
from harness.inference.tensor_parallel import TP_RANK_COUNTS, TPSession, rank_count_skip_reason
from harness.inference.generation import new_tokens_default
from harness.equivalence.token_agreement import compare_runs


@pytest.fixture(scope="session")
def tp_session(run_config, device, dtype, tmp_path_factory, computed_once_per_run):
    from harness.models.loading import load_tokenizer, resolve_model

    specs = [s for text in run_config.models for s in resolve_model(
        text, allow_remote_code=run_config.allow_remote_code, allow_pickle=run_config.allow_pickle)]
    return TPSession(specs, device, dtype, run_config.seed, new_tokens_default(), tmp_path_factory.mktemp("tp-models"),
                     tokenizer_for=load_tokenizer, computed_once=computed_once_per_run)


def _visible_gpus(device) -> int:
    import torch

    return torch.cuda.device_count() if device.type == "cuda" else 0


@pytest.fixture(params=TP_RANK_COUNTS, ids=lambda n: f"{n}ranks")
def ranks(request, device):
    reason = rank_count_skip_reason(request.param, device.type, _visible_gpus(device), os.environ.get(PINNED_GPU_ENV))
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def tp_run(ranks, model_spec, tp_session):
    reason = tp_session.split_skip_reason(model_spec, ranks)
    if reason:
        pytest.skip(reason)
    try:
        return tp_session.tp_run(model_spec, ranks)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def single_device(tp_run, model_spec, tp_session, request):
    """The same model on one device, same dtype, eager attention, same prompt: run once per model,
    and only for models that have a TP run."""
    return tp_session.single_device(model_spec, lambda: request.getfixturevalue("reference_model"))


def test_weights_are_really_split_across_ranks(tp_run, single_device, record_result):
    """Guards the comparisons below: a model loaded whole on every rank would pass them vacuously."""
    fraction = tp_run.local_parameters / single_device.parameters
    record_result("tensor parallel", "rank 0 parameter fraction", round(fraction, 4), threshold="< 1",
                  passed=fraction < 1, where=f"{tp_run.ranks} ranks")
    assert fraction < 1, (f"rank 0 of {tp_run.ranks} holds all {single_device.parameters} parameters: tp_plan='auto' "
                          f"did not shard {tp_run.name}, so the TP comparisons would compare the model with itself")


def test_prompt_logits_match_single_device(tp_run, single_device, tp_session, tolerances, record_result):
    agreement = compare_prompt_logits(single_device.logits, tp_run.logits, dtype_name=tp_session.dtype_name,
                                      tolerances=tolerances, label=f"{tp_run.name} over {tp_run.ranks} ranks vs single device")
    record_result("tensor parallel", "max relative logit error", agreement.max_error, threshold=agreement.limit,
                  passed=agreement.passed, where=f"{tp_run.ranks} ranks, prompt position {agreement.worst_position}")
    assert agreement.passed, agreement.message


def test_greedy_tokens_match_single_device(tp_run, single_device, tp_session, tolerances, tokenizer, record_result):
    agreement = compare_runs(single_device.greedy, tp_run.greedy, dtype_name=tp_session.dtype_name, tolerances=tolerances,
                             decode=(lambda t: tokenizer.decode([t])) if tokenizer is not None else None)
    record_result("tensor parallel", "greedy agreement", agreement.verdict, threshold="identical or near-tie",
                  passed=agreement.passed, where=f"{tp_run.ranks} ranks, step {agreement.step}",
                  max_logit_error=agreement.max_logit_error)
    assert agreement.passed, agreement.message

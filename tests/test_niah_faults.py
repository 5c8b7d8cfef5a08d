"""Planted faults: the long-context suite must fail, with a message that points at the fault, when

- the needle's answer is checked against the wrong span (the whole output, prompt included, so the
  needle in the prompt "answers" every question), or
- the middle of the prompt is truncated before it reaches the model (what an engine that cuts long
  prompts to fit does), which drops needles at middle depths.

Each fault runs the real suite file on SmolLM2-135M through pytester over a one-length grid; the
same grid without a fault passes, so the failures come from the faults. The last two tests show
the position references (harness.equivalence.positions) reject wrong position maths: a rotary module that
ignores its configured scaling, and ALiBi slopes on the wrong heads.
"""

import json
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "suites" / "test_long_context.py"
GRID = {"niah": {"lengths": [256], "depths": [50], "needles": 2}}

WRONG_SPAN = '''
import pytest
from harness.equivalence import niah

@pytest.fixture(autouse=True)
def answer_from_whole_output(monkeypatch):
    # FAULT: score the whole output (prompt + answer) instead of the generated span
    monkeypatch.setattr(niah, "answer_span", lambda sequence, answer_tokens: sequence)
'''

MIDDLE_TRUNCATION = '''
import pytest
from harness.equivalence import niah

@pytest.fixture(autouse=True)
def truncate_prompt_middle(monkeypatch):
    real = niah.generate_answer

    def generate(model, input_ids, answer_tokens, pad_token_id):
        # FAULT: keep the first and last quarter of the prompt, drop the middle half
        quarter = len(input_ids) // 4
        return real(model, input_ids[:quarter] + input_ids[-quarter:], answer_tokens, pad_token_id)

    monkeypatch.setattr(niah, "generate_answer", generate)
'''


@pytest.fixture
def run_suite(pytester):
    pytester.makepyfile(test_long_context_under_fault=SUITE.read_text())  # another name: the suite may be imported already
    (pytester.path / "grid.json").write_text(json.dumps(GRID))

    def run(conftest: str | None = None):
        if conftest:
            pytester.makeconftest(conftest)
        return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--model", "smollm2-135m",
                                            "--thresholds", "grid.json", "-k", "niah and not heatmap", "-rf")

    return run


def test_suite_passes_without_a_fault(run_suite):
    result = run_suite()
    result.assert_outcomes(passed=3)


def test_answer_checked_against_wrong_span_fails(run_suite):
    result = run_suite(WRONG_SPAN)
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*test_niah_prompts_hold_one_needle_and_the_scorer_reads_only_the_answer*",
                                 "*scorer accepts a wrong answer: it reads outside the generated answer span*"])


def test_prompt_middle_truncation_fails(run_suite):
    result = run_suite(MIDDLE_TRUNCATION)
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*AssertionError: needle retrieval at 256 tokens (*): 0% < 85.6%; missed:*",
                                 "*FAILED*test_niah_retrieval_accuracy_at_context_length*"])


# The position references must reject wrong position maths, not just agree with the model's.


def test_rope_reference_rejects_a_rotary_module_that_ignores_its_scaling():
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from harness.equivalence import positions as pos
    from harness.equivalence.tolerances import Tolerances
    from harness.models.presets import get_preset

    config = get_preset("tiny:llama").make_config()
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    unscaled_module = LlamaRotaryEmbedding(config=config)  # FAULT: the configured linear x4 is ignored
    scaled = pos.RopeSpec(head_dim=16, theta=10000.0, rope_type="linear", params={"factor": 4.0},
                          max_position_embeddings=config.max_position_embeddings)
    positions = torch.arange(2 * config.max_position_embeddings)[None]
    ref_cos, ref_sin, angles = pos.rope_cos_sin(scaled, positions)
    cos, sin = pos.model_rope_cos_sin(unscaled_module, positions)
    units, worst, _, _ = pos.rope_error_units(cos, sin, ref_cos, ref_sin, angles)
    assert units > 1000 * Tolerances().rope_error_units and worst > 0.5


def test_alibi_reference_rejects_reversed_head_slopes():
    import torch

    from harness.equivalence import positions as pos

    reference = pos.alibi_bias(4, 32)
    reversed_heads = reference.flip(0)  # FAULT: slopes assigned to heads in the wrong order
    causal = torch.isfinite(reference)
    assert (reversed_heads - reference).abs()[causal].max() > 1.0
    assert pos.alibi_slopes(4).tolist() == [0.25, 0.0625, 0.015625, 0.00390625]  # the paper's 2^(-8h/n)
    assert pos.alibi_slopes(6).tolist()[4:] == [2 ** -1, 2 ** -3]  # non-power-of-two rule: odd slopes of 2n

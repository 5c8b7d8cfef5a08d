"""A checkpoint with untrained weights gets quality verdicts that say so, not harness failures.

Issue 19: a user's random-initialised checkpoint failed "Paris" and the NIAH grid as plain
failures. The harness measures whether the weights behave as trained (harness.models.weights: next-token
entropy over the bundled prose vs uniform) and makes quality checks expected failures with that
explanation; the trained default model is not flagged.
"""

import json
from pathlib import Path

import pytest
import torch

from harness.equivalence.tolerances import Tolerances
from harness.models.loading import load_model, load_tokenizer, resolve_model
from harness.models.presets import build_preset
from harness.models.weights import next_token_entropy

LIMIT = Tolerances().untrained_entropy_fraction


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m")[0])


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory, tokenizer):
    """A random-initialised Llama checkpoint with the default model's tokenizer beside it."""
    folder = tmp_path_factory.mktemp("untrained-llama")
    build_preset("tiny:llama", torch.device("cpu"), torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_trained_default_model_is_not_flagged(tokenizer):
    model = load_model(resolve_model("smollm2-135m")[0], device="cpu", dtype=torch.float32)
    evidence = next_token_entropy(model, tokenizer)
    assert not evidence.untrained(LIMIT) and evidence.fraction < 0.5, evidence.describe()


def test_random_weights_are_flagged(tokenizer, untrained_dir):
    model = load_model(resolve_model(str(untrained_dir))[0], device="cpu", dtype=torch.float32)
    evidence = next_token_entropy(model, tokenizer)
    assert evidence.untrained(LIMIT), evidence.describe()


def test_quality_check_on_an_untrained_checkpoint_is_an_expected_failure_that_says_why(pytester, untrained_dir):
    suite = Path(__file__).resolve().parents[1] / "suites" / "test_acceptance.py"
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "-rx", str(suite),
                                          "--model", str(untrained_dir), "-k", "paris or round_trips")
    result.assert_outcomes(xfailed=1, passed=3)
    result.stdout.fnmatch_lines(["*untrained weights: mean next-token entropy*of a uniform distribution*"])


@pytest.fixture(scope="module")
def checkpoint_of(tmp_path_factory, tokenizer):
    """checkpoint_of(model_type, **config) -> a random-initialised 3-layer checkpoint of an architecture
    the suites were not written against, the default model's tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(model_type: str, **config):
        folder = tmp_path_factory.mktemp(model_type)
        common = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=256, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, **config)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return build


def test_a_refused_attention_implementation_is_the_models_skip_not_a_failure(pytester, checkpoint_of):
    """Gemma-2 (logit softcapping, sliding window): transformers refuses attn_implementation="sdpa"."""
    folder = checkpoint_of("gemma2", num_key_value_heads=2, head_dim=32, sliding_window=16,
                           final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    suites = Path(__file__).resolve().parents[1] / "suites"
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "-rs",
                                          str(suites / "test_attention_model.py"), "--model", str(folder),
                                          "-k", "single or cached_decode", "--report-dir", str(pytester.path / "r"))
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, outcomes
    result.stdout.fnmatch_lines(["*refuses attn_implementation=sdpa (transformers: *Gemma2ForCausalLM does not support*"])
    result.stdout.fnmatch_lines([f"harness model {folder.name}: accepts eager, flex_attention, static_cache",
                                 "  sdpa  no   *Gemma2ForCausalLM does not support*"])  # the header, before any test
    matrix = json.loads(next((pytester.path / "r").glob("*/capabilities.json")).read_text())
    rows = {row["name"]: row for row in matrix if row["category"] == f"model {folder.name}"}
    assert {name: row["available"] for name, row in rows.items()} == {
        "eager": True, "sdpa": False, "flex_attention": True, "static_cache": True}, rows
    assert "Gemma2ForCausalLM does not support" in rows["sdpa"]["reason"]


def test_a_model_whose_code_cannot_serve_paged_skips_the_serving_suite_with_the_reason(pytester, checkpoint_of):
    """GPT-NeoX (rotary_pct 0.25, parallel residual): its attention calls the cache without the
    paged cache's arguments; the serving checks say so instead of failing every request."""
    folder = checkpoint_of("gpt_neox", rotary_pct=0.25, use_parallel_residual=True)
    suite = Path(__file__).resolve().parents[1] / "suites" / "test_serving.py"
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "-rs", str(suite),
                                          "--model", str(folder), "-k", "served_together and eager")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("skipped", 0) + outcomes.get("passed", 0) == 1, outcomes
    if outcomes.get("skipped"):  # transformers 5.24; a release whose NeoX code serves paged passes instead
        result.stdout.fnmatch_lines(["*does not support continuous batching in transformers*PagedAttentionCache.update()*"])


# The three checkpoint kinds of issue 19 (3 layers, hidden 128, random weights, the default
# model's tokenizer beside them), none of which the suites were written against.
UNTUNED_CHECKPOINTS = {
    "gpt_neox": dict(rotary_pct=0.25, use_parallel_residual=True),
    "phi3": dict(num_key_value_heads=2),
    "gemma2": dict(num_key_value_heads=2, head_dim=32, sliding_window=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
}


# The ci profile sweeps Gemma-2 alone (the most quirks: softcapping, a sliding window, SDPA
# refused; ~45 s on the 2-core machine, 26 s of it compiling its static cache); the full profile
# (--run-slow) all three in one run.
@pytest.mark.parametrize("kinds", [pytest.param(("gemma2",), id="gemma2"),
                                   pytest.param(tuple(UNTUNED_CHECKPOINTS), id="all-three", marks=pytest.mark.slow)])
def test_every_suite_on_untuned_checkpoints_gives_no_harness_failure(pytester, checkpoint_of, kinds):
    """Every suite's checks of the checkpoints in one run: nothing fails or errors, every skip or
    inconclusive says why, and what is expected to fail is a quality check that names the
    untrained weights. (Tests that do not take the model, such as the kernel searches and the
    device peaks, are the main run's: -k keeps the ones parametrised by a checkpoint.)"""
    folders = [checkpoint_of(kind, **UNTUNED_CHECKPOINTS[kind]) for kind in kinds]
    suites = Path(__file__).resolve().parents[1] / "suites"
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "-q", str(suites),
                                          "--model", ",".join(map(str, folders)), "--report-dir", str(pytester.path / "r"),
                                          "-k", " or ".join(folder.name for folder in folders))
    outcomes = json.loads(next((pytester.path / "r").glob("*/results.json")).read_text())["outcomes"]
    top = next((pytester.path / "r").glob("*/report.md")).read_text().split("## ", 1)[0]
    assert all(f"Model {folder.name} (hf_dir; weights look UNTRAINED: " in top for folder in folders), top
    by_model = {folder.name: {} for folder in folders}
    for row in outcomes:
        model = next((name for name in by_model if f"[{name}" in row["nodeid"] or f"-{name}" in row["nodeid"]), None)
        if model:
            by_model[model][row["outcome"]] = by_model[model].get(row["outcome"], 0) + 1
    print({name: counts for name, counts in by_model.items()})  # the closing note's counts (pytest -s)
    bad = [f"{r['outcome']}: {r['nodeid']}: {r['reason'][:200]}" for r in outcomes if r["outcome"] in ("failed", "error")]
    assert not bad, "\n".join(bad)
    assert all(counts.get("passed", 0) >= 20 for counts in by_model.values()), by_model
    blank = [r["nodeid"] for r in outcomes if r["outcome"] in ("skipped", "xfailed", "inconclusive") and not r["reason"].strip()]
    assert not blank, f"skipped or expected to fail without a reason: {blank}"
    unexplained = [f"{r['nodeid']}: {r['reason'][:120]}" for r in outcomes
                   if r["outcome"] == "xfailed" and "untrained weights" not in r["reason"]]
    assert not unexplained, "\n".join(unexplained)
    assert result.ret == 0

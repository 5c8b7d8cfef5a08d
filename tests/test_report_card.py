"""The report card (issue 16): triage first, tables that keep their columns, nothing broken.

Adversarial rows (pipes, newlines, backslashes, markup, 10 kB messages, unicode) must leave every
Markdown table with its columns and the HTML well-formed; report.md must fit a GitHub job summary
(1 MiB) with every section populated; skip reasons are cleaned; failures are classified by the
one table in harness.reporting.triage; the committed example reports render.
"""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.reporting import text as report_text
from harness.performance.predictions import SCALING_CHECK
from harness.reporting.report import MD_LIMIT_BYTES, main, render_markdown, render_run
from harness.reporting.html_view import render_html
from harness.reporting.triage import classify
from harness.reporting.elements import Limits
from harness.reporting.view import build_view

EXAMPLES = Path(__file__).resolve().parent.parent / "reports" / "examples"
GITHUB_SUMMARY_LIMIT = 1024 * 1024

NASTY = [
    "a | b || c",
    "line one\nline two\r\nline three",
    "back\\slash \\| escaped pipe \\\\| double",
    "`code` and ``` fence and **bold** _em_ __init__ [link](http://x) ![img](y)",
    "<details><summary>injected</summary> </details> <script>alert(1)</script> <img src=x onerror=alert(1)>",
    "&amp; &lt; &#124; entities",
    "ünïcödé ✓ 日本語 🟥 ≥ ≤ ±",
    "x" * 10_000,
    "| starts with a pipe",
    "ends with a pipe |",
    "# looks like a heading",
    "",
]


def _result(suite, check, metric, value, threshold=None, passed=None, where="", **details):
    return {"suite": suite, "check": check, "metric": metric, "value": value, "threshold": threshold,
            "passed": passed, "where": where, "details": {"test": f"suites/{suite}.py::test_x[{check}]", **details}}


def _summary(results=(), outcomes=(), capabilities=(), tracebacks=None, exit_status=1) -> dict:
    outcomes = list(outcomes)
    suites = {}
    for o in outcomes:
        suites.setdefault(o["suite"], {}).setdefault(o["outcome"], 0)
        suites[o["suite"]][o["outcome"]] += 1
    return {"exit_status": exit_status, "verdict": "FAIL" if exit_status else "PASS", "started": "2026-12-02 10:00:00 UTC",
            "wall_time_s": 12.5, "models": [{"name": "smollm2-135m", "kind": "default", "location": "/root/.cache/x",
                                              "trained_weights": True}],
            "environment": {"python": "3.11", "torch": "2.13", "transformers": "5.24", "device": "cpu", "dtype": "float32",
                            "host": "runner-1"},
            "run": {"seed": 3, "attn": [], "memory_budget_bytes": None, "thresholds_file": "/home/me/acceptance.json"},
            "suites": suites, "outcomes": outcomes, "results": list(results), "capabilities": list(capabilities),
            "tracebacks": tracebacks or {}}


def _outcome(nodeid, outcome, reason="", when="call"):
    return {"nodeid": nodeid, "suite": Path(nodeid.split("::")[0]).stem, "when": when, "outcome": outcome,
            "duration_s": 0.1, "reason": reason}


def _bench(name, kind, attn="sdpa", batch=1, median=0.1, iqr=0.001, **extra):
    info = {"kind": kind, "model": "smollm2-135m", "attn": attn, "dtype": "float32", "cache": "dynamic",
            "quantization": "none", "batch": batch, "prompt_tokens": 16, **extra}
    if kind == "decode":
        info.update(new_tokens=4, ttft_s=0.02, tpot_s=0.01, tpot_p90_s=0.012, tpot_p99_s=0.02,
                    decode_tokens_per_s=batch / 0.01, mbu=0.25, token_latencies_ms=[10.0, 11.0, 9.5, 12.0])
    elif kind == "prefill":
        info.update(ttft_s=0.02, prefill_tokens_per_s=800.0 * batch, mfu=0.3)
    return {"name": name, "fullname": f"suites/test_benchmarks.py::{name}", "group": "generate", "extra_info": info,
            "stats": {"median": median, "iqr": iqr, "rounds": 3, "data": [median * 0.99, median, median * 1.01]}}


def _adversarial_summary() -> tuple[dict, dict]:
    results, outcomes, caps, tracebacks = [], [], [], {}
    for i, text in enumerate(NASTY):
        results.append(_result("test_attention_model", text or "empty", text or "m", text, threshold=text, passed=i % 2 == 0,
                               where=text))
        results.append(_result("test_memory", SCALING_CHECK, "peak increase MiB", 1.0, where=f"{text} N=128",
                               seq_len=128 * (i + 1), attn=["eager", "sdpa"][i % 2], increase_bytes=2**20 * (i + 1),
                               model="smollm2-135m"))
        results.append(_result("test_quantization", f"q{i}", "top-1 agreement", 0.9, threshold=f">= 0.8 {text}", passed=True,
                               where=text))
        results.append(_result("test_long_context", "niah cell", "retrieval accuracy", 0.5,
                               where=f"{1024 * (i + 1)} tokens, depth 50 %"))
        nodeid = f"suites/test_attention_model.py::test_case[{text[:40]}]"
        outcomes.append(_outcome(nodeid, "failed", reason=text))
        tracebacks[f"{nodeid}::call"] = {"message": text, "traceback": f"```\n{text}\n| a | b |\n</details>\n" * 3}
        outcomes.append(_outcome(f"suites/test_memory.py::test_skip[{i}]", "skipped",
                                 reason=f"{text}\nFailing explicit example: test_x(\n    name='sdpa',\n)"))
        caps.append({"name": text or "cap", "category": "attention", "available": bool(i % 2), "reason": text})
    results.append(_result("test_quantization", "table", "rows", 2, section="A | table\nwith newline",
                           table="| h1 | h2 |\n|---|---:|\n| a \\| b | 2 |\n| <b>x</b> | 3 |", note=NASTY[4]))
    results.append(_result("test_long_context", "niah heatmap", "cells", 4, where="/home/runner/work/r/reports/x/niah-m.png",
                           table="| depth \\ context | 1024 |\n|---|---:|\n| 0 % | 100% |"))
    benchmarks = {"benchmarks": [_bench(f"test_decode[{t[:30]}]", "decode", attn=t[:20] or "x", batch=b)
                                 for t in NASTY for b in (1, 4)]}
    return _summary(results, outcomes, caps, tracebacks), benchmarks


# ---------------------------------------------------------------------------------------------
# Checkers


def _unescaped_pipes(line: str) -> int:
    count, backslashes = 0, 0
    for ch in line:
        if ch == "\\":
            backslashes += 1
            continue
        if ch == "|" and backslashes % 2 == 0:
            count += 1
        backslashes = 0
    return count


def _outside_fences(md: str) -> list[str]:
    lines, fence = [], None
    for line in md.splitlines():
        m = re.match(r"^(`{3,})", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.startswith(fence) and line.strip() == fence:
            fence = None
        elif fence is None:
            lines.append(line)
    assert fence is None, "a fenced block is never closed"
    return lines


def assert_markdown_tables_keep_columns(md: str) -> int:
    """Every table row has as many cells as its header; returns the number of tables."""
    tables, block = 0, []
    for line in _outside_fences(md) + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            tables += 1
            width = _unescaped_pipes(block[0])
            assert re.fullmatch(r"\|(:?-+:?\|)+", block[1]), f"no separator row under {block[0][:200]!r}"
            for row in block[1:]:
                assert _unescaped_pipes(row) == width, f"other columns than its header:\n{block[0][:200]}\n{row[:300]}"
            block = []
    return tables


class _Checker(HTMLParser):
    VOID = {"br", "img", "meta", "link", "hr", "input", "wbr", "col", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if any(name.startswith("on") for name, _ in attrs):
            self.errors.append(f"event-handler attribute on <{tag}>")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def assert_html_well_formed(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert checker.stack == [], f"unclosed: {checker.stack}"
    assert checker.tags.count("script") == 1  # the report's own; none from the data
    assert page.startswith("<!DOCTYPE html>")
    return checker


# ---------------------------------------------------------------------------------------------


def test_adversarial_rows_keep_markdown_columns_and_html_well_formed(tmp_path):
    summary, benchmarks = _adversarial_summary()
    view = build_view(summary, benchmarks)
    md = render_markdown(view)
    assert assert_markdown_tables_keep_columns(md) >= 8
    outside = [re.sub(r"`[^`]*`", "`code`", line) for line in _outside_fences(md)]  # code spans show markup as text
    assert max(len(line) for line in outside) < 4000, "a 10 kB message reached a table or list unshortened"
    assert sum(line.count("<details") for line in outside) == sum(line.count("</details>") for line in outside)
    assert "<script>" not in "\n".join(outside) and "Failing explicit example" not in md
    assert "ünïcödé ✓ 日本語" in md
    checker = assert_html_well_formed(render_html(view))
    assert checker.tags.count("details") >= len(NASTY)  # per-failure tracebacks, folded


def test_report_md_fits_a_github_job_summary_with_every_section_populated(tmp_path):
    """Hundreds of rows in every section and 200 failures with 50 kB tracebacks: report.md stays
    under GitHub's 1 MiB summary limit, keeps the triage and the seed-question tables."""
    results, outcomes, tracebacks = [], [], {}
    for n in (2**k for k in range(6, 16)):
        for attn in ("eager", "sdpa", "flash_attention_2"):
            results.append(_result("test_memory", SCALING_CHECK, "peak increase MiB", 1.0, where=f"{attn} N={n}",
                                   seq_len=n, attn=attn, increase_bytes=n * n * 4, model="m",
                                   out_of_memory=attn == "eager" and n > 16000))
    for scheme in range(20):
        for where in ("2x256 tokens", "corpus, 7x512 tokens"):
            for metric in ("top-1 agreement", "top-1 stderr", "top-5 overlap", "KLD mean", "KLD stderr", "KLD p99",
                           "mean ln(PPL ratio)", "ln(PPL ratio) stderr", "delta p mean", "delta p stderr") + tuple(
                               f"KLD p{q}" for q in range(40)):
                results.append(_result("test_quantization", f"scheme{scheme}", metric, 0.5, threshold=">= 0.1", passed=True,
                                       where=where))
    for length in range(1024, 1024 * 21, 1024):
        for depth in range(0, 101, 10):
            results.append(_result("test_long_context", "niah cell", "retrieval accuracy", depth / 100,
                                   where=f"{length} tokens, depth {depth} %"))
    for i in range(3000):
        results.append(_result(f"test_suite{i % 12}", f"check {i}", "metric with a long name " * 3, i * 1.5, threshold=i,
                               passed=i % 97 != 0, where=f"/home/runner/work/repo/reports/run/{i}/file.txt layer {i}"))
    for i in range(200):
        nodeid = f"suites/test_attention_model.py::test_case[{i}]"
        outcomes.append(_outcome(nodeid, "failed", reason=f"AssertionError: diverged at layer {i}"))
        tracebacks[f"{nodeid}::call"] = {"message": f"AssertionError: diverged at layer {i}", "traceback": "frame\n" * 8000}
    for i in range(600):
        outcomes.append(_outcome(f"suites/test_memory.py::test_skip[{i}]", "skipped", reason=f"reason number {i} " * 20))
    caps = [{"name": f"backend{i}", "category": "attention", "available": i % 2 == 0, "reason": "why " * 30}
            for i in range(60)]
    benchmarks = {"benchmarks": [_bench(f"test_decode_{i}[{b}]", "decode", attn=f"impl{i}", batch=b, iqr=0.02 * (i % 2))
                                 for i in range(80) for b in (1, 4, 16, 64)] +
                                [_bench(f"test_prefill_{i}[{b}]", "prefill", attn=f"impl{i}", batch=b)
                                 for i in range(40) for b in (1, 4, 16, 64)]}
    summary = _summary(results, outcomes, caps, tracebacks)
    (tmp_path / "results.json").write_text(json.dumps(summary))
    render_run(tmp_path, summary, benchmarks)
    md = (tmp_path / "report.md").read_text()
    size = len(md.encode())
    print(f"report.md: {size:,} bytes")
    assert size < GITHUB_SUMMARY_LIMIT and size <= MD_LIMIT_BYTES, size
    assert md.startswith("# Inference validation report: FAIL")
    assert "Failures by kind: **equivalence 200**" in md
    triage = md.split("## Triage\n", 1)[1].split("\n## ", 1)[0]
    assert "**200 equivalence**" in triage and "\n1. `suites/test_attention_model.py::test_case[0]`" in triage
    for heading in ("## Prefill peak memory vs prompt length", "## Decode speed per configuration",
                    "## Quantization vs reference", "## Needle in a haystack", "## Capability matrix",
                    "## Measurements by suite", "## Skipped or inconclusive, and why", "## Benchmarks"):
        section = md.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        assert "| " in section and "Not measured" not in section, heading
    tracebacks_md = md.split("## Failure details and tracebacks\n", 1)[1].split("\n## ", 1)[0]
    assert tracebacks_md.count("<details>") + tracebacks_md.count("<details ") >= 30 and "frame" in tracebacks_md
    assert_markdown_tables_keep_columns(md)
    assert "/home/runner" not in md
    assert_html_well_formed((tmp_path / "report.html").read_text())


@pytest.mark.parametrize("raw, clean", [
    ("the run's device is cuda: the matrix describes it\nFailing explicit example: test_x(\n    name='sdpa_math',\n",
     "the run's device is cuda: the matrix describes it"),
    ("", "(no reason given)"),
    ("Skipped", "(no reason given)"),
    ("Skipped: slow: part of the full profile", "slow: part of the full profile"),
    ("model at /root/.cache/llm-harness/models/abc/model.safetensors is stale", "model at model.safetensors is stale"),
])
def test_skip_reasons_are_cleaned(raw, clean):
    assert report_text.clean_reason(raw) == clean


def test_long_reasons_are_cut_at_a_sentence_or_word_not_mid_word():
    oom = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB "
           "is free. Including non-PyTorch memory, this process has 77.9 GiB memory in use. " * 3)
    short = report_text.clean_reason(oom, 200)
    assert len(short) <= 202 and short.endswith("…")
    assert short[:-2].endswith(".") or oom.startswith(short[:-2].rstrip() + " ")  # a whole sentence or whole words


@pytest.mark.parametrize("nodeid, message, checks, kind", [
    ("suites/test_attention_kernels.py::test_k[sdpa]", "AssertionError: error 3e-2 > allowed 1e-3", [], "equivalence"),
    ("suites/test_cache_equivalence.py::test_c", "AssertionError: step 4 diverged", [], "equivalence"),
    ("suites/test_quantization.py::test_agreement[nf4]", "AssertionError: top-1 0.4 < 0.6", ["nf4"], "agreement"),
    ("suites/test_long_context.py::test_niah[4096]", "AssertionError: needle retrieval 20 % < 85.6 %", ["niah"], "agreement"),
    ("suites/test_attention_model.py::test_m", "Failed: memory budget exceeded: peak 3 GiB", ["memory budget"], "memory"),
    ("suites/test_benchmarks.py::test_decode[1]", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", [],
     "memory"),
    ("suites/test_benchmarks.py::test_harness_timer[matmul]", "AssertionError: +13 %, limit ±3 %", ["timer vs do_bench"],
     "harness self-check"),
    ("tests/test_plugin_report.py::test_x", "AssertionError: report", [], "harness self-check"),
    ("suites/test_attention_model.py::test_m", "RuntimeError: shape mismatch", [], "error"),
])
def test_failures_are_classified_by_the_one_table(nodeid, message, checks, kind):
    outcome = _outcome(nodeid, "failed", reason=message)
    assert classify(outcome, checks, message) == kind


def test_setup_errors_and_speed_regressions_are_triaged(tmp_path):
    from harness.performance.regression import Comparison, parse_rule

    summary = _summary(outcomes=[_outcome("suites/test_memory.py::test_w", "failed", "KeyError: 'x'", when="setup")])
    slower = Comparison("suites/test_benchmarks.py::test_decode[1]", parse_rule("median:10%"), 1.0, 1.3)
    view = build_view(summary, comparisons=[slower])
    assert [(f.kind, f.value, f.limit) for f in view.failures] == [("speed regression", "+30.0%", "10%"),
                                                                   ("error", "", "")]
    assert view.verdict == "FAIL" and all(f.next_step for f in view.failures)


def test_speed_rows_state_batch_prompt_new_tokens_and_flag_noise():
    benchmarks = {"benchmarks": [_bench("test_decode[sdpa-1]", "decode", batch=1, iqr=0.03),
                                 _bench("test_decode[sdpa-4]", "decode", batch=4),
                                 _bench("test_prefill[sdpa-4]", "prefill", batch=4)]}
    md = render_markdown(build_view(_summary(exit_status=0), benchmarks))
    section = md.split("## Decode speed per configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| sdpa |")]
    assert len(rows) == 3 and len(set(rows)) == 3  # batch 1 and 4 are different rows
    assert "| sdpa | dynamic | float32 | none | 1 | 16 | 4 | 100 | 20 | 10 | 12 | 20 | 25.0% | ⚠ 30% |" in section
    assert "| sdpa | dynamic | float32 | none | 4 | 16 | n/a | 3,200 | 20 | 30.0% | 1% |" in section  # prefill
    assert "IQR above 10%" in section


def test_rerender_with_a_baseline_adds_deltas_and_fails_on_a_regression(tmp_path, capsys):
    current = {"benchmarks": [_bench("test_decode[sdpa-1]", "decode", median=0.13)]}
    baseline = {"benchmarks": [_bench("test_decode[sdpa-1]", "decode", median=0.10)]}
    (tmp_path / "results.json").write_text(json.dumps(_summary(exit_status=0)))
    (tmp_path / "benchmarks.json").write_text(json.dumps(current))
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    assert main([str(tmp_path), "--baseline", str(tmp_path / "base.json"), "--max-regression", "10%"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Inference validation report: FAIL") and "**speed regression 1**" in md
    assert "❌ +30.0% (limit 10%)" in md
    stored = json.loads((tmp_path / "results.json").read_text())["baseline"]
    assert stored["comparisons"][0]["regressed"] is True
    assert main([str(tmp_path)]) == 0  # re-rendered later without --baseline: the stored comparison stays
    assert "**speed regression 1**" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*/") if (p / "results.json").is_file()))
def test_committed_examples_render_without_broken_cells(example, tmp_path):
    source = EXAMPLES / example
    summary = json.loads((source / "results.json").read_text())
    bench_file = source / "benchmarks.json"
    benchmarks = json.loads(bench_file.read_text()) if bench_file.is_file() else None
    view = build_view(summary, benchmarks, run_dir=source, limits=Limits())
    md = render_markdown(view)
    assert_markdown_tables_keep_columns(md)
    assert "Failing explicit example" not in md and "](niah-" not in md and "reports/h100/" not in md
    assert "| (no reason given) |" not in md or example == "cpu-report-card"
    assert_html_well_formed(render_html(view))

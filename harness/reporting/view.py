"""The report as a view model: what report.md and report.html show, built once from the run's data.

    build_view(summary, benchmarks, comparisons) -> ReportView

`summary` is results.json, `benchmarks` pytest-benchmark's document (benchmarks.json) and
`comparisons` harness.performance.regression.Comparison objects against a baseline (optional). The view holds
plain text; report.md and report.html escape it as they render it (harness.reporting.text,
the HTML template's autoescape).

Layout, for an engineer with one minute: the verdict and the failure triage first
(harness.reporting.triage), then the seed questions as tables beside their plots (prefill memory
per length, decode speed per configuration, quantization, needle in a haystack, capabilities),
then everything else collapsed: measurements by suite, other tables, skips, all benchmarks,
tracebacks, the run's environment.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness.reporting.elements import Limits, ReportView
from harness.reporting.measured import memory_section, niah_section, quantization_section
from harness.reporting.run_sections import benchmarks_section, capability_section, environment_section, measurement_section, skips_section, suites_section, tables_section, tracebacks_section
from harness.reporting.speed import benchmark_rows, speed_section
from harness.reporting.triage import counts, failures
from harness.results import INCONCLUSIVE


# ---------------------------------------------------------------------------------------------


def _weights_fact(model: dict, summary: dict) -> str:
    """What the run learnt about the weights (the plugin's "weights" row, harness.models.weights) beats what
    the model's kind implies: a user's checkpoint can be untrained."""
    if not model.get("trained_weights"):
        return "random weights (equivalence, memory and speed only)"
    evidence = next((r for r in summary.get("results", []) if r.get("check") == "weights"
                     and r.get("where") == model["name"]), None)
    if evidence is None:
        return "trained weights"
    if evidence.get("details", {}).get("looks_untrained"):
        return (f"weights look UNTRAINED: next-token entropy on the bundled prose is {evidence['value']:.2f} of "
                "a uniform distribution's; its quality checks are expected failures, equivalence, memory and "
                "speed still apply")
    return f"trained weights (next-token entropy {evidence['value']:.2f} of uniform)"


def build_view(summary: dict, benchmarks: dict | None = None, comparisons=(), *, run_dir: Path | None = None,
               limits: Limits | None = None, html_url: str = "") -> ReportView:
    limits = limits or Limits()
    comparisons = list(comparisons)
    found = failures(summary, comparisons)
    outcomes = Counter("error" if o.get("outcome") == "failed" and o.get("when", "call") != "call" else o.get("outcome")
                       for o in summary.get("outcomes", []))
    verdict = "FAIL" if summary.get("exit_status", 0) not in (0, None) or found else "PASS"
    kind_counts = counts(found)
    total = sum(outcomes.values())
    if found:
        by_kind = ", ".join(f"{n} {k}" for k, n in kind_counts.items())
        headline = f"{len(found)} failure{'s' * (len(found) != 1)}: {by_kind}."
    else:
        headline = "No failures: every check passed or was skipped with its reason."
    errors = outcomes.get("error", 0)
    headline += (f" {outcomes.get('passed', 0)} passed, {outcomes.get('failed', 0)} failed, "
                 f"{errors} error{'s' * (errors != 1)}, {outcomes.get('skipped', 0)} skipped"
                 + (f", {outcomes[INCONCLUSIVE]} inconclusive" if outcomes.get(INCONCLUSIVE) else "")
                 + (f", {outcomes['xfailed']} expected to fail" if outcomes.get("xfailed") else "") + f" ({total} test phases).")
    env = summary.get("environment", {})
    facts = []
    for m in summary.get("models", []):
        facts.append(f"Model {m['name']} ({m.get('kind', '')}; {_weights_fact(m, summary)})")
    get = lambda key: env.get(key, "n/a")  # noqa: E731
    host = f" on {env['cpus']} CPUs, {env['cpu']}" if env.get("cpu") else ""  # the times below are this host's
    facts.append(f"Device {env.get('gpu', get('device'))} ({get('device')}){host}, dtype {get('dtype')}; "
                 f"torch {get('torch')}, transformers {get('transformers')}, Python {get('python')}")
    facts.append(f"Started {summary.get('started', 'n/a')}, wall time {summary.get('wall_time_s', 'n/a')} s, "
                 f"pytest exit status {summary.get('exit_status', 'n/a')}")
    if (summary.get("run") or {}).get("planted_fault"):
        facts.append(f"PLANTED FAULT ACTIVE: {summary['run']['planted_fault']} (HARNESS_PLANTED_FAULT): "
                     "this run is expected to fail")
    rows = benchmark_rows(benchmarks, summary)
    by_name = {c.name: c for c in comparisons if c.rule.field == "median"} or {c.name: c for c in comparisons}
    key = [memory_section(summary, limits), speed_section(summary, rows, by_name, limits, bool(comparisons)),
           quantization_section(summary, limits), niah_section(summary, run_dir), capability_section(summary)]
    details = [measurement_section(summary, limits), tables_section(summary), skips_section(summary, limits),
               benchmarks_section(benchmarks, limits), tracebacks_section(found, limits), suites_section(summary),
               environment_section(summary)]
    return ReportView(title=f"Inference validation report: {verdict}", verdict=verdict, headline=headline, facts=facts,
                      kind_counts=kind_counts, failures=found, key_sections=key, detail_sections=details,
                      html_url=html_url)


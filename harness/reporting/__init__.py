"""A run's report: results.json (the data) and its views, report.md and report.html.

- ``report``: writes a run directory (results.json, capabilities.json, benchmarks.json) and renders it;
  ``python -m harness.reporting RUN_DIR`` re-renders one (e.g. with a benchmark baseline);
- ``view`` (with ``speed`` and ``sections``): what both views show, as plain data;
- ``triage``: failure kinds and next steps; ``text``: escaping, units, cleaned reasons;
- ``html_view``: plots and the HTML page; ``templates/``: the Jinja2 templates of both views;
- ``outcomes``: a test's outcome row, its suite, the benchmark document;
- ``merge``: one report from several processes' run directories (harness.gate's side-by-side run).
"""

"""The report view's building blocks: cells, tables, plots, folds, sections, limits, the view itself,
and the small formatting helpers every section uses (harness.reporting.view builds the view)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from harness.reporting.text import (NOISE_LIMIT, clean_reason, fmt_num, fmt_pct, fmt_threshold, is_number,
                                    one_line, shorten, slug, strip_paths)
from harness.reporting.triage import KINDS, MEANING, NEXT_STEP, Failure
from harness.results import INCONCLUSIVE


CELL_CHARS = 300


@dataclass
class Cell:
    text: str
    status: str | None = None      # "pass", "fail", "warn", "muted" (HTML colour; Markdown shows the text)
    code: bool = False             # a node id: code span
    href: str | None = None        # an anchor in the report
    title: str | None = None       # HTML tooltip
    style: str | None = None       # HTML inline style (heatmap cells)
    sub: str = ""                  # secondary text (a threshold): a second line in HTML, in brackets in Markdown

    def __post_init__(self):  # every cell one line, and short: long messages live in the folded details
        self.text = shorten(one_line(self.text), CELL_CHARS)
        self.sub = shorten(one_line(self.sub), CELL_CHARS // 2)
        self.title = shorten(one_line(self.title), 1000) if self.title else None

    @property
    def full_text(self) -> str:
        return f"{self.text} ({self.sub})" if self.sub else self.text


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    align: list[str] = field(default_factory=list)   # "l" / "r" per column
    caption: str = ""
    omitted: int = 0               # rows left out (size limits), said under the table

    def __post_init__(self):
        self.align = self.align or ["l"] * len(self.columns)


@dataclass
class Plot:
    kind: str                      # "memory", "throughput_batch", "throughput_config", "latency", "niah"
    title: str
    data: object = None
    png_path: str | None = None    # an image the run wrote (NIAH heatmap)


@dataclass
class Fold:
    """A collapsed part of a section: a summary line; inside, tables and/or preformatted text."""
    summary: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pre: str = ""
    id: str = ""
    command: str = ""              # a shell command (to reproduce)


@dataclass
class Section:
    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    empty: str = ""                # why the section has nothing (shown instead of content)
    collapsed: bool = False
    layout: str = "side"           # HTML: plots beside the tables, or "stack": below them (wide tables)
    fold_style: str = "details"    # each fold collapsed on its own, or "headings" (one collapsed block)
    summary: str = ""              # the collapsed block's summary line
    id: str = ""

    def __post_init__(self):
        self.id = self.id or slug(self.title)  # GitHub's anchor of the '## title' heading


@dataclass
class Limits:
    """Size limits: report.md must fit a GitHub job summary (1 MiB); report.html only needs to open."""
    rows_per_table: int = 2000
    traceback_chars: int = 20000
    skip_reason_chars: int = 240


@dataclass
class ReportView:
    title: str
    verdict: str
    headline: str
    facts: list[str]
    kind_counts: dict
    failures: list[Failure]
    key_sections: list[Section]
    detail_sections: list[Section]
    meaning: dict = field(default_factory=lambda: dict(MEANING))
    next_step: dict = field(default_factory=lambda: dict(NEXT_STEP))
    kinds: tuple = KINDS
    html_url: str = ""

    @property
    def failure_groups(self) -> list[tuple[str, list[Failure]]]:
        """Failures grouped by kind, in KINDS order."""
        return [(kind, [f for f in self.failures if f.kind == kind])
                for kind in self.kinds if self.kind_counts.get(kind)]

    @property
    def sections(self) -> list[Section]:
        return self.key_sections + self.detail_sections


PASS, FAIL, RECORDED = "pass", "FAIL", "recorded"


def verdict_cell(passed) -> Cell:
    return {True: Cell(PASS, "pass"), False: Cell(FAIL, "fail")}.get(passed, Cell(RECORDED, "muted"))


def params_of(nodeid: str) -> str:
    """'suite.py::test[a-b]' -> 'a-b' (the test's parameters)."""
    m = re.search(r"\[(.*)\]$", nodeid or "")
    return m.group(1) if m else ""


def model_of(nodeid: str, models: list[str]) -> str:
    params = params_of(nodeid)
    for name in sorted(models, key=len, reverse=True):
        if name and name in params:
            return name
    return models[0] if len(models) == 1 else ""


def where_text(text) -> str:
    return shorten(strip_paths(one_line(text)), 160)


def value_text(value) -> str:
    return shorten(one_line(fmt_num(value)), 200)


def threshold_text(threshold) -> str:
    return shorten(fmt_threshold(threshold), 160)


def cap_rows(rows: list, limit: int) -> tuple[list, int]:
    return (rows, 0) if len(rows) <= limit else (rows[:limit], len(rows) - limit)


def why_empty(summary: dict, suite_file: str, *tests: str) -> str:
    """Why a section has no data: the skip reasons of the tests that feed it, or that none ran."""
    fed = [o for o in summary.get("outcomes", []) if o.get("nodeid", "").startswith(suite_file)
           and any(f"::{t}" in o["nodeid"] for t in tests)]
    if not fed:
        return f"Not measured: {suite_file} ({', '.join(t + '*' for t in tests)}) was not part of this run."
    reasons = Counter(clean_reason(o.get("reason"), 160) for o in fed if o.get("outcome") in ("skipped", INCONCLUSIVE))
    if not reasons:
        return f"Not measured: {len(fed)} test(s) of {suite_file} ran but recorded nothing for this table."
    listed = "; ".join(f"{reason} ({n}×)" for reason, n in reasons.most_common(3))
    more = f"; {len(reasons) - 3} more reasons under Skipped or inconclusive, and why" if len(reasons) > 3 else ""
    return f"Not measured: the tests that feed this table skipped: {listed}{more}."


def parse_md_table(text: str) -> Table | None:
    """A Markdown pipe table (a suite's `table` detail) as a Table; None when `text` holds none."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return None

    def cells(line: str) -> list[str]:
        line = line.strip()[1:]
        if line.endswith("|") and not line.endswith("\\|"):
            line = line[:-1]
        return [p.strip().replace("\\|", "|").replace("**", "") for p in re.split(r"(?<!\\)\|", line)]

    header = cells(lines[0])
    body = lines[1:]
    align = ["l"] * len(header)
    if body and set(body[0].replace("|", "").strip()) <= set("-: "):
        align = ["r" if c.endswith(":") else "l" for c in cells(body[0])]
        body = body[1:]
    rows = []
    for line in body:
        row = cells(line)
        row = (row + [""] * len(header))[: max(len(header), 1)]
        rows.append([Cell(c) for c in row])
    return Table(header, rows, (align + ["l"] * len(header))[: len(header)])


def noise_cell(noise) -> Cell:
    if not is_number(noise):
        return Cell("n/a", "muted")
    return Cell(("⚠ " if noise > NOISE_LIMIT else "") + fmt_pct(noise, 0), "warn" if noise > NOISE_LIMIT else None)

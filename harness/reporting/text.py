"""Text rules of the report, in one place: cleaning reasons and messages, escaping table cells,
units and number formats, anchors.

Everything a report shows from the run's data passes through here: Markdown cells through
`md_cell` (pipes, backslashes, newlines, Markdown/HTML specials), HTML through the template's
autoescape; reasons through `clean_reason` (one line, hypothesis' "Failing explicit example"
tail dropped, cut at a word or sentence boundary, never empty); paths on the run machine
through `strip_paths` (only the file name is kept).
"""

from __future__ import annotations

import math
import re

# A measurement whose spread (IQR) exceeds this fraction of its median is flagged as noisy.
NOISE_LIMIT = 0.10

# hypothesis appends the example that reproduces a skip or failure after the message
_HYPOTHESIS_TAILS = ("Failing explicit example", "Falsifying example", "Falsifying explicit example",
                     "You can reproduce this example", "Trying example")
_WS = re.compile(r"\s+")
# a path on the run machine: absolute, home-relative, or relative with a file extension
_PATH = re.compile(r"(?<![\w.:/])(?:~?/|\./|\.\./|[A-Za-z]:\\)?(?:[\w.+@-]+[/\\])+([\w.+@-]+\.[A-Za-z0-9]{1,6})\b"
                   r"|(?<![\w.:])(?:~|/(?:home|root|tmp|usr|opt|var|mnt|srv|data|work|scratch|workspace|github|runner))"
                   r"(?:/[\w.+@-]+)+")


def one_line(text) -> str:
    """All whitespace (newlines included) collapsed to single spaces."""
    return _WS.sub(" ", "" if text is None else str(text)).strip()


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a sentence or word boundary, with an ellipsis."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    sentence = max(head.rfind(". "), head.rfind("; "), head.rfind(": "))
    if sentence >= limit * 0.6:
        return head[: sentence + 1] + " …"
    space = head.rfind(" ")
    if space >= limit * 0.5:
        head = head[:space]
    return head.rstrip(" ,;:") + " …"


def drop_hypothesis_tail(text: str) -> str:
    for marker in _HYPOTHESIS_TAILS:
        at = text.find(marker)
        if at > 0:
            text = text[:at]
    return text


def clean_reason(text, limit: int = 240) -> str:
    """A skip or failure reason as one readable line."""
    text = drop_hypothesis_tail(str(text or ""))
    text = re.sub(r"^(Skipped|Failed|XFAIL|reason)(: ?|$)", "", text.strip())
    text = strip_paths(one_line(text))
    return shorten(text, limit) if text else "(no reason given)"


def strip_paths(text: str) -> str:
    """Paths on the run machine replaced by their last component: report.md is read elsewhere."""
    def repl(match: re.Match) -> str:
        whole = match.group(0)
        name = match.group(1) or whole.rstrip("/").rsplit("/", 1)[-1]
        return name if name != whole else whole

    return _PATH.sub(repl, text)


# ---------------------------------------------------------------------------------------------
# Markdown escaping

_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")
_UNDERSCORE_EDGE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
_ENTITY = re.compile(r"&(?=#?\w+;)")


def md_cell(value) -> str:
    """Any value as the text of one Markdown table cell (or list item): one line; every character
    that could split the row or start markup (pipes, backslashes, code, emphasis, links, HTML tags,
    entities) escaped; intraword underscores and comparison signs stay readable."""
    text = one_line(value)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = _UNDERSCORE_EDGE.sub(r"\\_", text)
    text = _ENTITY.sub("&amp;", text)
    return _TAG_START.sub("&lt;", text)


def md_code(value) -> str:
    """A code span in a table cell (node ids); plain escaped text when a code span cannot hold it."""
    text = one_line(value)
    if not text or "`" in text or "\\" in text:
        return md_cell(text)
    return "`" + text.replace("|", "\\|") + "`"


def md_block(text: str, lang: str = "text") -> str:
    """Preformatted text in a fenced block (no fence inside it can close the block)."""
    text = str(text or "")
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def slug(title: str) -> str:
    """GitHub's heading anchor for `title` (lowercase, punctuation dropped, spaces to dashes)."""
    text = re.sub(r"[^\w\- ]", "", one_line(title).lower())
    return text.replace(" ", "-")


# ---------------------------------------------------------------------------------------------
# Numbers and units: one unit per quantity (column headers carry it)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_num(value, digits: int = 4) -> str:
    """A value of a generic measurement row: floats to `digits` significant digits, large numbers
    with thousands separators; text as it is."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 10000:
            return f"{value:,.0f}"
        text = f"{value:.{digits}g}"
        return f"{value:,.0f}" if "e+" in text else text
    return str(value)


def fmt_ms(seconds) -> str:
    """Seconds as milliseconds (the column says ms)."""
    if not is_number(seconds):
        return "n/a"
    ms = seconds * 1e3
    if ms >= 999.5:
        return f"{ms:,.0f}"
    return f"{ms:.3g}" if ms >= 1 else f"{ms:.3f}"


def fmt_rate(value) -> str:
    """Tokens/s and other rates: thousands separators, 3 significant digits below 1000."""
    if not is_number(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 999.5 else f"{value:.3g}"


def fmt_pct(fraction, digits: int = 1) -> str:
    if not is_number(fraction):
        return "n/a"
    return f"{fraction * 100:.{digits}f}%"


def fmt_signed_pct(fraction) -> str:
    if not is_number(fraction):
        return "n/a"
    return f"{fraction * 100:+.1f}%"


def fmt_threshold(threshold) -> str:
    """A recorded threshold as text: numbers like values, '>=' / '<=' / '|.|<=' as ≥ ≤ |x| ≤."""
    text = one_line(fmt_num(threshold))
    if isinstance(threshold, str):
        text = text.replace("|.|<=", "|x| ≤").replace(">=", "≥").replace("<=", "≤")
    return text


def fmt_int(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "n/a" if value is None else str(value)


BYTE_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def byte_unit(values) -> str:
    """MiB, or GiB when the largest value is 10 GiB or more: one unit for a whole column."""
    numbers = [v for v in values if is_number(v)]
    return "GiB" if numbers and max(numbers) >= 10 * 2**30 else "MiB"


def fmt_bytes(value, unit: str) -> str:
    if not is_number(value):
        return "n/a"
    v = value / BYTE_UNITS[unit]
    return f"{v:,.0f}" if v >= 999.5 else f"{v:.3g}" if v >= 1 else f"{v:.3f}"

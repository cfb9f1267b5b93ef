"""Text that came from a user (labels, reasons) made safe for where it is shown: a terminal, a spreadsheet.

printable("ok\x1b[2Jgone")   # 'ok\ufffd[2Jgone': no escape sequence reaches the terminal
csv_cell("=HYPERLINK(...)")  # "'=HYPERLINK(...)": a spreadsheet shows it as text, never runs it
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SHOWN_DIGITS", "csv_cell", "number", "printable"]

# Every number a person reads (status, best, the launch lines, the progress lines, the review) has this many
# significant digits, formatted from the one value the storage holds (docs/design.md, "Numbers").
SHOWN_DIGITS = 5

# C0 controls (tab and newline included: one value stays on one line), DEL and the C1 controls
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A cell a spreadsheet would read as a formula (OWASP, "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def number(value: Any, missing: str = "-") -> str:
    """A number for people: :data:`SHOWN_DIGITS` significant digits, an int as it is, a float that reads as
    an int with ``.0`` (``7.0``, as the rules are written), ``missing`` for None and NaN."""
    if value is None or isinstance(value, bool):
        return missing if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):
        return missing
    text = f"{value:.{SHOWN_DIGITS}g}"
    return text if any(c in text for c in ".en") else text + ".0"


def printable(text: str, replacement: str = "\ufffd") -> str:
    """``text`` with every control character replaced by ``replacement``."""
    return _CONTROL.sub(replacement, text)


def csv_cell(value: Any) -> Any:
    """A CSV value: text made printable, and prefixed with ``'`` where a spreadsheet would take it for a
    formula; numbers and other values as they are."""
    if not isinstance(value, str):
        return value
    if value.startswith(_FORMULA_START):
        value = "'" + value
    return printable(value)

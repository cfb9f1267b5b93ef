"""User text (labels, reasons) where it is shown: markdown notes, the terminal, CSV (search/text.py)."""

from __future__ import annotations

import csv
import io
import re

from koopman_search.search.cli._output import dump
from koopman_search.search.cli.status import _cell
from koopman_search.search.review.notes import trial_note
from koopman_search.search.review.stored import StoredRules, TrialFacts
from koopman_search.search.text import csv_cell, printable

HOSTILE = "![x](http://evil.example/a.png) <img src=x onerror=alert(1)> [link](http://evil.example) |*b*|\x1b[2J\n"


def test_a_label_cannot_load_an_image_or_a_link_or_html_in_a_dashboard_note() -> None:
    trial = TrialFacts(
        3,
        4,
        "COMPLETE",
        {"koopman_weight_max": 0.1},
        (500.0, 0.1),
        {"epoch": [1], "val_ppl": [500.0]},
        {"label": HOSTILE},
    )
    note = trial_note(trial, ["val_ppl", "val_linear_nre"], None, StoredRules())
    # every character that could open markup comes escaped: shown as text, never rendered
    for unescaped in (r"(?<!\\)\[x", r"(?<!\\)<img", r"(?<!\\)\[link", r"(?<!\\)\|\*b", "\x1b"):
        assert re.search(unescaped, note) is None, unescaped
    assert "!\\[x\\](http://evil.example/a.png)" in note


def test_control_characters_never_reach_the_terminal() -> None:
    assert printable("ok\x1b[2J\x07\x9bgone") == "ok\ufffd[2J\ufffd\ufffdgone"
    assert "\x1b" not in _cell("a\x1b[31mred")


def test_csv_cells_that_a_spreadsheet_would_run_are_text() -> None:
    assert csv_cell('=HYPERLINK("http://evil")') == '\'=HYPERLINK("http://evil")'
    assert [csv_cell(v) for v in ("+1", "-x", "@SUM(A1)", "plain", -0.5, 3)] == [
        "'+1",
        "'-x",
        "'@SUM(A1)",
        "plain",
        -0.5,
        3,
    ]
    out = dump({}, "csv", [{"number": 0, "label": "=1+1\x1b", "values": None, "params": {}}])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[0]["label"] == "'=1+1\ufffd"

"""The columnar form in which per-epoch records are stored in Optuna user attrs.

A trial's ``"records"`` user attr (and a baseline's ``"records"``) is one list per
:data:`trainer.records.RECORD_FIELDS` name, epoch by epoch::

    {"epoch": [1, 2, 3], "lm_loss": [6.91, 6.52, 6.40], ..., "val_koopman_nre": [None, None, 0.41]}

Columns keep the stored JSON small and read straight into plots. Floats are rounded to
:data:`SIGNIFICANT_DIGITS` significant digits; NaN and ±Inf become ``None`` (JSON has no NaN), and
``None`` reads back as NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from search.errors import StorageError
from trainer.records import RECORD_FIELDS, EpochRecord

__all__ = ["SIGNIFICANT_DIGITS", "columns_to_records", "records_to_columns", "round_significant"]

SIGNIFICANT_DIGITS = 6
"""Digits kept for stored floats: enough to tell 7.0 from 7.00001 in a prune rule, small in JSON."""

_INT_FIELDS = frozenset(f.name for f in dataclasses.fields(EpochRecord) if f.type in ("int", int))
_DEFAULTED = frozenset(f.name for f in dataclasses.fields(EpochRecord)
                       if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
_LIST_FIELDS = frozenset(f.name for f in dataclasses.fields(EpochRecord) if str(f.type).startswith("list"))


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float | None:
    """``value`` rounded to ``digits`` significant digits; ``None`` for NaN and ±Inf."""
    value = float(value)
    if not math.isfinite(value):
        return None
    if value == 0.0:
        return 0.0
    return float(f"{value:.{digits}g}")


def records_to_columns(records: Sequence[EpochRecord]) -> dict[str, list[Any]]:
    """One list per record field, in epoch order as given. Empty lists for no records."""
    columns: dict[str, list[Any]] = {name: [] for name in RECORD_FIELDS}
    for record in records:
        for name in RECORD_FIELDS:
            value = getattr(record, name)
            if name in _INT_FIELDS:
                columns[name].append(int(value))
            elif name in _LIST_FIELDS:
                columns[name].append([round_significant(v) for v in value])
            else:
                columns[name].append(round_significant(value))
    return columns


def columns_to_records(columns: Mapping[str, Sequence[Any]]) -> list[EpochRecord]:
    """The records back from their columns. ``None`` becomes NaN; unknown columns are ignored.

    Raises :class:`~search.errors.StorageError` when a field is missing or the columns differ in length,
    which means the stored attr was not written by :func:`records_to_columns`.
    """
    # fields added after a study was stored read back as their defaults
    missing = [name for name in RECORD_FIELDS if name not in columns and name not in _DEFAULTED]
    if missing:
        raise StorageError(f"stored records must have a column for every record field, but got missing={missing}")
    lengths = {name: len(columns[name]) for name in RECORD_FIELDS if name in columns}
    if len(set(lengths.values())) > 1:
        raise StorageError(f"stored record columns must all have one length, but got lengths={lengths}")
    count = lengths[RECORD_FIELDS[0]]
    records = []
    for i in range(count):
        values: dict[str, Any] = {}
        for name in RECORD_FIELDS:
            if name not in columns:
                continue
            value = columns[name][i]
            if name in _LIST_FIELDS:
                values[name] = [math.nan if v is None else float(v) for v in value]
            elif name in _INT_FIELDS:
                values[name] = int(value) if value is not None else 0
            else:
                values[name] = math.nan if value is None else float(value)
        records.append(EpochRecord(**values))
    return records

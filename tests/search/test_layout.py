"""The stored layout: the columnar record codec, the keys and the attrs a worker writes."""

from __future__ import annotations

import json
import math

import optuna
import pytest

from search.errors import StorageError
from search.layout import columns_to_records, records_to_columns, round_significant
from tests.search.review.synthetic import EPOCHS, baseline_records
from trainer.records import RECORD_FIELDS, EpochRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- the columnar record encoding ---------------------------------------------------------------------------


def test_records_to_columns_keeps_six_significant_digits_and_stores_nan_as_none() -> None:
    record = baseline_records()[0]
    record = EpochRecord(**{**record.to_dict(), "lm_loss": 7.140123456, "val_koopman_nre": math.inf})
    columns = records_to_columns([record, baseline_records()[1]])
    assert set(columns) == set(RECORD_FIELDS)
    assert columns["lm_loss"][0] == 7.14012
    assert columns["val_koopman_nre"] == [None, None]
    assert columns["epoch"] == [1, 2] and all(type(e) is int for e in columns["epoch"])
    json.dumps(columns, allow_nan=False)  # storable as strict JSON


def test_columns_to_records_reads_none_back_as_nan() -> None:
    back = columns_to_records(records_to_columns(baseline_records()))
    assert [r.epoch for r in back] == list(range(1, EPOCHS + 1))
    assert math.isnan(back[0].val_koopman_nre)
    assert back[-1].val_ppl == 477.2


def test_round_significant_keeps_zero_and_small_values() -> None:
    assert round_significant(0.0) == 0.0
    assert round_significant(0.000123456789) == 0.000123457
    assert round_significant(-math.inf) is None


def test_columns_to_records_rejects_ragged_columns() -> None:
    columns = records_to_columns(baseline_records())
    columns["val_ppl"] = columns["val_ppl"][:-1]
    with pytest.raises(StorageError, match=r"one length, but got lengths=.*'val_ppl': 9"):
        columns_to_records(columns)


def test_columns_to_records_rejects_a_missing_field() -> None:
    columns = records_to_columns(baseline_records())
    del columns["total_loss"]
    with pytest.raises(StorageError, match=r"missing=\['total_loss'\]"):
        columns_to_records(columns)

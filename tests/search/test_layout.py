"""The stored layout: the columnar record codec, the keys and the attrs a worker writes."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from koopman_search.search.errors import StorageError
from koopman_search.search.storage import layout
from koopman_search.search.storage.layout import columns_to_records, records_to_columns, round_significant
from koopman_search.trainer.records import RECORD_FIELDS, EpochRecord
from tests.search.review.synthetic import EPOCHS, baseline_records

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


# ---- keys ---------------------------------------------------------------------------------------------------


def test_baseline_key_reads_back_its_seed_and_nothing_else() -> None:
    assert layout.baseline_key(0) == "baseline:seed=0"
    assert layout.baseline_key_seed(layout.baseline_key(-3)) == -3
    assert layout.baseline_key_seed("baseline:seed=x") is None
    assert layout.baseline_key_seed(layout.SPEC_ATTR) is None


def test_a_first_attempt_is_no_retry() -> None:
    study = optuna.create_study()
    study.add_trial(layout.finished_trial(TrialState.FAIL, {}, {}, [], fail_reason="boom"))
    first = study.get_trials()[0]
    assert not layout.is_retry(first)
    assert layout.retry_of(first) is None


# ---- the attrs a worker writes ----------------------------------------------------------------------------


def test_epoch_attrs_count_only_the_epochs_this_attempt_trained() -> None:
    records = baseline_records()[:5]
    attrs = layout.epoch_attrs(records, 5, "a5", first_epoch=4)
    assert attrs[layout.CHECKPOINT] == {"epoch": 5, "artifact_id": "a5"}
    assert attrs[layout.EPOCHS_RUN] == 2
    assert attrs[layout.TRAIN_SECONDS] == 2 * 78.0
    assert attrs[layout.RECORDS]["epoch"] == [1, 2, 3, 4, 5]
    assert set(layout.epoch_attrs(records, 5, None)) == {layout.RECORDS}  # the baseline: records alone


def test_finished_trial_stores_a_pruned_attempt_with_its_epoch_and_warmup() -> None:
    records = baseline_records()[:6]
    frozen = layout.finished_trial(
        TrialState.PRUNED,
        {},
        {},
        records,
        epochs_from_warmup=3,
        label="x",
        prune_reason="total_loss 7.2 > 7.0 at epoch 6",
    )
    attrs = frozen.user_attrs
    assert attrs[layout.PRUNED_EPOCH] == 6
    assert (attrs[layout.EPOCHS_FROM_WARMUP], attrs[layout.EPOCHS_RUN]) == (3, 3)
    assert attrs[layout.LABEL] == "x"
    assert layout.CHECKPOINT not in attrs and layout.FAIL_REASON not in attrs


def test_matched_baseline_round_trips_through_its_trial() -> None:
    records = baseline_records()
    study = optuna.create_study()
    attrs = {**layout.epoch_attrs(records, len(records), "last"), layout.WARMUP_CHECKPOINTS: {"2": "a2", "5": "a5"}}
    study.add_trial(optuna.trial.create_trial(value=477.2, user_attrs=attrs))
    baseline = layout.MatchedBaseline.from_trial(study.get_trials()[0])
    assert baseline.checkpoints == {2: "a2", 5: "a5"}
    assert baseline.val_ppl[-1] == 477.2
    stored = baseline.to_attr()
    assert stored["state"] == "complete" and stored["checkpoints"] == {"2": "a2", "5": "a5"}
    assert stored["records"] == attrs[layout.RECORDS]

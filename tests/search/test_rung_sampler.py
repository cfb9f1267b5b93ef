"""``sampler = "tpe-rungs"``: TPE fitted on the values trials reached at asha's rungs
(search/pruning/rung_sampler.py)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from koopman_search.search.errors import SpecError
from koopman_search.search.pruning.rung_sampler import FINAL, RungTPESampler, choose_level, rung_view
from koopman_search.search.storage import layout
from koopman_search.search.studyfile.prune_settings import AshaSettings
from koopman_search.search.studyfile.spec import spec_from_dict
from tests.search.test_asha import _study_dict

REPO = Path(__file__).resolve().parents[2]
X = FloatDistribution(0.0, 1.0)


def _trial(number: int, state: TrialState, records: dict[str, list[Any]], values: list[float] | None = None) -> Any:
    t = create_trial(
        state=state,
        values=values,
        params={"x": 0.1 * number},
        distributions={"x": X},
        user_attrs={layout.RECORDS: records},
    )
    t.number = number
    return t


def test_the_level_is_the_highest_fidelity_that_enough_trials_reached() -> None:
    levels = [{1: (1.0,), 3: (1.0,), FINAL: (1.0,)}, {1: (1.0,), 3: (1.0,)}, {1: (1.0,)}, {1: (1.0,)}]
    assert choose_level(levels, 1) == FINAL
    assert choose_level(levels, 2) == 3  # one final, two at Koopman epoch 3
    assert choose_level(levels, 3) == 1
    assert choose_level(levels, 4) == 1
    assert choose_level(levels, 5) is None


def test_the_view_gives_each_trial_its_values_at_the_level_and_leaves_the_rest_pruned() -> None:
    # Koopman start epoch 2 (default), 6 epochs, η 2: rungs at Koopman epochs 1 and 2 (epochs 3 and 4); the
    # baseline's val_ppl is 100 at every epoch, so a rung value is val_ppl / 100.
    sampler = RungTPESampler(AshaSettings(2, 1), ["val_ppl"], ["minimize"], 6, 2, "baseline:seed=0", 2, seed=0)
    study = optuna.create_study()
    study.set_user_attr("baseline:seed=0", {"state": "complete", "val_ppl": [100.0] * 6, "records": None})
    done = _trial(0, TrialState.COMPLETE, {"epoch": [3, 4, 5, 6], "val_ppl": [150.0, 140.0, 130.0, 120.0]}, [120.0])
    at_two = _trial(1, TrialState.PRUNED, {"epoch": [3, 4], "val_ppl": [110.0, 90.0]})
    at_one = _trial(2, TrialState.PRUNED, {"epoch": [3], "val_ppl": [200.0]})
    levels_of = sampler._levels_of(study)
    assert levels_of(done) == {1: (1.5,), 2: (1.4,), FINAL: (1.2,)}
    assert levels_of(at_two) == {1: (1.1,), 2: (0.9,)}
    assert levels_of(at_one) == {1: (2.0,)}

    level, seen = rung_view([done, at_two, at_one], levels_of, [1.0], 2)
    assert level == 2  # one trial finished, two reached Koopman epoch 2
    assert [(t.state, t.values) for t in seen] == [
        (TrialState.COMPLETE, [1.4]),
        (TrialState.COMPLETE, [0.9]),
        (TrialState.PRUNED, None),
    ]
    assert [t.params for t in seen] == [{"x": 0.0}, {"x": 0.1}, {"x": 0.2}]
    # nothing written back: the stored trials keep their states and values
    assert (at_two.state, at_two.values, done.values) == (TrialState.PRUNED, None, [120.0])


def test_a_maximised_metric_reads_with_the_studys_direction() -> None:
    levels = {0: {1: (-0.5,)}, 1: {1: (-0.25,)}}  # asha's signed values of a maximised metric
    trials = [_trial(n, TrialState.PRUNED, {}) for n in (0, 1)]
    _, seen = rung_view(trials, lambda t: levels[t.number], [-1.0], 2)
    assert [t.values for t in seen] == [[0.5], [0.25]]


def test_too_few_trials_anywhere_leaves_the_study_as_it_is() -> None:
    trials = [_trial(0, TrialState.PRUNED, {})]
    level, seen = rung_view(trials, lambda t: {1: (1.0,)}, [1.0], 2)
    assert level is None and seen == trials


def _learned_x(sampler: optuna.samplers.BaseSampler) -> float:
    """The median x the sampler proposes after 12 trials that were all pruned at Koopman epoch 1, where each
    had val_ppl 100 * (1 + x) there: a small x was better."""
    study = optuna.create_study(sampler=sampler)
    study.set_user_attr("baseline:seed=0", {"state": "complete", "val_ppl": [100.0] * 6, "records": None})
    for i in range(12):
        x = (11.5 - i) / 12  # plain TPE ranks pruned trials without values by number: the first look "good"
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED,
                params={"x": x},
                distributions={"x": X},
                user_attrs={layout.RECORDS: {"epoch": [3], "val_ppl": [100.0 * (1 + x)]}},
            )
        )
    proposed = []
    for _ in range(15):
        trial = study.ask({"x": X})
        proposed.append(trial.params["x"])
        study.tell(trial, state=TrialState.FAIL)  # a failed trial is seen by neither sampler
    return statistics.median(proposed)


def test_tpe_rungs_learns_from_pruned_trials_where_tpe_cannot() -> None:
    rungs = RungTPESampler(AshaSettings(3, 1), ["val_ppl"], ["minimize"], 6, 2, "baseline:seed=0", 3, seed=1)
    plain = optuna.samplers.TPESampler(seed=1)
    assert _learned_x(rungs) < 0.25
    assert _learned_x(plain) > 0.35


def test_the_study_file_names_it_and_it_needs_asha() -> None:
    spec = spec_from_dict(_study_dict(pruner="asha", sampler="tpe-rungs"), base_dir=REPO / "studies")
    sampler = spec.make_sampler(3)
    assert isinstance(sampler, RungTPESampler)
    assert sampler._min_points == len(spec.space.searched) + 2
    with pytest.raises(SpecError, match="sampler=\"tpe-rungs\" with pruner='none'"):
        spec_from_dict(_study_dict(pruner="none", sampler="tpe-rungs"), base_dir=REPO / "studies")

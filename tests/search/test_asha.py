"""The asha pruner: rung decisions against hand-computed cases, its settings, its decisions in the storage
(two workers at one rung on real PostgreSQL), and a reduced quickstart study that it prunes."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import tomllib
from optuna.trial import TrialState

from koopman_search.search.errors import SpecError
from koopman_search.search.pruning.asha import decide, order_keys, rung_values
from koopman_search.search.pruning.rungs import AshaPruner
from koopman_search.search.storage import layout
from koopman_search.search.storage.layout import trial_attrs
from koopman_search.search.studyfile.prune_settings import AshaSettings
from koopman_search.search.studyfile.spec import spec_from_dict
from tests.search.study_files import cli, status_json, trials_of

REPO = Path(__file__).resolve().parents[2]


# ---- the decision on plain numbers -------------------------------------------------------------------------


def test_one_objective_keeps_the_top_third_of_the_rung() -> None:
    d = decide((3.0,), [(1.0,), (2.0,), (4.0,), (5.0,)], reduction_factor=3)
    assert (d.rank, d.of, d.keep, d.kept) == (3, 5, 1, False)
    d = decide((1.0,), [(2.0,), (4.0,), (5.0,), (3.0,), (6.0,)], reduction_factor=3)
    assert (d.rank, d.of, d.keep, d.kept) == (1, 6, 2, True)
    d = decide((2.0,), [(1.0,), (4.0,), (5.0,), (3.0,), (6.0,)], reduction_factor=3)
    assert (d.rank, d.keep, d.kept) == (2, 2, True)


def test_a_rung_with_one_trial_keeps_it_and_the_first_of_a_rung_is_kept_when_best() -> None:
    assert decide((9.0,), [], reduction_factor=3).kept
    assert decide((1.0,), [(2.0,)], reduction_factor=3).kept  # 2 // 3 = 0: keep the best one
    assert not decide((2.0,), [(1.0,)], reduction_factor=3).kept


def test_equal_values_share_a_place() -> None:
    d = decide((2.0,), [(2.0,), (3.0,)], reduction_factor=3)
    assert (d.rank, d.of, d.keep, d.kept) == (1, 3, 1, True)
    d = decide((2.0, 5.0), [(2.0, 5.0), (1.0, 1.0)], reduction_factor=2)
    assert (d.rank, d.kept) == (2, False)


def test_two_objectives_sort_by_front_then_by_crowding_distance() -> None:
    # A(1,4) B(2,2) C(4,1) form the first front, D(3,3) the second (B dominates it), E(5,5) the third.
    # Crowding in the first front: A and C are extremes (infinite), B gets (4-1)/3 + (4-1)/3 = 2.
    points = {"A": (1.0, 4.0), "B": (2.0, 2.0), "C": (4.0, 1.0), "D": (3.0, 3.0), "E": (5.0, 5.0)}
    keys = dict(zip(points, order_keys(list(points.values())), strict=True))
    assert keys == {"A": (0, -math.inf), "B": (0, -2.0), "C": (0, -math.inf), "D": (1, -math.inf), "E": (2, -math.inf)}
    ranks = {}
    for name, p in points.items():
        d = decide(p, [q for n, q in points.items() if n != name], reduction_factor=2)
        ranks[name] = (d.rank, d.kept)
    # 5 // 2 = 2 continue: the two extremes of the front
    assert ranks == {"A": (1, True), "C": (1, True), "B": (3, False), "D": (4, False), "E": (5, False)}


def test_a_rung_with_fewer_than_min_trials_keeps_them_all_then_decides() -> None:
    # 4th of a rung at η 3, ranked 4 of 4: 4 // 3 = 1 continues; with min_trials 5 the rung has too few to rank
    mine, others = (4.0,), [(1.0,), (2.0,), (3.0,)]
    assert decide(mine, others, reduction_factor=3) == decide(mine, others, 3, min_trials=4)
    assert not decide(mine, others, reduction_factor=3).kept
    d = decide(mine, others, reduction_factor=3, min_trials=5)
    assert (d.rank, d.of, d.keep, d.kept) == (4, 4, 4, True)
    # the 5th reaches min_trials: the rung decides as before, 5 // 3 = 1
    d = decide((4.0,), [*others, (5.0,)], reduction_factor=3, min_trials=5)
    assert (d.rank, d.of, d.keep, d.kept) == (4, 5, 1, False)


@pytest.mark.parametrize("seed", range(20))
def test_the_best_trial_of_each_objective_is_never_pruned_by_a_rung(seed: int) -> None:
    # the ends of the first front have infinite crowding distance and share the first place
    import random

    rng = random.Random(seed)
    points = [(rng.random(), rng.random()) for _ in range(rng.randint(2, 12))]
    for eta in (2, 3, 4):
        for m in (0, 1):
            best = min(range(len(points)), key=lambda i: points[i][m])
            rest = points[:best] + points[best + 1 :]
            assert decide(points[best], rest, eta).kept, (points, eta, m)


def test_nan_counts_as_worst() -> None:
    assert not decide((math.nan, 1.0), [(2.0, 2.0), (3.0, 3.0)], reduction_factor=2).kept
    assert decide((1.0, 1.0), [(math.nan, 0.5)], reduction_factor=2).kept


def test_rungs_are_counted_in_koopman_epochs_and_the_last_epoch_is_no_rung() -> None:
    s = AshaSettings(reduction_factor=3, min_epochs=1)
    assert s.rungs(7) == [1, 3] and s.rungs(9) == [1, 3] and s.rungs(10) == [1, 3, 9] and s.rungs(1) == []
    assert AshaSettings(reduction_factor=2, min_epochs=2).rungs(9) == [2, 4, 8]


def test_rung_values_divide_perplexities_by_the_baseline_at_that_epoch_and_sign_maximised_metrics() -> None:
    columns = {"epoch": [1, 2, 3], "val_ppl": [300.0, 200.0, 150.0], "val_koopman_gain": [None, 2.0, 4.0]}
    baseline = [250.0, 160.0, 120.0]
    got = rung_values(columns, 2, ["val_ppl", "val_koopman_gain"], [1.0, -1.0], baseline)
    assert got == (200.0 / 160.0, -2.0)
    assert rung_values(columns, 4, ["val_ppl"], [1.0], baseline) is None
    assert math.isnan(rung_values(columns, 1, ["val_koopman_gain"], [-1.0], baseline)[0])


# ---- settings ----------------------------------------------------------------------------------------------


def _study_dict(**study: Any) -> dict[str, Any]:
    d = tomllib.loads((REPO / "studies" / "quickstart.toml").read_text())
    d["study"] = {k: v for k, v in d["study"].items() if not k.startswith("asha_")}  # the shipped values
    d["study"].update(study)
    return d


@pytest.mark.parametrize(
    ("study", "key", "message"),
    [
        ({"pruner": "asha", "asha_reduction_factor": 1}, "asha_reduction_factor", "must be an integer >= 2"),
        ({"pruner": "asha", "asha_reduction_factor": 2.5}, "asha_reduction_factor", "must be an integer >= 2"),
        ({"pruner": "asha", "asha_min_epochs": 4}, "asha_min_epochs", "must be < trainer.train.epochs (4)"),
        ({"pruner": "asha", "asha_min_epochs": 0}, "asha_min_epochs", "must be an integer >= 1"),
        ({"pruner": "none", "asha_min_epochs": 1}, "asha_min_epochs", 'applies only with pruner = "asha"'),
        ({"pruner": "asha", "asha_min_trials": 0}, "asha_min_trials", "must be an integer >= 1"),
        ({"pruner": "asha", "asha_min_trials": True}, "asha_min_trials", "must be an integer >= 1"),
        ({"pruner": "none", "asha_min_trials": 3}, "asha_min_trials", 'applies only with pruner = "asha"'),
        (
            {"pruner": "asha", "objectives": [{"metric": "val_perplexity", "direction": "minimize"}]},
            "objectives",
            "val_perplexity",
        ),
    ],
)
def test_bad_asha_settings_name_the_key_and_the_value(study: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        spec_from_dict(_study_dict(**study), origin="studies/x.toml", base_dir=REPO / "studies")
    text = str(err.value)
    assert message in text and key in text and "studies/x.toml" in text and "\n" not in text


def test_bad_asha_setting_in_a_file_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (REPO / "studies" / "quickstart.toml").read_text()
    assert "asha_reduction_factor = 3" in text
    text = text.replace("asha_reduction_factor = 3", "asha_reduction_factor = 1", 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _out, err = cli(capsys, "launch", str(path))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "asha_reduction_factor=1" in lines[0] and str(path) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_asha_works_with_several_objectives_and_round_trips_through_the_stored_definition() -> None:
    spec = spec_from_dict(_study_dict(pruner="asha", asha_reduction_factor=2), base_dir=REPO / "studies")
    assert spec.is_multi_objective and spec.asha == AshaSettings(2, 1)
    again = spec_from_dict(spec.to_dict(), base_dir=REPO / "studies")
    assert again.asha == spec.asha


# ---- decisions from the storage ----------------------------------------------------------------------------


def _pruner(eta: int = 2) -> AshaPruner:
    return AshaPruner(AshaSettings(eta, 1), ["val_ppl"], ["minimize"], 6, 2, [100.0] * 6, "asha-test")


def _record_at(trial_id: int, storage: Any, epochs: list[int], val_ppl: list[float]) -> None:
    storage.set_trial_user_attr(trial_id, layout.RECORDS, {"epoch": epochs, "val_ppl": val_ppl})


def _race(url: str, storage: Any, name: str) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
    """Two workers, each with its own connections, write their trial's record at the rung and decide at the
    same moment: a (val_ppl 110 at epoch 3) is better than b (120)."""
    study = optuna.create_study(storage=storage, study_name=name)
    a, b = study.ask(), study.ask()
    pruner = _pruner(eta=2)
    barrier = threading.Barrier(2)
    decisions: dict[str, tuple[str | None, dict[str, Any] | None]] = {}

    def reach(who: str, trial: optuna.Trial, value: float) -> None:
        mine = optuna.storages.RDBStorage(url)
        try:
            barrier.wait()
            _record_at(trial._trial_id, mine, [1, 2, 3], [300.0, 200.0, value])
            decisions[who] = pruner.check(mine, study._study_id, trial._trial_id, {}, 3)
        finally:
            mine.engine.dispose()

    threads = [
        threading.Thread(target=reach, args=("a", a, 110.0)),
        threading.Thread(target=reach, args=("b", b, 120.0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return decisions


def test_two_workers_reaching_one_rung_at_once_decide_as_one_after_the_other(postgres_url: str) -> None:
    storage = optuna.storages.RDBStorage(postgres_url)
    try:
        for attempt in range(6):
            decisions = _race(postgres_url, storage, f"asha-race-{attempt}")
            (reason_a, da), (reason_b, db) = decisions["a"], decisions["b"]
            assert da is not None and db is not None
            assert reason_a is None and da["rank"] == 1  # the better one is kept whatever the order
            if reason_b is None:  # b decided first, alone at the rung
                assert (db["rank"], db["of"]) == (1, 1) and da["of"] == 2
            else:  # b saw a: second of two, top 1 kept
                assert (db["rank"], db["of"], db["keep"]) == (2, 2, 1)
                assert reason_b == "asha: rung 1 (Koopman epoch 1, epoch 3): rank 2 of 2 on (val_ppl), keeps top 1"
    finally:
        storage.engine.dispose()


def test_only_trials_with_a_record_at_the_same_koopman_epoch_compete(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'asha.db'}")
    try:
        study = optuna.create_study(storage=storage, study_name="asha-starts")
        pruner = AshaPruner(
            AshaSettings(2, 1), ["val_ppl"], ["minimize"], 6, 2, [100.0, 100.0, 100.0, 50.0, 50.0, 50.0], "s"
        )
        # start 3: its Koopman epoch 1 is epoch 4, where the baseline is 50: ratio 60 / 50 = 1.2
        late = study.ask()
        late_params = {"koopman_start_epoch": 3}
        storage.set_trial_param(late._trial_id, "koopman_start_epoch", 3, optuna.distributions.IntDistribution(1, 4))
        _record_at(late._trial_id, storage, [1, 2, 3, 4], [400.0, 200.0, 100.0, 60.0])
        # start 1 (given as a param): Koopman epoch 1 is epoch 2: ratio 110 / 100 = 1.1, better
        early = study.ask()
        storage.set_trial_param(early._trial_id, "koopman_start_epoch", 1, optuna.distributions.IntDistribution(1, 4))
        _record_at(early._trial_id, storage, [1, 2], [400.0, 110.0])
        # the default start (2) but no record at epoch 3 yet: not in the rung
        study.ask()
        reason, decision = pruner.check(storage, study._study_id, late._trial_id, late_params, 4)
        assert decision == {"rung": 1, "koopman_epoch": 1, "epoch": 4, "rank": 2, "of": 2, "keep": 1}
        assert reason is not None and reason.startswith("asha: rung 1 (Koopman epoch 1, epoch 4): rank 2 of 2")
        assert pruner.check(storage, study._study_id, late._trial_id, late_params, 3) == (None, None)  # no rung
    finally:
        storage.engine.dispose()


# ---- a study -----------------------------------------------------------------------------------------------


def test_quickstart_with_asha_prunes_and_finishes_its_whole_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quickstart study (pruner = "asha" as shipped), reduced to 6 trials of 5 steps, with η = 2. Every
    trial is listed in the file, so that the run does not depend on the sampler's per-launch seed."""
    text = (REPO / "studies" / "quickstart.toml").read_text()
    assert 'pruner = "asha"' in text  # the shipped setting
    text = text.replace("asha_reduction_factor = 3", "asha_reduction_factor = 2", 1)
    text = text.replace("n_trials = 8 ", "n_trials = 6 ", 1).replace(
        "max_steps_per_epoch = 60", "max_steps_per_epoch = 5", 1
    )
    text = text.replace("max_eval_batches = 10", "max_eval_batches = 2", 1)
    for weight, start, schedule, dim in [
        (0.3, 1, "step", 16),
        (0.02, 1, "linear", 32),
        (0.1, 2, "cosine", 16),
        (0.4, 1, "exponential", 32),
        (0.01, 2, "linear", 16),
    ]:
        text += (
            f"\n[[enqueue]]\nkoopman_weight_max = {weight}\nkoopman_start_epoch = {start}\n"
            f'fallback_threshold = 2.0\nschedule = "{schedule}"\nkoopman_dim = {dim}\n'
        )
    path = tmp_path / "quickstart.toml"
    path.write_text(text)
    url = f"sqlite:///{tmp_path / 'quickstart.db'}"
    code, out, err = cli(capsys, "launch", str(path), "--storage", url)
    assert code == 0, err
    trials = trials_of(url, "quickstart")
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    by_asha = [t for t in pruned if t.user_attrs["pruned_by"] == "asha"]
    assert by_asha, out
    for t in by_asha:
        assert re.fullmatch(
            r"asha: rung \d+ \(Koopman epoch \d+, epoch \d+\): rank \d+ of \d+ on "
            r"\(val_ppl, val_linear_nre\), keeps top \d+",
            t.user_attrs["prune_reason"],
        ), t.user_attrs["prune_reason"]
        assert trial_attrs(t)["asha_rungs"][-1]["rank"] > trial_attrs(t)["asha_rungs"][-1]["keep"]
    for t in pruned:  # the rules come first: what they prune carries their reason
        if t.user_attrs["pruned_by"] == "rules":
            assert not t.user_attrs["prune_reason"].startswith("asha:")
    data = status_json(capsys, "quickstart", url)
    saved = data["totals"]
    assert saved["epochs_saved_by_pruner"] > 0
    assert saved["epochs_saved_by_pruning"] == saved["epochs_saved_by_pruner"] + saved["epochs_saved_by_rules"]


def test_a_rung_reads_the_linearity_measure_against_the_baselines_own_at_that_epoch() -> None:
    from koopman_search.search.pruning.asha import rung_values

    columns = {"epoch": [1, 2, 3], "val_ppl": [900.0, 700.0, 600.0], "val_linear_nre": [0.2, 0.1, 0.06]}
    values = rung_values(
        columns,
        3,
        ("val_ppl", "val_linear_nre"),
        (1.0, 1.0),
        [1000.0, 800.0, 500.0],
        {"val_linear_nre": [0.4, 0.2, 0.08]},
    )
    assert values == pytest.approx((600.0 / 500.0, 0.06 / 0.08))
    # no baseline curve for it (a fixed baseline): the raw value
    raw = rung_values(columns, 3, ("val_ppl", "val_linear_nre"), (1.0, 1.0), [1000.0, 800.0, 500.0])
    assert raw == pytest.approx((1.2, 0.06))


@pytest.mark.slow
@pytest.mark.postgres
def test_two_worker_processes_with_asha_decide_each_rung_once_per_trial_and_run_the_exact_budget(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from koopman_search.search.cli import main
    from tests.search.study_files import write_worker_study
    from tests.search.worker_processes import assert_study_done, open_study

    # start epoch 1 of 4: rungs at Koopman epochs 1 and 2 (epochs 2 and 3), eta 2, a rung decides from its 3rd
    path = write_worker_study(tmp_path, postgres_url, n_trials=8, epochs=4, start_epoch=1)
    text = path.read_text().replace(
        'sampler = "random"', 'sampler = "random"\npruner = "asha"\nasha_reduction_factor = 2\nasha_min_trials = 3', 1
    )
    path.write_text(text)
    assert main(["launch", str(path), "--workers", "2"]) == 0, capsys.readouterr().err[-3000:]
    trials = open_study(postgres_url).get_trials()
    assert_study_done(trials, 8)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both processes ran trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    decided = [d for t in trials for d in trial_attrs(t).get("asha_rungs", []) if d["of"] >= 3]
    assert decided, "no rung had 3 trials: the test would see no decision"
    for t in trials:
        rungs = [d["rung"] for d in trial_attrs(t).get("asha_rungs", [])]
        assert rungs == sorted(set(rungs)), (t.number, rungs)  # each rung decided once, in order
        for d in trial_attrs(t).get("asha_rungs", []):
            # the minimum count: fewer than 3 at the rung keeps them all
            assert d["keep"] == (d["of"] if d["of"] < 3 else max(1, d["of"] // 2)), d
    for t in pruned:
        assert t.user_attrs["prune_reason"].startswith("asha: rung ")

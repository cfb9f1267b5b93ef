"""bench/replay_rungs.py: the rank correlation and the replay of a rule, on hand-computed cases."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import replay_rungs
from replay_rungs import Baseline, Trial, replay, spearman

EPOCHS = 4


def _trial(number: int, at_rung: tuple[float, float], final: tuple[float, float], total_loss: float = 5.0) -> Trial:
    """A trial that starts its Koopman loss after epoch 1: its first Koopman epoch (epoch 2) is the only rung
    (3 Koopman epochs: rungs 1, and 3 is its last); its last epoch is 4."""
    ppl = [1.0, at_rung[0], 1.0, final[0]]
    nre = [1.0, at_rung[1], 1.0, final[1]]
    columns = {"epoch": [1, 2, 3, 4], "val_ppl": ppl, "val_linear_nre": nre, "total_loss": [total_loss] * EPOCHS}
    return Trial(number, 1, {}, columns)


BASE = Baseline([1.0] * EPOCHS, {"val_linear_nre": [1.0] * EPOCHS}, EPOCHS)  # ratios = the values themselves


def test_spearman_on_hand_computed_cases() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2): cov 1.5 / sqrt(1.5 * 2)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(spearman([1, 2], [1, 2]))  # under three pairs
    assert math.isnan(spearman([1, 2, math.nan], [1, 2, 3]))  # NaN pairs left out: two remain


def test_asha_replayed_on_four_trials() -> None:
    trials = [
        _trial(0, (1.0, 1.0), (1.0, 1.0)),  # alone at the rung: continues
        _trial(1, (0.9, 0.9), (0.9, 0.9)),  # better on both: keep 1 of 2, and it is first
        _trial(2, (1.1, 1.1), (0.5, 0.5)),  # behind both: keep 1 of 3, rank 3: stopped after 1 Koopman epoch
        _trial(3, (0.8, 1.2), (0.8, 1.2)),  # on the first front with trial 1, an extreme: shares the first place
    ]
    paid, finals, stops = replay(trials, BASE, "asha")
    assert paid == 3 + 3 + 1 + 3
    assert finals == [(1.0, 1.0), (0.9, 0.9), (0.8, 1.2)]
    assert stops == ["trial 2 stopped after Koopman epoch 1 of 3: rung at Koopman epoch 1: rank 3 of 3, keeps 1"]


def test_the_rules_alone_stop_only_on_the_rules() -> None:
    trials = [_trial(0, (1.0, 1.0), (1.0, 1.0)), _trial(1, (2.0, 2.0), (2.0, 2.0), total_loss=7.5)]
    paid, finals, stops = replay(trials, BASE, "rules")
    assert paid == 3 + 1  # trial 1 is over total_loss_max 7.0 from its first Koopman epoch
    assert finals == [(1.0, 1.0)]
    assert stops == ["trial 1 stopped after Koopman epoch 1 of 3: total_loss 7.50"]


def test_a_random_rule_keeps_each_trial_with_probability_keep_over_n() -> None:
    trials = [_trial(i, (1.0 + i / 100, 1.0 + i / 100), (1.0, 1.0)) for i in range(30)]  # under the 1.3 rule
    kept = [len(replay(trials, BASE, "asha+random", random.Random(d))[1]) for d in range(200)]
    # trial 0 always continues (keep 1 of 1); trial i continues with probability max(1, (i + 1) // 3) / (i + 1)
    expected = sum(max(1, (i + 1) // 3) / (i + 1) for i in range(30))
    assert sum(kept) / len(kept) == pytest.approx(expected, rel=0.05)
    assert min(kept) >= 1
    # ranked, not drawn: every trial after the first is behind all before it, so only trial 0 continues
    assert len(replay(trials, BASE, "asha")[1]) == 1


def test_unknown_rules_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        replay_rungs.main(["--plain", "x", "--baseline", "y", "--rules", "asha+fast"])
    assert exit_info.value.code == 2
    assert "'asha+fast'" in capsys.readouterr().err


def test_the_correlation_table_reads_each_rung_against_the_end() -> None:
    # rung values in the finals' order for val_ppl, in the reverse order for val_linear_nre
    trials = [_trial(i, (1.0 + i / 100, 1.2 - i / 100), (2.0 + i, 2.0 + i)) for i in range(5)]
    table = replay_rungs.correlation_text({7: trials}, BASE, (1,))
    row = table.splitlines()[2]
    # Koopman epoch 1: +1 and -1; epoch 3 (the one before the last) is 1.0 for every trial: no correlation
    assert row == "| 7 | +1.00 (5) | -1.00 (5) | +nan (5) | +nan (5) |"


@pytest.mark.slow
def test_a_study_run_without_a_pruner_is_read_and_a_pruned_one_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from koopman_search.search.cli import main
    from tests.search.study_files import write_study

    unpruned = write_study(tmp_path / "unpruned", n_trials=6, epochs=4)  # no pruner, rules out of reach
    assert main(["-q", "launch", str(unpruned), "--workers", "1"]) == 0
    capsys.readouterr()
    assert replay_rungs.main(["--plain", str(unpruned.parent / "tiny.db"), "--correlation"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("baseline final val_ppl ")  # the study's own auto baseline
    row = next(line for line in out if line.startswith("| tiny | "))
    assert row.split(" | ")[1].endswith("(6)")  # all six trials at their first Koopman epoch

    pruned = write_study(tmp_path / "pruned", n_trials=2, epochs=4, val_ppl_ratio_max=0.5)  # the rule stops all
    assert main(["-q", "launch", str(pruned), "--workers", "1"]) == 0
    with pytest.raises(SystemExit, match="trial 0 was pruned"):
        replay_rungs.main(["--plain", str(pruned.parent / "tiny.db"), "--correlation"])

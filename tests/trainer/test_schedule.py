"""The Koopman weight schedule and the fallback (trainer/schedule.py)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from koopman_search.trainer.config import SCHEDULES, KoopmanConfig
from koopman_search.trainer.schedule import EXP_RANGE, FallbackState, koopman_weight


def weights(schedule: str, weight_max: float, start: int, epochs: int) -> list[float]:
    cfg = KoopmanConfig(schedule=schedule, weight_max=weight_max, start_epoch=start)
    return [koopman_weight(e, cfg, epochs) for e in range(1, epochs + 1)]


# ----------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("start", "epochs"), [(3, 10), (0, 5), (1, 2), (9, 10), (0, 1)])
def test_weight_is_zero_through_start_epoch_positive_after_and_max_at_last_epoch(
    schedule: str, start: int, epochs: int
) -> None:
    w = weights(schedule, 0.5, start, epochs)
    assert w[:start] == [0.0] * start  # epochs 1..s are pure LM training
    assert w[start] > 0.0  # on from epoch s + 1
    assert w[-1] == 0.5  # exactly the max at e = E


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weight_never_decreases(schedule: str) -> None:
    w = weights(schedule, 0.3, 2, 12)
    assert all(a <= b for a, b in itertools.pairwise(w))
    assert all(0.0 <= x <= 0.3 for x in w)


def test_linear_weights_of_the_users_table() -> None:
    # weight max 0.5, start epoch 3, 10 epochs: the notebook (docs/design.md) printed 0 at epoch 4 and 0.4286
    # at epoch 10
    w = weights("linear", 0.5, 3, 10)
    assert w[:3] == [0.0, 0.0, 0.0]
    assert w[3:] == pytest.approx([0.5 * i / 7 for i in range(1, 8)], rel=1e-15)
    assert w[3] == pytest.approx(0.0714, abs=5e-5)
    assert w[9] == 0.5


def test_step_schedule_is_full_weight_from_the_first_koopman_epoch() -> None:
    assert weights("step", 0.2, 2, 5) == [0.0, 0.0, 0.2, 0.2, 0.2]


def test_exponential_schedule_grows_by_a_constant_factor() -> None:
    w = weights("exponential", 0.5, 3, 10)[3:]
    ratios = [b / a for a, b in itertools.pairwise(w)]
    assert ratios == pytest.approx([EXP_RANGE ** (1 / 7)] * 6, rel=1e-12)
    assert w[0] == pytest.approx(0.5 * EXP_RANGE ** (1 / 7 - 1), rel=1e-12)


def test_cosine_schedule_is_half_way_at_half_progress() -> None:
    w = weights("cosine", 0.4, 2, 6)
    assert w[3] == pytest.approx(0.2, rel=1e-12)  # epoch 4: p = 2/4


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("start", [10, 11])
def test_start_epoch_at_or_past_the_last_epoch_gives_weight_zero_always(schedule: str, start: int) -> None:
    assert weights(schedule, 0.5, start, 10) == [0.0] * 10


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_disabled_koopman_or_zero_max_gives_weight_zero(schedule: str) -> None:
    cfg = KoopmanConfig(schedule=schedule, weight_max=0.5, start_epoch=0)
    assert [koopman_weight(e, replace(cfg, enabled=False), 4) for e in range(1, 5)] == [0.0] * 4
    assert [koopman_weight(e, replace(cfg, weight_max=0.0), 4) for e in range(1, 5)] == [0.0] * 4


# ----------------------------------------------------------------------------------------------- fallback


def run_fallback(
    losses: list[float], weight: float = 0.5, threshold: float = 1.0, factor: float = 0.1, n_batches: int = 2
) -> tuple[list[float], FallbackState]:
    state = FallbackState(threshold, factor, n_batches, torch.device("cpu"))
    applied = [float(state.effective_weight(weight, torch.tensor(loss))) for loss in losses]
    return applied, state


def run_relative(losses: list[float], threshold: float, n_batches: int = 0) -> tuple[list[float], FallbackState]:
    state = FallbackState(threshold, 0.1, n_batches, torch.device("cpu"), mode="relative")
    applied = [float(state.effective_weight(0.5, torch.tensor(loss))) for loss in losses]
    return applied, state


def moments(losses: list[float]) -> tuple[float, float]:
    """The oracle: exponentially weighted mean and variance with weight 0.1 on the newest, started at the first."""
    mean, var = losses[0], 0.0
    for x in losses[1:]:
        diff = x - mean
        mean += 0.1 * diff
        var = 0.9 * (var + 0.1 * diff * diff)
    return mean, var


def test_relative_fallback_cuts_a_batch_threshold_standard_deviations_over_the_running_mean() -> None:
    calm = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]
    mean, var = moments(calm)
    limit = mean + 2.0 * math.sqrt(var)
    under, _ = run_relative([*calm, limit * 0.999], threshold=2.0)
    over, state = run_relative([*calm, limit * 1.001], threshold=2.0)
    assert (under, over) == ([0.5] * 7, [0.5] * 6 + [f32(0.05)])
    assert int(state.cut_count) == 1


def test_relative_fallback_only_fills_its_moments_in_an_epochs_first_batches() -> None:
    applied, _ = run_relative([1.0, 100.0, 1e4, 1e6, 1e8], threshold=0.5)  # WARMUP_BATCHES = 5: none judged
    assert applied == [0.5] * 5
    mean, var = moments([1.0, 1.0, 1.0, 1.0, 1.0])
    assert (mean, var) == (1.0, 0.0)
    applied, _ = run_relative([1.0] * 5 + [1.0001], threshold=3.0)  # zero spread: any rise is a spike
    assert applied[-1] == f32(0.05)


def test_relative_fallback_is_blind_to_the_losses_scale() -> None:
    losses = [0.8, 0.7, 0.75, 0.72, 0.78, 0.74, 1.3, 0.6]
    small, _ = run_relative(losses, threshold=2.0)
    large, _ = run_relative([v * 1000 for v in losses], threshold=2.0)
    assert small == large == [0.5] * 6 + [f32(0.05), 0.5]


def test_relative_fallback_leaves_non_finite_losses_out_of_its_moments() -> None:
    _, state = run_relative([1.0, math.nan, 3.0], threshold=2.0)
    mean, var = moments([1.0, 3.0])
    assert (float(state.running), float(state.running_var), int(state.seen)) == pytest.approx((mean, var, 2))


def test_unknown_fallback_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        FallbackState(1.0, 0.1, 1, torch.device("cpu"), mode="percent")


def f32(x: float) -> float:
    """The float32 value of ``x``: the effective weight is a float32 device tensor."""
    return float(torch.tensor(x, dtype=torch.float32))


def test_batch_over_threshold_and_the_next_n_batches_are_cut_even_when_under() -> None:
    applied, state = run_fallback([0.5, 2.0, 0.5, 0.5, 0.5, 0.5])
    cut = f32(0.5 * 0.1)
    assert applied == [0.5, cut, cut, cut, 0.5, 0.5]
    assert int(state.cut_count) == 3
    assert int(state.nonfinite_count) == 0


def test_loss_exactly_at_threshold_is_not_cut() -> None:
    applied, state = run_fallback([1.0, 1.0000001])
    assert applied == [0.5, f32(0.05)]
    assert int(state.cut_count) == 1


def test_a_new_breach_during_a_cut_restarts_the_count() -> None:
    applied, state = run_fallback([2.0, 0.5, 3.0, 0.5, 0.5, 0.5])
    cut = f32(0.05)
    assert applied == [cut, cut, cut, cut, cut, 0.5]
    assert int(state.cut_count) == 5


def test_zero_fallback_batches_cuts_only_the_breaching_batch() -> None:
    applied, state = run_fallback([2.0, 0.5, 2.0], n_batches=0)
    assert applied == [f32(0.05), 0.5, f32(0.05)]
    assert int(state.cut_count) == 2


@pytest.mark.parametrize(("weight", "factor"), [(0.5, 0.01), (0.0714, 0.01), (0.3, 0.0), (0.3, 1.0)])
def test_fallback_factor_is_applied_exactly(weight: float, factor: float) -> None:
    applied, _ = run_fallback([5.0], weight=weight, factor=factor)
    assert applied == [f32(weight * factor)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_switches_the_term_off_for_the_rest_of_the_epoch(bad: float) -> None:
    applied, state = run_fallback([0.5, bad, 0.5, 0.5, 2.0, 0.5])
    assert applied == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert int(state.nonfinite_count) == 1
    assert int(state.cut_count) == 0  # batches with the term off are not counted as cut
    assert bool(state.off)


def test_non_finite_loss_during_a_cut_counts_both() -> None:
    applied, state = run_fallback([2.0, math.nan, math.nan, 0.5])
    assert applied == [f32(0.05), 0.0, 0.0, 0.0]
    assert (int(state.cut_count), int(state.nonfinite_count)) == (1, 2)

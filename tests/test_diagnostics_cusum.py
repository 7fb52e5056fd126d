"""The change-point test: calibrated false-alarm rate on stationary synthetic trajectories, and power."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import cusum, cusum_threshold, detect


def _binomial_bound(alpha, trials, mc_sims=4000):
    """alpha plus three standard errors of the empirical rate plus three of the threshold's Monte-Carlo error."""
    return alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials) + 3 * np.sqrt(alpha * (1 - alpha) / mc_sims)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_false_alarm_rate_iid_gaussian(alpha):
    rng = np.random.default_rng(123)
    trials, n = 400, 120
    alarms = sum(bool(cusum(rng.normal(3.0, 2.0, n), alpha=alpha)) for _ in range(trials))
    assert alarms / trials <= _binomial_bound(alpha, trials)
    # and not absurdly conservative (the calibration is tight for iid Gaussian data)
    assert alarms / trials >= alpha - 3 * np.sqrt(alpha * (1 - alpha) / trials) - 0.02


def test_false_alarm_rate_detect_transition_on_stationary_trajectories():
    """Stationary training-like trajectories: log-loss decreasing at a constant rate with AR(1) noise, a
    canonical gradient norm that is stationary in log; ``detect`` with blocks of 10 steps monitors both keys,
    the Bonferroni split keeps the overall rate below alpha."""
    rng = np.random.default_rng(7)
    alpha, trials, n = 0.1, 200, 1000
    hits = 0
    for _ in range(trials):
        e = np.zeros(n)
        eps = rng.standard_normal(n)
        for t in range(1, n):
            e[t] = 0.5 * e[t - 1] + eps[t]
        traj = {"loss": np.exp(-0.002 * np.arange(n) + 0.05 * e),
                "grad_norm_canonical": np.exp(0.1 * rng.standard_normal(n))}
        hits += bool(detect(traj, kinds=["transition"], alpha=alpha, block=10, variants=("quotient",)))
    assert hits / trials <= _binomial_bound(alpha, trials)


def test_threshold_monotone_and_detects_a_shift():
    assert cusum_threshold(100, 0.01) > cusum_threshold(100, 0.1)
    assert cusum_threshold(400, 0.05) > cusum_threshold(50, 0.05)
    rng = np.random.default_rng(0)
    x = np.r_[rng.standard_normal(80), rng.standard_normal(40) - 1.5]
    al = [a for a in cusum(x, alpha=0.05) if a.index >= 80]  # (an earlier alarm would be a 5%-level false one)
    assert al and al[0].index <= 92 and al[0].direction == -1
    assert 70 <= al[0].onset <= al[0].index


def test_transition_in_loss_rate_detected_within_window():
    """A change of the loss decay rate at step 600 (a phase transition) is found, with the alarm at most 100
    steps late and the estimated onset within 100 steps."""
    rng = np.random.default_rng(1)
    n = 1000
    rate = np.where(np.arange(n) < 600, 0.001, 0.01)
    loss = np.exp(-np.cumsum(rate) + 0.02 * rng.standard_normal(n))
    ev = detect({"loss": loss}, kinds=["transition"], block=10)
    assert ev, "the rate change was not detected"
    assert 600 <= ev[0].step <= 700
    assert abs(ev[0].details["onset_step"] - 600) <= 100
    assert ev[0].invariant and ev[0].variant == "quotient"


def test_false_alarm_rate_is_location_invariant_at_a_large_level():
    """A stationary series at level 1e8 with unit noise alarms as rarely as one at level 0: the running variance
    is accumulated relative to a value of the series (the raw one-pass variance cancelled: 96% false alarms)."""
    rng = np.random.default_rng(0)
    trials, alpha = 200, 0.05
    alarms = sum(bool(cusum(1e8 + rng.standard_normal(60), alpha=alpha)) for _ in range(trials))
    assert alarms / trials <= _binomial_bound(alpha, trials)

"""README, detector table: the edge of stability is read at the Hessian refreshes only, so the period-two
oscillation past the edge hides from every refresh of an even period, and an every-step refresh re-arms on each
low phase (``rearm``)."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import detect

N, CROSS, HIGH, LOW = 200, 60, 2.5, 1.7


def _oscillating_run(every):
    """``lr * lambda`` rising linearly to 2 at step CROSS (below it before), then HIGH on odd and LOW on even steps,
    the Hessian refreshed every ``every`` steps (NaN between refreshes)."""
    k = np.arange(N)
    sharp = np.where(k < CROSS, 1.0 + k / CROSS * 0.99, np.where(k % 2 == 1, HIGH, LOW))
    sharp = np.where(k % every == 0, sharp, np.nan)
    return {"loss": np.ones(N), "sharpness_raw": sharp}


def _level2_steps(traj, **options):
    events = detect(traj, lr=1.0, kinds=["edge_of_stability"], **options)
    return [e.step for e in events if e.variant == "raw" and e.details["level"] == 2.0]


@pytest.mark.parametrize("every", [2, 10, 20])
def test_an_even_refresh_period_misses_the_oscillating_edge(every):
    # every refresh falls on an even step, the oscillation's low phase (LOW < 2): nothing to read
    assert _level2_steps(_oscillating_run(every)) == []


@pytest.mark.parametrize("every", [5, 19, 21])
def test_an_odd_refresh_period_finds_the_oscillating_edge(every):
    # the first refresh at or after CROSS on an odd step (the high phase) is the event
    first = next(s for s in range(CROSS, N) if s % every == 0 and s % 2 == 1)
    assert _level2_steps(_oscillating_run(every))[0] == first


def test_every_step_refreshes_give_an_event_per_oscillation_unless_rearm_is_lower():
    high_steps = [s for s in range(CROSS, N) if s % 2 == 1]
    # LOW is below the default re-arming level 0.9 * 2: every high step crosses again
    assert _level2_steps(_oscillating_run(1)) == high_steps
    # rearm=0.5 re-arms below 1, which the oscillation never reaches: one event
    assert _level2_steps(_oscillating_run(1), rearm=0.5) == [high_steps[0]]

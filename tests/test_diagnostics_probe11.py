"""Diagnostics on long runs and real transitions beyond the tested ones: the cost of a run with many events, and
the detectors' input contract on diverged, constant, short, integer and irregularly recorded series."""

import numpy as np

from quotient_sgd.diagnostics import _detect, detect


def _hovering(n: int, oscillating: int) -> dict:
    """``n`` steps at ``lr = 0.1``; the step sharpness alternates 21 / 17 (``lr * lambda`` 2.1 / 1.7: across the
    edge and below its re-arming level 1.8) for the first ``oscillating`` steps, then stays at 10; every step a
    refresh."""
    t = np.arange(n)
    sharp = np.where(t < oscillating, np.where(t % 2 == 0, 21.0, 17.0), 10.0)
    return {"loss": np.exp(-t / n), "sharpness_horizontal": sharp, "sharpness_quotient": sharp,
            "hessian_step": t}


def test_events_of_a_run_hovering_at_the_edge_cost_one_pass_over_the_refreshes(monkeypatch):
    """A long run at the edge of stability crosses its level once every oscillation: each ``step`` event looked up
    the refresh of its decomposition by a pass over the whole run (``fresh_mask``), time quadratic in the run's
    length (100000 steps hovering at the edge: 8.5 s, 200000: 56 s).  The passes no longer grow with the number
    of events, and each event's decomposition is that of its own step's refresh."""
    calls = []
    real = _detect.fresh_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_detect, "fresh_mask", counting)
    passes = {}
    for oscillating in (20, 400):
        calls.clear()
        events = detect(_hovering(600, oscillating), lr=0.1, kinds=["edge_of_stability"])
        step = [e for e in events if e.variant == "step" and e.details["level"] == 2.0]
        assert [e.step for e in step] == list(range(0, oscillating, 2))  # one crossing per oscillation
        for e in step:
            assert e.details["at_step"] == e.step
            assert e.details["lambda_step"] == 21.0 and e.details["lambda_canonical"] == 21.0
        passes[oscillating] = len(calls)
    assert passes[400] == passes[20], passes


# ----------------------------------------------------------------------------------------------------------------
# records at irregular steps: every step for the first 100 steps, then every 100 steps (a common recording plan);
# the windows count steps, as they do for records every K steps

_IRREGULAR = np.r_[np.arange(100), np.arange(100, 5001, 100)]


def test_a_sustained_divergence_recorded_sparsely_after_a_dense_start_is_reported():
    """The loss 1000 x its initial value for the last 1000 steps (11 records) is a divergence at its first step, as
    on the same run recorded every step; it was none (a patience of 20 steps read as 20 records, the median
    spacing being 1).  10 high steps inside the dense part stay below the patience in both recordings."""
    for steps in (_IRREGULAR, np.arange(5001)):
        loss = np.exp(-steps / 2000.0)
        high = np.where(steps >= 4000, 1000.0, loss)
        ev = detect({"loss": high, "step": steps}, kinds=["divergence"])
        assert [(e.step, e.kind) for e in ev] == [(4000, "divergence")], len(steps)
        brief = np.where((steps >= 50) & (steps < 60), 1000.0, loss)
        assert detect({"loss": brief, "step": steps}, kinds=["divergence"]) == []


def _slow_rise(t):
    """Falls to 0.1 by step 1000, then rises by a factor e every 3640 steps (1.4 % in 50 steps)."""
    t = np.asarray(t, np.float64)
    return np.where(t < 1000, 1.0 - 0.9 * t / 1000, 0.1 * np.exp((t - 1000) / 3640))


def test_a_slow_rise_recorded_sparsely_is_no_loss_spike_and_a_spike_keeps_its_size():
    """The loss rises by 1.4 % per 50 steps: no spike, recorded every step or irregularly (the base was the minimum
    over 50 *records*, 4900 steps of the sparse part, and the rise read as a 3x spike at step 3600).  A record 3x
    the one before it is a spike of strength 3 (the loss rising 1.4 % per 50 steps in between: within 3.1), not 5.2
    (against the minimum 4900 steps back)."""
    for steps in (_IRREGULAR, np.arange(5001)):
        assert detect({"loss": _slow_rise(steps), "step": steps}, kinds=["loss_spike", "catapult"]) == []
    loss = _slow_rise(_IRREGULAR)
    loss[_IRREGULAR == 3000] *= 3
    ev = detect({"loss": loss, "step": _IRREGULAR}, kinds=["loss_spike"])
    assert [e.step for e in ev] == [3000]
    np.testing.assert_allclose(ev[0].strength, 3 * _slow_rise(3000) / _slow_rise(2900), rtol=1e-12)


def test_a_catapults_confirm_window_is_judged_in_one_pass(monkeypatch):
    """The catapult's candidate records were judged one by one, a window median each for every record below the
    threshold: 1e5 steps of a raw mini-batch loss (10891 spikes) with a 30 %-noisy sharpness took 160 s.  The
    medians a spike costs no longer grow with its confirm window; a noisy sharpness that does not fall is still no
    catapult, and one that falls by half is confirmed at the first record of the fall."""
    calls = []
    real = np.median

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    rng = np.random.default_rng(0)
    t = np.arange(3000)
    loss = 0.5 * np.exp(-t / 3000) * np.exp(0.05 * rng.standard_normal(t.size))
    loss[300:308] *= [3, 6, 10, 8, 5, 3, 2, 1.5]
    sharp = 19.0 * (1 + 0.1 * rng.standard_normal(t.size))
    monkeypatch.setattr(np, "median", counting)
    medians = {}
    for window in (100, 2000):
        calls.clear()
        assert detect({"loss": loss, "sharpness_quotient": sharp}, lr=0.1, kinds=["catapult"],
                      confirm_window=window) == []
        medians[window] = len(calls)
    # one more at most: the candidates' medians are taken together once any record lies below the threshold
    # (2.3 % of records at 10 % noise: ~45 more, one each, in 2000 steps)
    assert medians[2000] <= medians[100] + 1, medians
    fallen = np.where(t < 305, sharp, 0.5 * sharp)
    (ev,) = detect({"loss": loss, "sharpness_quotient": fallen}, lr=0.1, kinds=["catapult"], confirm_window=2000)
    assert ev.step == 300 and ev.details["confirm_step"] == 305

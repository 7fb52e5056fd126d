"""Probes of the phase-transition diagnostics on synthetic trajectories whose answer is known exactly."""

import json

import numpy as np

from quotient_sgd.diagnostics import LiveDetector, detect


def _dicts(events):
    return sorted(json.dumps(e.to_dict(), sort_keys=True) for e in events)


def test_live_events_cut_by_a_chunk_boundary_end_up_as_those_of_the_whole_run(tmp_path):
    # a loss spike rising over three steps (onset 40, peak 42) and a sharpness crossing lr * lambda = 2 at step 60
    # with its peak at step 70: a chunk boundary at 41 / 65 cuts both episodes before their peaks
    n = 120
    loss = np.linspace(1.0, 0.5, n)
    loss[40:44] = [2.0, 2.5, 3.5, 1.2]
    lam = np.r_[np.linspace(1.0, 2.5, 60), np.linspace(4.0, 5.0, 11), np.full(n - 71, 1.0)]
    traj = {"loss": loss, "sharpness_quotient": lam}
    opts = dict(lr=0.5, kinds=["loss_spike", "edge_of_stability"], eos_levels=(2.0,), horizon=n)
    whole = detect(traj, **opts)
    spike = [e for e in whole if e.kind == "loss_spike"]
    assert [e.step for e in spike] == [40] and spike[0].details["peak_step"] == 42
    np.testing.assert_allclose(spike[0].strength, 3.5 / loss[39])  # the peak over the minimum before it
    assert {(e.step, e.details["peak_step"]) for e in whole if e.kind == "edge_of_stability"} == {(60, 70)}
    path = tmp_path / "events.json"
    live = LiveDetector(path=path, **opts)
    new = []
    for a, b in ((0, 41), (41, 65), (65, n)):
        new += live.update({k: v[a:b] for k, v in traj.items()})
    assert sorted(e.key() for e in new) == sorted(e.key() for e in whole)  # each reported once
    assert _dicts(live.events) == _dicts(whole)
    assert sorted(json.dumps(d, sort_keys=True) for d in json.loads(path.read_text())) == _dicts(whole)


def test_a_planned_horizon_in_steps_keeps_a_subsampled_trajectorys_transition():
    # the loss's log-rate changes from -1e-3 to -4e-3 at step 6000 of 10000; kept every 10 steps with the planned
    # horizon in steps, the change is found as without the horizon (the blocks of horizon // 100 *records* left
    # 10 blocks, too few to monitor: no event)
    rng = np.random.default_rng(0)
    t = np.arange(10_000)
    loss = np.exp(np.cumsum(np.where(t < 6000, -1e-3, -4e-3) + 1e-3 * rng.standard_normal(t.size)))
    full = detect({"loss": loss, "step": t}, kinds=["transition"], horizon=10_000)
    kept = {"loss": loss[::10], "step": t[::10]}
    for ev in (full, detect(kept, kinds=["transition"]), detect(kept, kinds=["transition"], horizon=10_000)):
        assert len(ev) == 1 and 6000 <= ev[0].details["onset_step"] <= ev[0].step <= 6300, ev


def test_catapult_decomposition_after_the_spike_uses_the_learning_rate_of_its_step():
    # spike at step 50, the sharpness the step sees drops from 10 to 4 at step 53, under a decaying schedule:
    # lr * lambda_step after the spike is lr[53] * 4 (it was taken with lr[50], the rate before the spike)
    n = 100
    loss = np.r_[np.linspace(1.0, 0.5, 50), [3.0, 4.0, 2.0], np.linspace(0.4, 0.1, n - 53)]
    lam_q = np.r_[np.full(53, 5.0), np.full(n - 53, 2.0)]
    traj = {"loss": loss, "sharpness_quotient": lam_q, "sharpness_horizontal": 2.0 * lam_q}
    lr = np.linspace(0.3, 0.1, n)
    (ev,) = [e for e in detect(traj, lr=lr, kinds=["catapult"]) if e.variant == "step"]
    assert ev.step == 50 and ev.details["confirm_step"] == 53
    before, after = ev.details["before"], ev.details["after"]
    assert before["at_step"] == 50 and after["at_step"] == 53
    np.testing.assert_allclose(before["lr_times_lambda_step"], lr[50] * 10.0, rtol=1e-12)
    np.testing.assert_allclose(after["lr_times_lambda_step"], lr[53] * 4.0, rtol=1e-12)
    for d in (before, after):  # the decomposition's identity
        np.testing.assert_allclose(d["lr_times_lambda_step"], d["lr_times_lambda_canonical"] * d["gauge_factor"],
                                   rtol=1e-12)


def test_one_non_finite_loss_does_not_poison_the_smoothed_loss_of_the_rest_of_the_run():
    # with spike_smooth=5 a single inf / NaN loss at step 30 is a spike of the 5-step windows that hold it, ending
    # at step 35; the spike at steps 120-122 is still found (the running sum carried inf - inf = NaN into every
    # later row: one spike from 30 to the end)
    from quotient_sgd.diagnostics._detect import _causal_mean

    n = 200
    for bad in (np.inf, np.nan):
        loss = np.linspace(1.0, 0.5, n)
        loss[30] = bad
        loss[120:123] = 3.0
        smooth = _causal_mean(loss, 5)
        ref = np.array([np.mean(loss[max(0, i - 4): i + 1]) for i in range(n)])
        np.testing.assert_allclose(smooth, ref, rtol=1e-12)  # NaN / inf in the same places (assert_allclose)
        ev = detect({"loss": loss}, kinds=["loss_spike"], spike_smooth=5)
        assert [(e.step, e.details["end_step"]) for e in ev] == [(30, 35), (121, 126)]


def test_a_loss_or_read_key_that_is_not_real_numbers_is_refused_by_name():
    import pytest

    n = 20
    for key, bad in (("loss", np.array(["a"] * n)), ("loss", np.ones(n) + 1j), ("fold_number", np.ones(n) + 1j)):
        traj = {"loss": np.ones(n), key: bad}
        with pytest.raises(ValueError, match=f"'{key}' key must hold real numbers.*{bad.dtype}"):
            detect(traj, kinds=["fold", "loss_spike"])

"""The catapult detector reads a lasting fall of the sharpness, not one noisy sample: a loss spike with no sharpness
change is not a catapult at 10 % per-sample noise (one sample before the spike against any one of the next 100
was: 21 of 30 seeds), while spikes followed by a sharpness that falls by 30-50 % and stays down still are."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import LiveDetector, detect


def _run(seed, noise, fall=0.0, every=1):
    """600 steps, a loss spike at steps 300-307, sharpness 19 x (1 + noise N(0, 1)) falling by ``fall`` from step
    304 on; recorded every ``every`` steps (NaN in between)."""
    t = np.arange(600)
    rng = np.random.default_rng(seed)
    loss = 0.5 * np.exp(-t / 500) * np.exp(0.1 * rng.standard_normal(600))
    loss[300:308] *= [3, 6, 10, 8, 5, 3, 2, 1.5]
    sharp = np.where(t < 304, 19.0, 19.0 * (1 - fall)) * (1 + noise * rng.standard_normal(600))
    return {"loss": loss, "sharpness_quotient": np.where(t % every == 0, sharp, np.nan)}


def _catapults(traj):
    return detect(traj, lr=0.1, kinds=["catapult"])


def test_the_reported_reproduction_gives_no_catapult():
    t = np.arange(600)
    rng = np.random.default_rng(0)
    loss = 0.5 * np.exp(-t / 500) * np.exp(0.1 * rng.standard_normal(600))
    loss[300:308] *= [3, 6, 10, 8, 5, 3, 2, 1.5]
    traj = {"loss": loss, "sharpness_quotient": 19 * (1 + 0.1 * rng.standard_normal(600))}
    ev = detect(traj, lr=0.1, kinds=["catapult", "loss_spike"])
    assert [e.step for e in ev if e.kind == "loss_spike"] == [300]  # the spike is there ...
    assert [e for e in ev if e.kind == "catapult"] == []  # ... the sharpness did not fall


@pytest.mark.parametrize("every", [1, 10])
def test_false_catapults_at_ten_percent_noise_are_rare(every):
    # measured: 0 of 200 seeds, on every step and every 10 steps (before: 21 and 5 of 30); at most 1 of 20 allowed
    false = [s for s in range(20) if _catapults(_run(s, 0.1, every=every))]
    assert len(false) <= 1, false


@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.parametrize("fall", [0.3, 0.5])
def test_true_catapults_at_ten_percent_noise_are_found_at_the_spike(fall, every):
    found = 0
    for s in range(10):
        ev = _catapults(_run(s, 0.1, fall, every))
        if not ev:
            continue
        (e,) = ev
        found += 1
        d = e.details
        assert e.step == 300 and e.variant == "quotient" and e.invariant
        # confirmed where the sharpness has fallen (step 304), give or take the noise and the record spacing
        assert 300 < d["confirm_step"] <= 304 + 2 * every, d
        assert d["sharpness_after"] < 0.8 * d["sharpness_before"]
        np.testing.assert_allclose(d["sharpness_before"], 19.0, rtol=0.1)  # a median, not one noisy sample
        assert d["window_before"] > 1 and d["window_after"] > 1
    assert found >= 9, found


def test_held_values_between_hessian_refreshes_read_as_the_nan_interleaved_records():
    # a sharpness held between refreshes, marked by hessian_step, has the records of the NaN-interleaved series
    # (held copies are not records: ten equal values in a row would read as a noiseless series)
    for s, fall in ((0, 0.0), (1, 0.5)):
        nan = _run(s, 0.1, fall, every=10)
        rec = nan["sharpness_quotient"]
        held = {"loss": nan["loss"], "sharpness_quotient": np.repeat(rec[::10], 10),
                "hessian_step": np.arange(600) // 10 * 10}
        a, b = _catapults(nan), _catapults(held)
        assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
        assert len(a) == (fall > 0)


def test_a_noiseless_sharpness_is_still_compared_sample_against_sample():
    n = 300
    loss = np.ones(n)
    loss[100:105] = [3, 9, 27, 9, 3]
    sharp = np.r_[np.full(130, 20.0), np.full(n - 130, 15.0)]
    (e,) = _catapults({"loss": loss, "sharpness_quotient": sharp})
    d = e.details
    assert (e.step, d["confirm_step"], d["window_before"], d["window_after"]) == (100, 130, 1, 1)
    assert d["sharpness_noise"] == 0.0


def test_live_chunks_confirm_a_noisy_catapult_as_one_call_does():
    # a window after the spike that runs past the end of a chunk does not confirm yet: the live events equal
    # those of one call on the whole run, whatever the chunking
    traj = _run(3, 0.1, 0.4)
    full = _catapults(traj)
    assert len(full) == 1 and full[0].details["window_after"] > 1
    for size in (7, 53):
        live = LiveDetector(lr=0.1, kinds=["catapult"])
        for a in range(0, 600, size):
            live.update({k: v[a:a + size] for k, v in traj.items()})
        assert [e.to_dict() for e in live.events] == [e.to_dict() for e in full]

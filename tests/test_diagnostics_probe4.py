"""Detectors on malformed inputs met in use: non-finite step numbers, a learning-rate key that is negative,
infinite or not numbers, a ``hessian_step`` key of another shape or dtype, ``slice_shocks`` entries that are not
an integer step and a positive shock time; and a live detector fed random chunkings of a trajectory that has
every kind of event."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import LiveDetector, detect


def _spiky(n=61):
    return np.r_[np.ones(n // 2), [3.0], np.ones(n - n // 2 - 1)]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e300])
def test_a_non_finite_or_huge_step_number_is_refused_by_name(bad):
    """``inf`` was cast to -2^63, whose difference with the previous step wraps round to a positive number, so
    the steps passed as strictly increasing and the row was reported at step -9223372036854775808."""
    loss = _spiky()
    step = np.r_[np.arange(60.0), bad]
    with pytest.raises(ValueError, match=r"'step' key must hold integer step numbers.*step\[60\] = "):
        detect({"loss": loss, "step": step}, kinds=["loss_spike"])
    # the same steps, finite, are read
    assert [e.step for e in detect({"loss": loss, "step": np.arange(61.0)}, kinds=["loss_spike"])] == [30]


def test_a_learning_rate_key_is_checked_like_the_lr_argument():
    """A negative ``lr`` key with a negative sharpness read as past the edge of stability (the ``lr`` argument
    refuses it); a string key failed in a bare float conversion.  NaN rows (a live chunk recorded before the key
    was) are still read as rows without a learning rate."""
    n = 50
    neg = {"loss": np.ones(n), "sharpness_quotient": np.full(n, -25.0)}
    with pytest.raises(ValueError, match="lr"):
        detect(neg, lr=-0.1, kinds=["edge_of_stability"])
    for key in ("lr", "learning_rate"):
        for bad, match in ((np.full(n, -0.1), r"learning rates >= 0.*-0\.1 at row 0"),
                           (np.r_[np.full(n - 1, 0.1), np.inf], f"row {n - 1}"),
                           (np.array(["0.1"] * n), "real numbers.*<U3")):
            with pytest.raises(ValueError, match=f"'{key}' key must hold"):
                detect({**neg, key: bad}, kinds=["edge_of_stability"])
            with pytest.raises(ValueError, match=match):
                detect({**neg, key: bad}, kinds=["edge_of_stability"])
    # NaN rows: no learning rate there, the rest read (the crossing of 25 * 0.1 = 2.5 at the first row with one)
    lr = np.r_[np.full(20, np.nan), np.full(30, 0.1)]
    ev = detect({"loss": np.ones(n), "sharpness_quotient": np.full(n, 25.0), "lr": lr}, kinds=["edge_of_stability"])
    assert sorted((e.step, e.details["level"]) for e in ev) == [(20, 1.0), (20, 2.0)]


@pytest.mark.parametrize("hs, match", [
    (np.zeros((10, 2)), r"shape \(10, 2\)"),           # one column per Hessian: a bare broadcast error
    (np.array(["0"] * 10), "dtype <U1"),                # strings: a bare float conversion error
    (np.r_[0.0, 0.0, 2.5, np.full(7, 2.5)], r"hessian_step\[2\] = "),  # 2.5 was truncated to 2
])
def test_a_hessian_step_key_that_is_not_one_integer_per_row_is_refused_by_name(hs, match):
    traj = {"loss": np.ones(10), "sharpness_quotient": np.full(10, 30.0)}
    ok = detect({**traj, "hessian_step": np.r_[-1, np.zeros(4), np.full(5, 5)]}, lr=0.1, kinds=["edge_of_stability"])
    assert [e.step for e in ok] == [1, 1]  # -1: no refresh yet; the refresh of step 0 first seen at row 1
    with pytest.raises(ValueError, match="'hessian_step' key") as err:
        detect({**traj, "hessian_step": hs}, lr=0.1, kinds=["edge_of_stability"])
    assert err.match(match)
    # NaN, a row without a refresh (live chunks), is still allowed
    nan_hs = np.r_[np.nan, np.zeros(4), np.full(5, 5.0)]
    assert [e.step for e in detect({**traj, "hessian_step": nan_hs}, lr=0.1, kinds=["edge_of_stability"])] == [1, 1]


@pytest.mark.parametrize("entry", [
    {"step": "3", "shock_time": 1.0},   # a bare int() error deep inside
    {"step": 2.5, "shock_time": 1.0},   # truncated to step 2
    {"step": 3, "shock_time": np.nan},  # an event of strength NaN
    {"step": 3, "shock_time": -1.0},    # an event of strength inf
    {"step": 3, "shock_time": 0.0},
    {"step": 3, "shock_time": 1.0, "lr": -0.1},
])
def test_slice_shocks_need_an_integer_step_and_a_positive_shock_time(entry):
    with pytest.raises(ValueError, match="slice_shocks=.*integer 'step'.*'shock_time' > 0"):
        detect({"loss": np.ones(10)}, lr=0.1, kinds=["shock"], slice_shocks=[entry])
    with pytest.raises(ValueError, match="slice_shocks"):
        LiveDetector(kinds=["shock"], slice_shocks=[entry])
    # what is allowed: 3.0 for step 3, an infinite shock time (strength 0), an own lr
    ev = detect({"loss": np.ones(10)}, lr=0.1, kinds=["shock"],
                slice_shocks=[{"step": 3.0, "shock_time": 0.5}, {"step": 4, "shock_time": np.inf},
                              {"step": 5, "shock_time": 0.5, "lr": 0.2}])
    assert [(e.step, e.strength) for e in ev] == [(3, 0.1 / 0.5), (4, 0.0), (5, 0.2 / 0.5)]


def test_slice_shocks_on_an_empty_trajectory_have_no_learning_rate_of_their_step():
    """With ``lr`` given and no rows, the learning rate of the shock's step was read from an empty array
    (IndexError)."""
    (e,) = detect({"loss": np.ones(0)}, lr=0.1, kinds=["shock"], slice_shocks=[{"step": 0, "shock_time": 1.0}])
    assert e.step == 0 and np.isnan(e.strength)
    (e,) = detect({"loss": np.ones(0)}, lr=0.1, kinds=["shock"],
                  slice_shocks=[{"step": 0, "shock_time": 2.0, "lr": 0.5}])
    assert e.strength == 0.25


def _rich(seed, n=400, every=5):
    """A trajectory with a catapult-like spike and sharpness drop, noisy fold / shock numbers, Hessian refreshes
    every ``every`` steps, a rate change of the canonical gradient norm and (some seeds) non-finite losses."""
    r = np.random.default_rng(seed)
    t = int(r.integers(80, n - 120))
    loss = np.exp(np.cumsum(-2e-3 + 0.02 * r.standard_normal(n)))
    loss[t:t + 8] *= np.array([3, 10, 30, 10, 3, 2, 1.5, 1.2])
    if seed % 2:
        loss[n - 30] = np.inf
    sh = np.where(np.arange(n) < t + 10, 25.0, 12.0) + r.standard_normal(n)
    shq = np.where(np.arange(n) % every == 0, sh, np.nan)
    gn = np.exp(np.cumsum(np.where(np.arange(n) < n // 2, 0.0, 0.01) + 0.003 * r.standard_normal(n)))
    return {"loss": loss, "sharpness_quotient": shq, "sharpness_horizontal": 1.3 * shq, "sharpness_raw": 2 * shq,
            "hessian_step": (np.arange(n) // every) * every, "fold_number": np.abs(2.5 * r.standard_normal(n)),
            "shock_number": np.abs(0.8 * r.standard_normal(n)), "grad_norm_canonical": gn,
            "lr": np.full(n, 0.1), "step": 7 + np.arange(n)}


@pytest.mark.parametrize("seed", range(4))
def test_live_detector_on_random_chunkings_equals_one_detect_call_for_every_kind(seed):
    tr = _rich(seed)
    n = len(tr["loss"])
    full = detect(tr, horizon=n, spike_smooth=3)
    assert {e.kind for e in full} >= {"catapult", "edge_of_stability", "fold", "loss_spike", "shock", "transition"}
    r = np.random.default_rng(100 + seed)
    cuts = np.sort(r.choice(np.arange(1, n), size=int(r.integers(1, 25)), replace=False))
    live = LiveDetector(horizon=n, spike_smooth=3)
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
        live.update({k: v[a:b] for k, v in tr.items()})
    got = sorted(live.events, key=lambda e: (e.step, e.kind, e.variant))
    assert [e.to_dict() for e in got] == [e.to_dict() for e in full]


def test_a_learning_rate_stored_once_is_checked_too():
    traj = {"loss": np.ones(50), "sharpness_quotient": np.full(50, -25.0)}
    with pytest.raises(ValueError, match=r"'lr' key must hold learning rates >= 0.*-0\.1 at row 0"):
        detect({**traj, "lr": np.float64(-0.1)}, kinds=["edge_of_stability"])
    assert detect({**traj, "lr": np.float64(0.1)}, kinds=["edge_of_stability"]) == []


@pytest.mark.parametrize("key", ["sharpness_quotient", "sharpness_horizontal", "fold_number", "shock_number_hessian",
                                 "grad_norm_canonical"])
def test_a_read_key_with_a_column_per_step_is_refused_not_skipped(key):
    """``(steps, 1)`` (a column vector) was read as a missing key: crossings of every level gave no event."""
    n = 20
    traj = {"loss": np.ones(n), key: np.full(n, 50.0)}
    if key != "grad_norm_canonical":  # (a transition needs more rows)
        assert detect(traj, lr=0.1)  # one value per step: level crossings
    with pytest.raises(ValueError, match=rf"'{key}'.*one value per step.*\(20, 1\)"):
        detect({**traj, key: np.full((n, 1), 50.0)}, lr=0.1)
    # the top-k keys are (steps, k) by design and still allowed; the first column stands in for a missing
    # sharpness_quotient
    wide = np.full((n, 3), 50.0)
    expect = traj if "sharpness_quotient" in traj else {**traj, "sharpness_quotient": wide[:, 0]}
    assert detect({**traj, "hessian_top_quotient": wide}, lr=0.1) == detect(expect, lr=0.1)


def test_a_catapult_is_confirmed_by_a_fall_of_the_sharpness_also_when_it_is_negative():
    """With a negative sharpness before the spike, ``drop_factor * before`` lies above it: a *rise* from -1 to
    -0.9 confirmed a catapult (and a fall from -1 to -1.1 did not).  A fall by ``(1 - drop_factor) |before|`` is
    required, which for a positive sharpness is the documented ``below drop_factor * before``."""
    n = 300
    loss = np.ones(n)
    loss[100:105] = [3, 9, 27, 9, 3]

    def cat(before, after):
        sharp = np.r_[np.full(150, before), np.full(150, after)]
        return [(e.step, e.details["confirm_step"]) for e in detect({"loss": loss, "sharpness_quotient": sharp},
                                                                    kinds=["catapult"])]

    assert cat(-1.0, -0.9) == [] and cat(-1.0, -1.1) == [] and cat(-1.0, 1.0) == []
    assert cat(-1.0, -1.3) == [(100, 150)]
    # positive sharpness: below drop_factor * before (0.8), the documented rule, at the boundary too
    assert cat(20.0, 16.0) == [] and cat(20.0, 15.99) == [(100, 150)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the ratio after / before of a zero sharpness warned of a division)
        assert cat(0.0, -0.5) == [(100, 150)] and cat(0.0, 0.0) == []


def test_a_live_chunk_without_a_loss_is_refused_by_name_and_not_kept():
    """Such a chunk was appended with no loss rows, so the next call failed with 'every series needs one row per
    row of loss' about the chunk's other keys, and every later chunk too."""
    live = LiveDetector(kinds=["loss_spike"])
    live.update({"loss": np.ones(30)})
    with pytest.raises(KeyError, match=r"'loss' key.*\['sharpness_quotient'\]"):
        live.update({"sharpness_quotient": np.ones(3)})
    # the detector goes on as if the bad chunk had not been sent
    assert [e.step for e in live.update({"loss": np.r_[3.0, np.ones(5)]})] == [30]


def test_cusum_refuses_a_series_that_is_not_1d_and_parameters_out_of_range():
    """A (blocks, 2) array was flattened row by row (its two columns interleaved into one series); a negative
    drift ``k`` alarms on stationary noise."""
    from quotient_sgd.diagnostics import cusum, cusum_threshold

    rng = np.random.default_rng(0)
    two = np.stack([rng.standard_normal(200), 5.0 + rng.standard_normal(200)], axis=1)
    assert cusum(two[:, 1]) == cusum(two[:, 1] - 5.0)  # each column is a series (location invariant)
    with pytest.raises(ValueError, match=r"cusum: x must be a 1-D series.*\(200, 2\)"):
        cusum(two)  # read as one series, every other value 5 higher
    with pytest.raises(ValueError, match="cusum: x must be"):
        cusum(np.array(["1.0"] * 20))
    for bad, match in (({"k": -0.5}, "k=-0.5"), ({"min_ref": 1}, "min_ref=1"), ({"clip": 0.0}, "clip=0.0")):
        with pytest.raises(ValueError, match=match):
            cusum(two[:, 0], **bad)
        with pytest.raises(ValueError, match=match):
            cusum_threshold(50, 0.05, **bad)


@pytest.mark.parametrize("where, variant", [("horizontal", "step"), ("quotient", "quotient"), ("raw", "raw")])
def test_hessian_top_k_alone_is_read_as_the_sharpness(where, variant):
    """A trajectory holding only ``hessian_top_<where>`` of shape (steps, k) (top eigenvalues, descending) gave no
    sharpness-based event: the alias needed a 1-D key.  Its first column is now the sharpness: the same events as
    with ``sharpness_<where>`` equal to that column, and the second column plays no part."""
    rng = np.random.default_rng(0)
    n = 80
    top = np.r_[np.linspace(5.0, 25.0, n)]
    wide = np.stack([top, top * rng.uniform(0.2, 0.9, n)], axis=1)
    loss = np.r_[np.linspace(1.0, 0.5, 40), [1.6, 2.4], np.linspace(0.4, 0.1, n - 42)]
    sharp = np.r_[wide[:43, 0], wide[43:, 0] * 0.5]  # a fall after the spike: a catapult
    wide[:, 0] = sharp
    kinds = ["edge_of_stability", "catapult"]
    alone = detect({"loss": loss, f"hessian_top_{where}": wide}, lr=0.1, kinds=kinds)
    named = detect({"loss": loss, f"sharpness_{where}": wide[:, 0]}, lr=0.1, kinds=kinds)
    assert [e.to_dict() for e in alone] == [e.to_dict() for e in named]
    assert {e.kind for e in alone} == set(kinds) and all(e.variant == variant for e in alone)

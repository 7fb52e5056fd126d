"""HJ engine and diagnostics: arguments read as something else, and synthetic cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.diagnostics import (cusum, cusum_threshold, detect, detect_run, fold_edge, fold_levels_for,
                                      LiveDetector, stability_edge)
from quotient_sgd.hj import cole_hopf_monte_carlo, find_shocks, Grid, shock_time_from_hessian


def _shifted_series(seed=0, n=100, shift=3.0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.standard_normal(n // 2), shift + rng.standard_normal(n - n // 2)]


def test_cusum_horizon_and_threshold_are_checked_and_a_short_horizon_covers_the_series():
    # A horizon below min_ref (n_blocks=5, or a fraction such as 2.5 truncated to 2) gave an infinite threshold for
    # a series of 100 values: no alarm on a 3-sigma shift, without a word; a NaN threshold never alarmed and a
    # negative one alarmed on every value; cusum_threshold(10.5) simulated 10 blocks, none monitored, and returned 0
    # (a threshold 0 is what the calibration gives at a large alpha: it alarms when the statistic leaves zero).
    x = _shifted_series()
    default = cusum(x)
    assert default and default[0].direction == 1
    # a horizon shorter than the series is raised to its length: the bound is over the series monitored
    assert cusum(x, n_blocks=5) == cusum(x, n_blocks=len(x)) == default
    assert cusum(x, n_blocks=100.0) == default
    assert cusum(x, threshold=np.inf) == []
    for bad in (2.5, -5, 0, True, "100"):
        with pytest.raises(ValueError, match=f"cusum: n_blocks={bad!r} is not allowed"):
            cusum(x, n_blocks=bad)
    for bad in (np.nan, -1.0, "3"):
        with pytest.raises(ValueError, match=f"cusum: threshold={bad!r} is not allowed"):
            cusum(x, threshold=bad)
    for args, name in (((10.5,), "n_blocks"), ((-3,), "n_blocks"), (("100",), "n_blocks"),
                       ((100, True), "alpha"), ((100, 0.05, 0.5, 10, 4.0, 0), "num_sims")):
        with pytest.raises(ValueError, match=f"cusum_threshold: {name}="):
            cusum_threshold(*args)
    assert cusum_threshold(5) == float("inf")  # fewer blocks than min_ref: nothing is monitored
    # one value monitored at alpha = 0.9: the calibrated threshold is 0, and detect takes it
    assert cusum_threshold(11, 0.9) == 0.0 and len(cusum(x, threshold=0.0)) > len(default)
    detect({"loss": np.exp(_shifted_series(n=12))}, kinds=["transition"], alpha=0.9)


def test_shock_time_from_hessian_reads_integer_and_half_precision_values_and_refuses_complex_ones():
    # Under strict dtype promotion an integer eigenvalue array failed in a bare TypePromotionError (1.0 / int32), a
    # complex value came out as inf + 0j, and bfloat16 computed 1 / 3 in bfloat16 (2e-3 off); shock_time reads
    # such fields in the default float / float32.
    got = shock_time_from_hessian(jnp.array([-2, 0, 3], jnp.int32))
    assert jnp.issubdtype(got.dtype, jnp.floating)
    np.testing.assert_array_equal(np.asarray(got), [0.5, np.inf, np.inf])
    assert float(shock_time_from_hessian(np.int32(-4))) == 0.25
    third = shock_time_from_hessian(jnp.asarray(-3.0, jnp.bfloat16))
    assert third.dtype == jnp.float32 and abs(float(third) - 1 / 3) < 1e-6
    assert np.isnan(float(shock_time_from_hessian(np.nan)))
    for bad in (1 + 2j, jnp.array([-1 + 0j]), "1", None):
        with pytest.raises(TypeError, match="shock_time_from_hessian: lambda_min="):
            shock_time_from_hessian(bad)


def test_fold_levels_for_refuses_levels_that_are_not_positive_numbers():
    # detect's fold_levels option is checked, the public mapping was not: "12" was read as its characters (the
    # levels 1 and 2), NaN and negative levels were mapped as they came, a single number failed in a bare TypeError
    assert fold_levels_for((1.0, 2.0), 0.9) == [fold_edge(0.9), stability_edge(0.9)]
    assert fold_levels_for([np.float64(0.5)]) == [0.5]
    assert fold_levels_for(x for x in (1.0, 2.0)) == [1.0, 2.0]  # (a generator: consumed by the check, it gave [])
    for bad in ("12", [np.nan], [-1.0], [], 2.0, [True]):
        with pytest.raises(ValueError, match="fold_levels_for: levels="):
            fold_levels_for(bad)


def test_live_chunks_holding_a_run_constant_give_the_events_of_detect():
    # detect takes a trajectory with a 0-d entry (a run constant such as the seed: not a series, not read); a live
    # chunk holding one failed in NumPy's bare "zero-dimensional arrays cannot be concatenated", the first chunk
    # included. Now the constant stays one value and the events are those of one detect call.
    n = 100
    loss = np.r_[np.linspace(1.0, 0.5, 50), [2.0, 3.0], np.linspace(0.4, 0.1, n - 52)]
    sharp = np.linspace(5.0, 25.0, n)  # eta * lambda crosses 1 at row 25 and 2 at row 75
    offline = detect({"loss": loss, "sharpness_quotient": sharp, "seed": 3}, lr=0.1, horizon=n)
    assert {(e.step, e.kind) for e in offline} >= {(25, "edge_of_stability"), (75, "edge_of_stability"),
                                                   (50, "loss_spike")}
    for cuts in (((0, 30), (30, 60), (60, n)), ((0, 1), (1, 60), (60, n))):
        live = LiveDetector(lr=0.1, horizon=n)
        for i, (a, b) in enumerate(cuts):
            chunk = {"loss": loss[a:b], "sharpness_quotient": sharp[a:b]}
            if b - a == 1:
                chunk = {k: v[0] for k, v in chunk.items()}  # one step as scalars
            if i < 2:
                chunk["seed"] = 3  # (not in the last chunk)
            live.update(chunk)
        assert [e.to_dict() for e in live.events] == [e.to_dict() for e in offline]


def test_a_transition_key_given_twice_is_monitored_once():
    # ["loss", "loss"] monitored the loss twice: its change point was reported twice and the Bonferroni split counted
    # it twice (alpha / 3 beside the raw grad_norm instead of alpha / 2): the same key list without repeats now
    rng = np.random.default_rng(0)
    t = np.arange(1000)
    loss = np.exp(np.where(t < 600, -0.001 * t, -0.6 - 0.004 * (t - 600)) + 0.01 * rng.standard_normal(t.size))
    traj = {"loss": loss, "grad_norm": 1.0 + 0.1 * rng.standard_normal(t.size)}
    once = detect(traj, kinds=["transition"], transition_keys=["loss"])
    assert len(once) == 1 and 600 <= once[0].step <= 700 and once[0].details["alpha"] == 0.05 / 2
    for keys in (["loss", "loss"], ("loss", "grad_norm", "loss")):
        got = detect(traj, kinds=["transition"], transition_keys=keys)
        assert [e.to_dict() for e in got] == [e.to_dict() for e in once]


def test_a_level_or_variant_given_twice_reports_its_events_once():
    # eos_levels=(2, 2.0), fold_levels=(1.0, 1.0, 2.0) and variants=("quotient", "quotient") reported every crossing
    # (change point) twice
    n = 1000
    rng = np.random.default_rng(1)
    t = np.arange(n)
    loss = np.exp(np.where(t < 600, -0.001 * t, -0.6 - 0.004 * (t - 600)) + 0.01 * rng.standard_normal(n))
    traj = {"loss": loss, "sharpness_quotient": np.linspace(5.0, 25.0, n), "fold_number": np.linspace(0.0, 3.0, n)}
    for kind, given, single in (("edge_of_stability", {"eos_levels": (2, 2.0)}, {"eos_levels": (2.0,)}),
                                ("fold", {"fold_levels": (1.0, 1, 2.0), "momentum": 0.5},
                                 {"fold_levels": (1.0, 2.0), "momentum": 0.5}),
                                ("transition", {"variants": ("quotient", "quotient")}, {"variants": ("quotient",)})):
        got = detect(traj, lr=0.1, kinds=[kind], **given)
        want = detect(traj, lr=0.1, kinds=[kind], **single)
        assert want and [e.to_dict() for e in got] == [e.to_dict() for e in want], kind


def test_monte_carlo_names_params_without_arrays_and_a_loss_that_is_not_scalar():
    # an empty params pytree failed in vmap's bare "must be passed at least one argument containing an array", a
    # vector-valued loss in jax.grad's "Gradient only defined for scalar-output functions"
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="cole_hopf_monte_carlo: params=.* no array leaves"):
        cole_hopf_monte_carlo(lambda p: 1.0, {}, 0.1, 0.1, key=key)
    with pytest.raises(ValueError, match=r"cole_hopf_monte_carlo: loss_fn returns shape \(2,\)"):
        cole_hopf_monte_carlo(lambda p: jnp.sum(p, axis=0), jnp.ones((3, 2)), 0.1, 0.1, key=key)


def test_shocks_of_a_vmapped_find_shocks_are_counted_and_listed_per_member():
    # find_shocks is built to vmap, but Shocks.count summed valid over every axis (3 for three members with one
    # front each) and to_list indexed the batched arrays with flat indices (whole rows: a bare TypeError)
    g = Grid(64, -1.0, 1.0)
    fields = jnp.stack([-a * jnp.tanh(a * (g.x - 0.3 * a) / 0.02) for a in (0.5, 1.0, 2.0)])
    batched = jax.vmap(lambda p: find_shocks(p, g))(fields)
    one = [find_shocks(p, g) for p in fields]
    np.testing.assert_array_equal(np.asarray(batched.count), [int(s.count) for s in one])
    assert np.asarray(batched.count).tolist() == [1, 1, 1] and one[0].count.shape == ()
    listed = batched.to_list()
    assert listed == [s.to_list() for s in one]
    np.testing.assert_allclose([m[0]["location"] for m in listed], [0.15, 0.3, 0.6], atol=0.02)


def test_live_chunks_with_and_without_step_numbers_are_numbered_as_detect_numbers_them():
    # a first chunk without a 'step' key (rows start_step, start_step + 1, ...) and later ones with it: the joined
    # 'step' key was NaN on the first chunk's rows and every update was refused with "step[0] = nan", a value no
    # chunk held. Rows without steps are now numbered as detect numbers a trajectory without the key.
    n = 120
    loss = np.r_[np.linspace(1.0, 0.5, 80), [2.0, 3.0], np.linspace(0.4, 0.1, n - 82)]
    sharp = np.linspace(5.0, 25.0, n)
    for start in (0, 1000):
        offline = detect({"loss": loss, "sharpness_raw": sharp, "step": start + np.arange(n)}, lr=0.1, horizon=n)
        assert {e.kind for e in offline} >= {"loss_spike", "edge_of_stability"}
        live = LiveDetector(lr=0.1, horizon=n, start_step=start)
        live.update({"loss": loss[:50], "sharpness_raw": sharp[:50]})
        live.update({"loss": loss[50:], "sharpness_raw": sharp[50:], "step": start + np.arange(50, n)})
        assert [e.to_dict() for e in live.events] == [e.to_dict() for e in offline]
    live = LiveDetector(start_step=100)
    live.update({"loss": np.ones(5)})  # steps 100 .. 104
    with pytest.raises(ValueError, match="strictly increasing"):
        live.update({"loss": np.ones(5), "step": np.arange(103, 108)})  # they overlap: still refused


def test_detect_run_refuses_a_write_flag_that_is_not_a_bool(tmp_path):
    # write="no" is truthy: events.json was rewritten although the caller asked for no writing
    for bad in ("no", "False", None, 0.0):
        with pytest.raises(ValueError, match=f"detect_run: write={bad!r} is not allowed"):
            detect_run(tmp_path, write=bad)
    assert list(tmp_path.iterdir()) == []


def test_a_learning_rate_that_is_a_string_or_a_bool_is_refused_and_a_live_one_is_checked_when_made():
    # detect read lr="0.1" as 0.1 and lr=True as 1 (edge-of-stability events at eta = 1); LiveDetector took a
    # negative, NaN or string lr and failed (or misread it) at the first chunk, while its other options fail when it
    # is made
    traj = {"loss": np.ones(20), "sharpness_quotient": np.full(20, 2.5)}
    assert len(detect(traj, lr=1.0, kinds=["edge_of_stability"])) == 2
    for bad in ("0.1", True, np.array([True] * 20)):
        with pytest.raises(ValueError, match="(?s)detect: lr=.* is not allowed"):
            detect(traj, lr=bad, kinds=["edge_of_stability"])
    for bad, match in (("0.1", "lr='0.1' is not allowed"), (True, "lr=True is not allowed"),
                       (-0.1, "lr must be finite and >= 0"), (np.nan, "lr must be finite and >= 0"),
                       (np.ones((2, 2)), r"lr of shape \(2, 2\)")):
        with pytest.raises(ValueError, match="LiveDetector: " + match):
            LiveDetector(lr=bad)
    live = LiveDetector(lr=np.full(20, 1.0), kinds=["edge_of_stability"])
    assert [e.to_dict() for e in live.update(traj)] == \
        [e.to_dict() for e in detect(traj, lr=1.0, kinds=["edge_of_stability"])]


def test_options_given_as_one_pass_iterables_are_read_as_the_same_lists():
    # the option check consumed a generator (transition_keys, variants, eos_levels, fold_levels, slice_shocks; a
    # LiveDetector's kinds), and the detector then read an empty sequence: no events, without a word
    rng = np.random.default_rng(0)
    t = np.arange(1000)
    loss = np.exp(np.where(t < 600, -0.001 * t, -0.6 - 0.004 * (t - 600)) + 0.01 * rng.standard_normal(t.size))
    traj = {"loss": loss, "sharpness_quotient": np.linspace(5.0, 25.0, t.size),
            "fold_number": np.linspace(0.0, 3.0, t.size)}
    cases = (("transition", "transition_keys", ["loss"]), ("transition", "variants", ["quotient"]),
             ("edge_of_stability", "eos_levels", [2.0]), ("fold", "fold_levels", [1.0]),
             ("shock", "slice_shocks", [{"step": 5, "shock_time": 1.0, "lr": 0.1}]))
    for kind, name, value in cases:
        want = detect(traj, lr=0.1, kinds=[kind], **{name: value})
        assert want, name
        assert detect(traj, lr=0.1, kinds=[kind], **{name: iter(value)}) == want, name
        live = LiveDetector(lr=0.1, horizon=t.size, kinds=(k for k in [kind]), **{name: iter(value)})
        assert live.update(traj) == detect(traj, lr=0.1, horizon=t.size, kinds=[kind], **{name: value}), name


def test_a_live_chunk_with_a_series_of_another_length_is_refused_in_its_own_numbers():
    # the error named the joined trajectory's shapes ("'step' key has shape (10,); it must number the rows of 'loss',
    # shape (13,)" for a chunk of 3 rows with an empty 'step'), numbers no chunk held
    live = LiveDetector()
    live.update({"loss": np.ones(10)})
    for chunk, shapes in (({"loss": np.ones(3), "step": np.array([])}, r"\{'step': \(0,\)\}"),
                          ({"loss": np.ones(5), "sharpness_raw": np.ones(4)}, r"\{'sharpness_raw': \(4,\)\}")):
        with pytest.raises(ValueError, match=r"LiveDetector.update: .*its 'loss' \(" + str(len(chunk["loss"]))
                           + r", leading axis\); got shapes " + shapes):
            live.update(chunk)
    assert live.update({"loss": np.r_[np.ones(3), 5.0]})[0].kind == "loss_spike"  # the refused chunks left no rows

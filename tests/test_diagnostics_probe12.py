"""Diagnostics on cases beyond the tested ones: records at irregular steps read live and offline, and the
detectors' documented rules checked literally on hand-built trajectories."""

import numpy as np

from quotient_sgd.diagnostics import LiveDetector, detect


def _dense_then_sparse(seed: int = 1):
    """A mini-batch loss (exponential noise, no spike) recorded every step for 300 steps, then every 10 up to step
    4000: the median spacing is 10."""
    steps = np.r_[np.arange(300), np.arange(300, 4001, 10)]
    loss = 0.1 * np.random.default_rng(seed).exponential(size=len(steps))
    return {"loss": loss, "step": steps}


def test_spike_windows_of_irregular_records_count_steps_live_and_offline():
    """Records every step, then every 10 steps: the loss's causal mean (``spike_smooth``) and a spike's end
    (``spike_window`` steps after its peak) counted records of the median spacing (10): in the dense part a
    20-step mean was a 2-step one and a spike ended 5 steps after its peak, and a live detector (median spacing 1
    until the sparse records outnumbered the dense ones) found other spikes than detect on the whole run.  Now
    both count steps: the dense part's events are those of the dense part read alone, and live chunks of any size
    give detect's events."""
    traj = _dense_then_sparse()
    opts = dict(kinds=["loss_spike"], spike_smooth=20)
    whole = detect(traj, **opts)
    dense = detect({"loss": traj["loss"][:300]}, **opts)
    assert [e.step for e in whole if e.step < 300] == [e.step for e in dense]
    for size in (37, 250):
        live = LiveDetector(**opts)
        for a in range(0, len(traj["loss"]), size):
            live.update({k: v[a:a + size] for k, v in traj.items()})
        assert [(e.step, e.strength) for e in live.events] == [(e.step, e.strength) for e in whole]


def test_a_constant_rate_recorded_every_step_then_every_ten_steps_is_no_transition():
    """``log_diff`` / ``diff`` were differences per record: a loss ``exp(-1e-3 step)`` recorded every step for 300
    steps, then every 10, had a log-rate ten times larger from the first sparse record on, reported as a
    transition at step 420 (onset 300), noiseless or not.  The differences are now per step: no transition, and a
    real four-fold change of the rate at step 2000 is still found after it."""
    steps = np.r_[np.arange(300), np.arange(300, 4001, 10)]
    noise = 0.002 * np.random.default_rng(0).normal(size=len(steps))
    for loss in (np.exp(-1e-3 * steps), np.exp(-1e-3 * steps + noise)):
        assert detect({"loss": loss, "step": steps}, kinds=["transition"]) == []
    for transform in ("log_diff", "diff"):
        assert detect({"loss": np.exp(-1e-3 * steps), "step": steps}, kinds=["transition"], transform=transform) == []
    log_loss = -np.cumsum(np.where(steps < 2000, 1e-3, 4e-3) * np.r_[1, np.diff(steps)]) + noise
    found = detect({"loss": np.exp(log_loss), "step": steps}, kinds=["transition"])
    assert found and all(e.step >= 2000 for e in found)


def test_shock_aware_lr_refuses_a_min_scale_above_one_under_cap_by_its_name():
    """``policy="cap"`` with ``min_scale=2`` (and ``init_scale=2``) was refused as ``init_scale=2.0`` outside the
    empty interval ``[2.0, 1.0]``, naming the argument that was right; the error now names ``min_scale``, and
    ``policy="track"`` still takes it."""
    import optax
    import pytest

    from quotient_sgd.diagnostics import shock_aware_lr

    with pytest.raises(ValueError, match=r"min_scale=2\.0 is not allowed with policy='cap'"):
        shock_aware_lr(optax.sgd(0.1), min_scale=2.0, max_scale=3.0, init_scale=2.0)
    shock_aware_lr(optax.sgd(0.1), policy="track", min_scale=2.0, max_scale=3.0, init_scale=2.0)
    shock_aware_lr(optax.sgd(0.1), min_scale=1.0, init_scale=1.0)


def test_a_divergence_seen_live_at_a_chunk_end_is_that_of_the_whole_run():
    """Records every 10 steps up to step 190, then every step; the loss 1000 x its initial value at steps 180 and
    190 only.  A record covered the steps up to the next one (the last one the spacing before it): a live chunk
    ending at step 190 counted 180..199, 20 steps, a divergence, while the whole run counted 180..190, 11 steps,
    none.  A record now covers the steps since the previous one (known at the record): 20 steps both ways, and a
    run of ``m`` high records every ``K`` steps is still ``m K`` steps."""
    steps = np.r_[np.arange(0, 191, 10), np.arange(191, 400)]
    loss = np.where((steps == 180) | (steps == 190), 1000.0, 1.0)
    whole = detect({"loss": loss, "step": steps}, kinds=["divergence"])
    for cut in (19, 20, 25):
        live = LiveDetector(kinds=["divergence"])
        live.update({"loss": loss[:cut], "step": steps[:cut]})
        live.update({"loss": loss[cut:], "step": steps[cut:]})
        assert live.events == whole
    assert [e.step for e in whole] == [180]
    assert detect({"loss": loss, "step": steps}, kinds=["divergence"], divergence_patience=21) == []
    t = np.arange(0, 400, 10)  # every 10 steps: 2 high records are 20 steps
    high = np.where((t == 180) | (t == 190), 1000.0, 1.0)
    assert [e.step for e in detect({"loss": high, "step": t}, kinds=["divergence"])] == [180]
    assert detect({"loss": high, "step": t}, kinds=["divergence"], divergence_patience=21) == []


def test_fold_levels_of_an_adaptive_run_ignore_sgd_momentum():
    """``adaptive=True`` keeps gradient descent's fold levels (detect_fold's docstring; ``momentum`` is SGD's and
    not read for an Adam run), but ``momentum=0.9`` moved them to 1.9 / 3.8 (and with ``nesterov``, Nesterov Adam
    there, to 1 / 1.357): a fold number of 1.2 and 2.5 gave one event instead of three."""
    traj = {"loss": np.ones(6), "fold_number": np.array([0.5, 1.2, 0.5, 2.5, 0.5, 0.5])}
    gd = [(e.step, e.details["level"]) for e in detect(traj, lr=0.1, kinds=["fold"])]
    assert gd == [(1, 1.0), (3, 1.0), (3, 2.0)]
    for opts in (dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.5, weight_decay=0.1)):
        ev = detect(traj, lr=0.1, kinds=["fold"], adaptive=True, **opts)
        assert [(e.step, e.details["level"]) for e in ev] == gd, opts
    assert [e.details["level"] for e in detect(traj, lr=0.1, kinds=["fold"], momentum=0.9)] == [1.9]


def test_shock_aware_lr_survives_a_non_finite_gradient_the_inner_optimiser_skips():
    """``shock_aware_lr(optax.apply_if_finite(optax.sgd(0.5)))`` on ``0.5 (3 p0^2 + p1^2)``, an infinite gradient
    at step 3: the curvature along the last step came out ``-inf``, the scale NaN, and NaN times the inner
    optimiser's zero update made the parameters NaN at that very step (the curvature then stayed NaN: ``0 * NaN``
    in the moving average).  A non-finite gradient now measures nothing: the skipped step leaves the parameters
    as they were, the curvature known before (2.8) is kept and sets the next step's scale, ``1 / (0.5 * 2.8)``,
    as on any step after a zero update."""
    import jax
    import jax.numpy as jnp
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr

    h = jnp.array([3.0, 1.0])
    for decay in (0.0, 0.5):
        tx = shock_aware_lr(optax.apply_if_finite(optax.sgd(0.5), max_consecutive_errors=10), fold_target=1.0,
                            curvature_decay=decay)
        update = jax.jit(tx.update)
        p, state = jnp.ones(2), tx.init(jnp.ones(2))
        ps, states = [], []
        for k in range(7):
            g = h * p if k != 3 else (h * p).at[0].set(jnp.inf)
            u, state = update(g, state, p)
            p = p + u
            ps.append(np.asarray(p))
            states.append(state)
        assert np.all(np.isfinite(np.stack(ps))), decay
        np.testing.assert_array_equal(ps[3], ps[2])
        for k in (3, 4):
            assert float(states[k].curvature) == float(states[2].curvature)
        np.testing.assert_allclose(float(states[4].scale), 1.0 / (0.5 * float(states[2].curvature)), rtol=1e-6)
        assert np.all(np.isfinite([float(s.curvature) for s in states] + [float(s.scale) for s in states]))


def test_spikes_of_evenly_spaced_records_are_unchanged_by_a_later_irregular_record():
    """Records every ``K`` steps are read with windows of ``ceil(window / K)`` records; one record more at an
    irregular step switches the reading to windows of steps, which must give the same spikes on the rows before
    it (a live detector reads the first form until such a record arrives).  The end of a spike, ``window`` steps
    after its peak, came ``floor(window / K)`` records after it in steps (a loss at a new level from step 300,
    records every 3 steps, 50-step window: end step 354 read evenly, 351 with one more record at step 2000), and
    a mean over one record rounded in the running sums.  Random ``K``, windows, smoothing and losses."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        k, n = int(rng.integers(1, 8)), int(rng.integers(20, 120))
        steps = np.arange(n) * k
        loss = np.exp(rng.normal(size=n) * rng.choice([0.1, 0.5, 1.0]))
        opts = dict(kinds=["loss_spike"], spike_window=int(rng.integers(1, 40)), spike_smooth=int(rng.integers(1, 10)))
        even = detect({"loss": loss, "step": steps}, **opts)
        more = detect({"loss": np.r_[loss, 1.0], "step": np.r_[steps, steps[-1] + 10**6]}, **opts)
        assert ([e for e in even if e.details["end_step"] != steps[-1]]
                == [e for e in more if e.details["end_step"] < steps[-1]]), (k, n, opts)
    steps = np.arange(0, 600, 3)
    loss = np.where(steps >= 300, 3.0, 1.0)
    for s, v in ((steps, loss), (np.r_[steps, 2000], np.r_[loss, 3.0])):
        (ev,) = detect({"loss": v, "step": s}, kinds=["loss_spike"])
        assert (ev.step, ev.details["end_step"]) == (300, 354)


def test_shock_aware_lr_passes_the_updates_extra_arguments_to_its_inner_optimiser():
    """``shock_aware_lr(optax.chain(optax.sgd(0.5), optax.contrib.reduce_on_plateau(...)))``: the update refused
    ``value=`` ("unexpected keyword argument 'value'"), and inside ``train`` (which passes ``value`` and others,
    dropped for a transformation without extra arguments) the inner plateau failed with "missing 1 required
    keyword-only argument: 'value'".  They now reach the inner optimiser: ``train`` gives the plain loop's
    parameters, whose plateau halved the step."""
    import jax
    import jax.numpy as jnp
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr
    from quotient_sgd.optim import train

    h = jnp.array([3.0, 1.0])

    def loss(p, batch):
        return 0.5 * jnp.sum(h * p * p)

    inner = optax.chain(optax.sgd(0.5), optax.contrib.reduce_on_plateau(factor=0.5, patience=0,
                                                                       accumulation_size=1))
    tx = shock_aware_lr(inner, fold_target=1.0)
    p, state = jnp.ones(2), tx.init(jnp.ones(2))
    update = jax.jit(tx.update)
    with jax.numpy_dtype_promotion("standard"):  # (optax's reduce_on_plateau is not strict-clean)
        for _ in range(4):
            u, state = update(h * p, state, p, value=loss(p, None))
            p = p + u
        trained = train(loss, jnp.ones(2), tx, jnp.zeros((4, 1)), donate=False)[0]
    np.testing.assert_allclose(np.asarray(trained), np.asarray(p), rtol=1e-6)
    assert float(state.inner_state[1].scale) < 1.0  # (the plateau read the values passed on)


def test_live_detection_keeps_two_slice_shocks_at_one_step():
    """Two slice shocks at step 5 (a 1-D and a 2-D slice) share their ``Event.key()``: ``detect`` reports both,
    a ``LiveDetector`` kept one, the second replacing the first in every update.  Now the n-th event of a key is
    matched to the n-th reported: live chunks give detect's two events."""
    shocks = [{"step": 5, "shock_time": 0.5, "slice": "1d"}, {"step": 5, "shock_time": 2.0, "slice": "2d"}]
    traj = {"loss": np.ones(10)}
    whole = detect(traj, lr=0.1, kinds=["shock"], slice_shocks=shocks)
    assert [e.details["slice"] for e in whole] == ["1d", "2d"]
    live = LiveDetector(lr=0.1, kinds=["shock"], slice_shocks=shocks)
    for a in range(0, 10, 3):
        live.update({"loss": traj["loss"][a:a + 3]})
    assert live.events == whole


def test_stability_decomposition_refuses_bad_arguments_by_name():
    """``num_matvecs=0`` was refused by the Lanczos routine as ``k=1 > num_matvecs`` and ``2.5`` with a TypeError,
    neither naming ``stability_decomposition``; ``raw="no"`` (truthy) computed the raw sharpness; ``lr="0.1"``
    failed in a bare JAX TypeError and ``lr=-1`` / NaN gave a negative / NaN ``lr_times_lambda_step``.  Each is now
    a ValueError naming the argument, checked before anything is traced; ``lr`` traced under ``vmap`` still
    passes."""
    import jax
    import jax.numpy as jnp
    import pytest

    from quotient_sgd.diagnostics import stability_decomposition
    from quotient_sgd.symmetry import Rescale

    group = Rescale(incoming=((("w1",), 1),), outgoing=((("w2",), 0),), name="unit")
    params = {"w1": jnp.full((1, 1), 4.0), "w2": jnp.full((1, 1), 0.5)}

    def loss(p):
        return 0.5 * jnp.square(p["w1"][0, 0] * p["w2"][0, 0] - 2.0)

    key = jax.random.key(0)
    for bad, name in ((dict(num_matvecs=0), "num_matvecs=0"), (dict(num_matvecs=2.5), "num_matvecs=2.5"),
                      (dict(num_matvecs=True), "num_matvecs=True"), (dict(raw="no"), "raw='no'"),
                      (dict(lr="0.1"), "lr='0.1'"), (dict(lr=-1.0), "lr=-1.0"), (dict(lr=float("nan")), "lr=nan")):
        with pytest.raises(ValueError, match=f"stability_decomposition: {name} is not allowed"):
            stability_decomposition(loss, group, params, bad.pop("lr", 0.1), key=key, **bad)
    lrs = jnp.array([0.1, 0.2])
    out = jax.vmap(lambda lr: stability_decomposition(loss, group, params, lr, key=key, num_matvecs=1, raw=False))(lrs)
    np.testing.assert_allclose(out["lr_times_lambda_step"], lrs * out["sharpness_horizontal"], rtol=1e-6)


def test_a_requested_transition_key_outside_the_variants_given_is_reported():
    """``transition_keys=["grad_norm"]`` (raw) with ``variants=("quotient",)``, or ``["loss"]`` with
    ``variants=("raw",)``: the key asked for was not monitored, without a word (a rate change of the gradient norm
    at step 600 gave no event and no warning).  A warning now names it; with both variants it is monitored."""
    import warnings

    import pytest

    t = np.arange(1000)
    grad = np.where(t < 600, np.exp(-t / 500), np.exp(-600 / 500 - (t - 600) / 50))
    traj = {"loss": np.exp(-t / 500), "grad_norm": grad}
    for keys, variants in ((["grad_norm"], ("quotient",)), (["loss"], ("raw",))):
        with pytest.warns(UserWarning, match=rf"transition_keys \['{keys[0]}'\].*not monitored"):
            detect(traj, kinds=["transition"], transition_keys=keys, variants=variants)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ev,) = detect(traj, kinds=["transition"], transition_keys=["grad_norm"])
    assert ev.details["observable"] == "grad_norm" and 600 <= ev.step <= 700

"""Detectors on synthetic edge cases: live chunks of any size, false-alarm bounds over every monitored key,
signed losses, degenerate and malformed inputs."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import LiveDetector, detect


def _rate_change_loss(n=1000, at=600, seed=1):
    rng = np.random.default_rng(seed)
    rate = np.where(np.arange(n) < at, 0.001, 0.01)
    return np.exp(-np.cumsum(rate) + 0.02 * rng.standard_normal(n))


def test_live_transition_events_do_not_depend_on_chunk_size():
    """With ``horizon`` the block length is the full run's: live chunks of any size report the change point of one
    ``detect`` call once (the block used to grow with the trajectory so far: 4 events at 4 block lengths)."""
    n = 1000
    traj = {"loss": _rate_change_loss(n)}
    full = detect(traj, kinds=["transition"], horizon=n)
    assert len(full) == 1 and 600 <= full[0].step <= 700
    for size in (37, 250):
        live = LiveDetector(kinds=["transition"], horizon=n)
        got = []
        for a in range(0, n, size):
            got += live.update({"loss": traj["loss"][a:a + size]})
        assert [e.key() for e in got] == [e.key() for e in full], size
        assert [e.details["block"] for e in got] == [full[0].details["block"]]


def test_transition_false_alarm_rate_bounds_quotient_and_raw_events_together():
    """A stationary trajectory with a quotient key (``loss``) and a raw key (``grad_norm``): the stated bound
    ``P(any transition event) <= alpha`` holds for both variants together (Bonferroni over every monitored key;
    split per variant, the rate was ``1 - (1 - alpha)^2``, 0.36 at alpha = 0.2)."""
    rng = np.random.default_rng(3)
    alpha, trials, n = 0.2, 200, 120
    hits = 0
    for _ in range(trials):
        traj = {"loss": 2.0 + 0.1 * rng.standard_normal(n), "grad_norm": 1.0 + 0.1 * rng.standard_normal(n)}
        ev = detect(traj, kinds=["transition"], alpha=alpha, block=1, transform="level")
        hits += bool(ev)
        assert all(e.details["alpha"] == alpha / 2 for e in ev)
    bound = alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials) + 3 * np.sqrt(alpha * (1 - alpha) / 4000)
    assert hits / trials <= bound, hits / trials


def test_shock_aware_lr_rejects_numpy_and_jax_scalars_out_of_range_and_accepts_traced_targets():
    """``fold_target=np.float32(0)`` (or a JAX scalar) used to pass the check and pin every step at
    ``min_scale``; a target traced under ``vmap`` is still accepted."""
    import jax
    import jax.numpy as jnp
    import optax
    import pytest

    from quotient_sgd.diagnostics import shock_aware_lr

    for value in (np.float32(0.0), np.int64(-1), jnp.asarray(0.0), np.float32(np.inf), np.ones(2), "1.8"):
        with pytest.raises(ValueError, match="fold_target="):
            shock_aware_lr(optax.sgd(0.1), fold_target=value)
    shock_aware_lr(optax.sgd(0.1), fold_target=np.float32(1.5), shock_target=jnp.asarray(1.0))

    def fold_after_two_steps(target):
        tx = shock_aware_lr(optax.sgd(1.5), fold_target=target)
        p = jnp.array([1.0])
        st = tx.init(p)
        for _ in range(2):
            u, st = tx.update(2.0 * p, st, p)
            p = p + u
        return st.fold_number

    np.testing.assert_allclose(jax.vmap(fold_after_two_steps)(jnp.array([0.5, 1.0])), [0.5, 1.0], rtol=1e-6)


def test_negative_losses_are_not_spikes_or_divergence():
    """A negative loss (a negative log-likelihood): ``factor * base`` lies below a negative base, so a constant
    loss of -3 was a divergence at step 0 and a loss spike every ``spike_window`` steps.  A real rise of a negative
    loss is still found, at its step, with the size relative to ``|base|``."""
    kinds = ["divergence", "loss_spike", "catapult"]
    for loss in (np.full(300, -3.0), np.linspace(-1.0, -2.0, 300)):
        ev = detect({"loss": loss, "sharpness_quotient": np.linspace(10.0, 1.0, 300)}, kinds=kinds)
        assert ev == [], [(e.step, e.kind) for e in ev]
    loss = np.r_[np.full(40, -3.0), [-0.5, 2.0, -1.0], np.full(40, -3.0)]
    (ev,) = detect({"loss": loss}, kinds=kinds)
    assert (ev.step, ev.kind, ev.details["peak_step"]) == (41, "loss_spike", 41)
    np.testing.assert_allclose(ev.strength, 1 + 5.0 / 3.0)
    loss = np.r_[np.full(10, -1.0), np.full(30, 500.0)]
    (ev,) = detect({"loss": loss}, kinds=kinds[:1])
    assert ev.step == 10 and ev.strength > 100
    # positive losses: the ratio is unchanged
    loss = np.r_[np.full(40, 1.0), [3.0], np.full(40, 1.0)]
    (ev,) = detect({"loss": loss}, kinds=kinds)
    assert ev.step == 40 and ev.strength == 3.0


def test_requested_transition_keys_are_monitored_whatever_their_kind_and_absent_ones_reported():
    """``transition_keys=["grad_norm"]`` (a raw key) or a charge (reduced dynamics) was dropped from both variants
    without a word; now monitored as variant ``raw`` (not invariant), and a key the trajectory lacks is warned
    about."""
    import pytest

    x = _rate_change_loss()
    for key, variant in (("grad_norm", "raw"), ("charges/unit", "raw"), ("test_accuracy", "quotient")):
        ev = detect({"loss": np.ones(len(x)), key: x}, kinds=["transition"], transition_keys=[key], block=10)
        assert [(e.details["observable"], e.variant, e.invariant) for e in ev] == [
            (key, variant, variant == "quotient")], key
        assert 600 <= ev[0].step <= 700
    with pytest.warns(UserWarning, match="not_recorded"):
        assert detect({"loss": x}, kinds=["transition"], transition_keys=["not_recorded"], block=10) == []


def test_windows_count_steps_in_a_subsampled_trajectory():
    """A trajectory kept every 10 steps (a ``step`` key) gives the events of the full one: ``spike_window`` and
    ``divergence_patience`` are steps, not records.  A slow rise (x2.5 over 100 steps, < x2 within any 50) is no
    spike at either resolution; a sustained x200 for 30 steps is a divergence at both."""
    t = np.arange(1000)
    loss = np.where(t < 200, 10.0 - 9.0 * t / 200, 1.0)
    loss = np.where((t >= 400) & (t < 500), 1.0 + 1.5 * (t - 400) / 100, loss)
    loss = np.where(t >= 500, 2.5, loss)
    for traj in ({"loss": loss, "step": t}, {"loss": loss[::10], "step": t[::10]}):
        assert detect(traj, kinds=["loss_spike"]) == []
    loss = np.where((t >= 700) & (t < 730), 2000.0, loss)
    got = [detect(traj, kinds=["divergence"]) for traj in ({"loss": loss, "step": t},
                                                          {"loss": loss[::10], "step": t[::10]})]
    assert [[e.step for e in g] for g in got] == [[700], [700]]


def test_zero_initial_loss_is_no_divergence_baseline():
    """An initial loss of exactly 0 has no multiple to exceed: a later positive loss is not a divergence, a
    non-finite one is."""
    loss = np.r_[0.0, np.full(50, 0.1)]
    assert detect({"loss": loss}, kinds=["divergence"]) == []
    loss[30] = np.nan
    assert [e.step for e in detect({"loss": loss}, kinds=["divergence"])] == [30]


def test_edge_of_stability_moves_with_momentum():
    """With momentum the step turns unstable at eta lambda = 2 (1 + beta) (Nesterov: 2 (1 + beta) / (1 + 2 beta)),
    checked on the quadratic itself; the detector's level 2 follows it."""
    from quotient_sgd.diagnostics import stability_edge

    def blows_up(x, beta, nesterov):  # optax.sgd's recursion on L = lambda theta^2 / 2, x = eta lambda
        th, m = 1.0, 0.0
        for _ in range(3000):
            m = beta * m + x * th
            th -= x * th + beta * m if nesterov else m
            if abs(th) > 1e6:
                return True
        return False

    for beta, nesterov in ((0.0, False), (0.5, False), (0.9, False), (0.5, True), (0.9, True)):
        e = stability_edge(beta, nesterov)
        assert blows_up(1.01 * e, beta, nesterov) and not blows_up(0.99 * e, beta, nesterov), (beta, nesterov)
    lr = 0.1
    traj = {"loss": np.ones(60), "sharpness_horizontal": np.r_[np.full(20, 10.0), np.full(20, 30.0),
                                                                np.full(20, 39.0)]}
    levels = lambda **kw: sorted(e.details["level"] for e in detect(traj, lr=lr, kinds=["edge_of_stability"], **kw))
    assert levels() == [1.0, 2.0]                      # eta lambda = 3: past 2 without momentum
    assert levels(momentum=0.9) == [1.9, 3.8]          # 3.9 > 3.8, 3.0 < 3.8: one crossing each, the later one
    first = {e.details["level"]: e.step for e in detect(traj, lr=lr, kinds=["edge_of_stability"], momentum=0.9)}
    assert first[3.8] == 40 and first[1.9] == 20
    with pytest.raises(ValueError, match="momentum"):
        detect(traj, lr=lr, momentum=1.5)


def _sgd_on_quadratic(x, beta, nesterov, steps):
    """theta_k of optax.sgd's recursion on L = lambda theta^2 / 2 from theta = 1 at rest, x = eta lambda."""
    th, m, out = 1.0, 0.0, []
    for _ in range(steps):
        m = beta * m + x * th
        th -= x * th + beta * m if nesterov else m
        out.append(th)
    return np.array(out)


def test_fold_levels_move_with_momentum(tmp_path):
    """The fold detector kept gradient descent's levels 1 and 2 under momentum.  On the quadratic, optax's
    heavy-ball / Nesterov step map has all its eigenvalues in the right half-plane below ``fold_edge`` and one in
    the left half-plane above (the iterate overshoots: for gradient descent the eigenvalue ``1 - eta lambda``
    turns negative); Nesterov's map turns singular there (it folds), heavy ball's never (determinant ``beta``); the
    iteration is unstable above ``stability_edge``.  The detector's levels 1 and 2 follow them, also when a run
    directory is re-detected."""
    from quotient_sgd.diagnostics import detect_run, fold_edge, fold_levels_for, stability_edge

    def step_map(x, beta, nesterov):  # columns: one step from (theta, eta m) = (1, 0) and (0, 1)
        cols = []
        for th, u in ((1.0, 0.0), (0.0, 1.0)):
            m = beta * u + x * th
            cols.append((th - (x * th + beta * m if nesterov else m), m))
        return np.array(cols).T

    for beta, nesterov in ((0.0, False), (0.5, False), (0.9, False), (0.5, True), (0.9, True)):
        f, e = fold_edge(beta, nesterov), stability_edge(beta, nesterov)
        assert 0 < f < e
        below, above = np.linalg.eigvals(step_map(0.98 * f, beta, nesterov)), np.linalg.eigvals(
            step_map(1.02 * f, beta, nesterov))
        # (without momentum the second state is a copy of the gradient: a zero eigenvalue, and 1 - eta lambda)
        assert np.all(below.real >= 0) and np.any(above.real < 0), (beta, nesterov, below, above)
        dets = [np.linalg.det(step_map(x * f, beta, nesterov)) for x in (0.98, 1.02)]
        if beta == 0:
            assert below.max() > 0 > above.min()
        elif nesterov:  # the map folds: its Jacobian determinant changes sign
            assert dets[0] > 0 > dets[1], (beta, nesterov, dets)
        else:
            np.testing.assert_allclose(dets, beta, atol=1e-12)
        # still stable between the fold and the edge, unstable beyond the edge
        assert np.max(np.abs(np.linalg.eigvals(step_map(0.5 * (f + e), beta, nesterov)))) < 1
        assert np.max(np.abs(np.linalg.eigvals(step_map(1.02 * e, beta, nesterov)))) > 1
        assert np.all(np.isfinite(_sgd_on_quadratic(0.98 * e, beta, nesterov, 2000)))
        assert fold_levels_for((1.0, 2.0), beta, nesterov) == [f, e]
    assert fold_edge() == 1.0 and fold_levels_for((0.5, 1.0, 1.5, 2.0, 3.0)) == [0.5, 1.0, 1.5, 2.0, 3.0]

    fold = np.r_[np.full(20, 0.001), np.full(20, 1.2), np.full(20, 2.05), np.full(20, 3.9)]
    traj = {"loss": np.ones(80), "fold_number": fold}
    got = lambda **kw: [(e.step, e.details["level"]) for e in detect(traj, kinds=["fold"], **kw)]
    assert got() == [(20, 1.0), (40, 2.0)]
    assert got(momentum=0.9) == [(40, 1.9), (60, 3.8)]  # was [(20, 1.0), (40, 2.0)]
    assert got(momentum=0.5, nesterov=True) == [(20, 1.0), (40, 1.5)]
    (ev,) = [e for e in detect(traj, kinds=["fold"], momentum=0.9) if e.step == 60]
    assert (ev.details["gd_level"], ev.details["edge"]) == (2.0, 3.8)
    np.savez(tmp_path / "trajectory.npz", **traj)
    (tmp_path / "config.json").write_text('{"steps": 80, "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}')
    assert [(e.step, e.details["level"]) for e in detect_run(tmp_path, write=False, kinds=["fold"])] == \
        got(momentum=0.9)


def test_run_directories_are_detected_with_their_momentum():
    from quotient_sgd.diagnostics._live import _options_from_config

    sgd = {"steps": 10, "optim": {"name": "sgd", "momentum": 0.9, "nesterov": True}}
    assert _options_from_config(sgd) == {"horizon": 10, "momentum": 0.9, "nesterov": True}
    for optim in ({"name": "sgd", "momentum": 0.0}, {"name": "adamw", "momentum": 0.9}):
        assert "momentum" not in _options_from_config({"steps": 10, "optim": optim})


def test_live_detector_keeps_a_key_that_appears_in_a_later_chunk():
    """An observable first recorded in the second chunk is monitored from there (it was dropped for the run)."""
    live = LiveDetector(lr=0.1, kinds=["edge_of_stability"])
    assert live.update({"loss": np.ones(20)}) == []
    new = live.update({"loss": np.ones(20), "sharpness_horizontal": np.r_[np.full(10, 15.0), np.full(10, 25.0)]})
    assert [(e.step, e.details["level"]) for e in new if e.variant == "step"] == [(20, 1.0), (30, 2.0)]


def test_adam_runs_get_no_edge_of_stability_events(tmp_path):
    """An Adam run's raw / quotient eta lambda_max has no stability level (its edge concerns the preconditioned
    Hessian): the runner's and detect_run's settings for adam / adamw mark it adaptive and no
    edge-of-stability event is reported, where gradient descent's levels once gave two."""
    from quotient_sgd.diagnostics import detect_run
    from quotient_sgd.diagnostics._live import _options_from_config

    traj = {"loss": np.ones(40), "sharpness_horizontal": np.r_[np.full(20, 5.0), np.full(20, 30.0)]}
    assert len(detect(traj, lr=0.1, kinds=["edge_of_stability"])) == 2
    assert detect(traj, lr=0.1, kinds=["edge_of_stability"], adaptive=True) == []
    with pytest.raises(ValueError, match="adaptive"):
        detect(traj, lr=0.1, adaptive="yes")
    for name, adaptive in (("adam", True), ("adamw", True), ("sgd", None)):
        assert _options_from_config({"steps": 40, "optim": {"name": name}}).get("adaptive") is adaptive
    np.savez(tmp_path / "trajectory.npz", **traj)
    (tmp_path / "config.json").write_text('{"steps": 40, "optim": {"name": "adamw", "lr": 0.1}}')
    assert [e for e in detect_run(tmp_path, write=False) if e.kind == "edge_of_stability"] == []

"""Diagnostics: live detection against offline detection, synthetic series with known answers."""

import numpy as np

from quotient_sgd.diagnostics import detect, LiveDetector


def _events(evs):
    return [(e.step, e.kind, e.variant, round(e.strength, 12)) for e in evs]


def test_live_chunks_with_a_learning_rate_given_once_give_the_offline_events():
    # detect takes a run's constant learning rate stored once (a 0-d 'lr' key); a live chunk holding one failed in
    # NumPy's bare "zero-dimensional arrays cannot be concatenated" (and was dropped). It now holds for each row of
    # its chunk, and the events are those of detect on the whole trajectory.
    n = 200
    sharp = 5.0 + 20.0 * np.linspace(0.0, 1.0, n)  # eta * lambda crosses 1 at row 50 and 2 at row 150
    loss = np.exp(-0.01 * np.arange(n))
    offline = detect({"loss": loss, "lr": np.float64(0.1), "sharpness_raw": sharp}, horizon=n)
    assert [(e.step, e.kind) for e in offline] == [(50, "edge_of_stability"), (150, "edge_of_stability")]
    for key in ("lr", "learning_rate"):
        live = LiveDetector(horizon=n)
        got = []
        for a, b in ((0, 70), (70, 130), (130, n)):
            got += live.update({"loss": loss[a:b], key: 0.1, "sharpness_raw": sharp[a:b]})
        assert _events(got) == _events(offline) == _events(live.events)
    # a schedule given per chunk as a number (a step decay): each chunk's rows take its own value
    live = LiveDetector(horizon=n)
    for a, b, lr in ((0, 100, 0.1), (100, n, 0.05)):
        live.update({"loss": loss[a:b], "lr": lr, "sharpness_raw": sharp[a:b]})
    lrs = np.r_[np.full(100, 0.1), np.full(n - 100, 0.05)]
    assert _events(live.events) == _events(detect({"loss": loss, "lr": lrs, "sharpness_raw": sharp}, horizon=n))


def _rate_change(seed, n=2000, change=1200):
    """A positive series whose log-rate falls from -1e-3 to -4e-3 per step at ``change`` (noise 0.01 per step)."""
    rng = np.random.default_rng(seed)
    rate = np.where(np.arange(n) < change, -1e-3, -4e-3)
    return np.exp(np.cumsum(rate + 0.01 * rng.standard_normal(n)))


def test_a_key_recorded_every_k_steps_with_nan_between_records_is_monitored_for_transitions():
    # detect reads a series recorded every K steps as holding its value or as NaN in between. The transition
    # detector differenced the NaN-interleaved form as it came: every difference was NaN, every block skipped, and
    # the key was never monitored (no event for a rate change the held form detects). NaN rows between records
    # now hold the last recorded value: both forms give the same events.
    n, k = 2000, 10
    loss = np.exp(-np.arange(n) / 5000.0) * (1 + 1e-3 * np.random.default_rng(99).standard_normal(n))
    for seed in (0, 1):
        g = _rate_change(seed, n)
        held = g[(np.arange(n) // k) * k]
        sparse = np.where(np.arange(n) % k == 0, g, np.nan)
        ev_held = detect({"loss": loss, "grad_norm_canonical": held}, kinds=["transition"], horizon=n)
        ev_sparse = detect({"loss": loss, "grad_norm_canonical": sparse}, kinds=["transition"], horizon=n)
        assert _events(ev_sparse) == _events(ev_held)
        found = [e for e in ev_sparse if e.details["observable"] == "grad_norm_canonical"]
        assert len(found) == 1 and found[0].step > 1200 and found[0].details["direction"] == -1
        # NaN before the first record and after the last stay NaN (nothing recorded there yet)
        late = sparse.copy()
        late[:300] = np.nan
        late[-35:] = np.nan
        from quotient_sgd.diagnostics._detect import _hold_between_records

        filled = _hold_between_records(late)
        last = int(np.flatnonzero(~np.isnan(late))[-1])
        assert np.all(np.isnan(filled[:300])) and np.all(np.isnan(filled[last + 1:]))
        np.testing.assert_array_equal(filled[300:last + 1], held[300:last + 1])


def _shock_aware_by_hand(h, p, lr, momentum, fold_target, shock_target, policy, init_scale, min_scale, max_scale,
                         decay, steps):
    """The rule of quotient_sgd/diagnostics/_shock_lr.py's docstring, in NumPy, on L = p^T h p / 2 with SGD."""
    prev_g, prev_u, curv, m, out = np.zeros_like(p), np.zeros_like(p), 0.0, np.zeros_like(p), []
    for count in range(steps):
        g = h @ p
        m = momentum * m + g
        u = -lr * m  # the inner (unscaled) update; its momentum trace is the inner optimiser's
        have = count > 0 and prev_u @ prev_u > 0
        k_new = (g - prev_g) @ prev_u / (prev_u @ prev_u) if have else 0.0
        kappa = decay * curv + (1 - decay) * k_new if count > 1 else k_new
        eff = np.sqrt((u @ u) / (g @ g))
        fold, shock = eff * max(kappa, 0.0), eff * max(-kappa, 0.0)
        s_fold, s_shock = fold_target / max(fold, 1e-30), shock_target / max(shock, 1e-30)
        if policy == "cap":
            s = float(np.clip(min(1.0, s_fold, s_shock), min_scale, min(max_scale, 1.0)))
        else:
            s = float(np.clip(min(s_fold if fold > 0 else max_scale, s_shock), min_scale, max_scale))
        s = s if have else init_scale
        out.append((s, s * fold, s * shock, kappa))
        prev_g, prev_u, curv = g, s * u, kappa
        p = p + s * u
    return np.array(out)


def test_shock_aware_lr_equals_its_documented_rule_with_smoothing_a_concave_direction_and_momentum(x64):
    # the curvature EMA (curvature_decay), the shock cap on a quadratic with a concave direction, and momentum
    # (the effective rate |u| / |g| of the inner update), against the rule written out in NumPy
    import jax.numpy as jnp
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr

    h = np.diag([3.0, -1.5, 0.5])
    p0 = np.array([1.0, 0.3, -0.7])
    for policy, lr, mom, ft, st, init, hi, decay in (("cap", 0.9, 0.0, 1.5, 0.4, 1.0, 1.0, 0.5),
                                                     ("track", 0.2, 0.0, 1.2, 0.3, 0.5, 3.0, 0.7),
                                                     ("cap", 0.5, 0.9, 1.0, 0.5, 1.0, 1.0, 0.3)):
        tx = shock_aware_lr(optax.sgd(lr, momentum=mom or None), fold_target=ft, shock_target=st, policy=policy,
                            init_scale=init, max_scale=hi, curvature_decay=decay)
        p = jnp.asarray(p0)
        state = tx.init(p)
        got = []
        for _ in range(8):
            u, state = tx.update(jnp.asarray(h) @ p, state, p)
            p = p + u
            got.append([float(v) for v in (state.scale, state.fold_number, state.shock_number, state.curvature)])
        want = _shock_aware_by_hand(h, p0, lr, mom, ft, st, policy, init, 1e-3, hi, decay, 8)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)
        assert np.any(want[1:, 2] > 0) and np.all(want[:, 2] <= st * (1 + 1e-12))  # the shock cap was active, held

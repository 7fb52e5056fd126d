"""Diagnostics on real short runs: shock_aware_lr across an exactly zero update, and the detectors on full-batch
GD runs whose transitions are known from the trajectory itself (edge of stability, catapult, quiet runs)."""

import jax.numpy as jnp
import numpy as np
import optax

from quotient_sgd.diagnostics import shock_aware_lr


def _quad_run(tx, h, steps):
    """Plain loop of ``tx`` on ``0.5 sum(h w^2)`` from ``w = 1``; the states after each step."""
    p = jnp.ones_like(h)
    st, out = tx.init(p), []
    for _ in range(steps):
        u, st = tx.update(h * p, st, p)
        p = p + u
        out.append(st)
    return out


def test_shock_aware_lr_keeps_the_known_curvature_across_a_zero_update():
    """1-d quadratic of curvature 6, lr 0.5, fold cap 1.5: every measured kappa is exactly 6 and every capped scale
    1.5 / (0.5 * 6) = 0.5.  A step with lr 0 (update exactly 0) measures nothing: the step after it keeps kappa = 6
    and the scale 0.5 (it took the init_scale 1, fold number 3 > 2, and averaged a kappa of 0 in)."""
    h = jnp.asarray([6.0])
    lr = lambda c: jnp.where(c == 3, 0.0, 0.5)  # noqa: E731
    for decay in (0.0, 0.5):
        sts = _quad_run(shock_aware_lr(optax.sgd(lr), fold_target=1.5, curvature_decay=decay), h, 7)
        for k in (1, 2, 4, 5, 6):  # every step with a known curvature and a nonzero proposed step
            np.testing.assert_allclose(float(sts[k].curvature), 6.0, rtol=1e-5, err_msg=f"{decay=} step {k}")
            np.testing.assert_allclose(float(sts[k].scale), 0.5, rtol=1e-5, err_msg=f"{decay=} step {k}")
            np.testing.assert_allclose(float(sts[k].fold_number), 1.5, rtol=1e-5, err_msg=f"{decay=} step {k}")
        assert float(sts[3].fold_number) == 0.0  # the zero step itself folds nothing
        np.testing.assert_allclose(float(sts[3].curvature), 6.0, rtol=1e-5)


def test_shock_aware_lr_moving_average_starts_at_the_first_measurement():
    """A warm-up from lr 0 (first update exactly 0): no curvature is known until the parameters move, then the
    moving average starts from the first measured kappa = 6 (it started from 0: kappa 0.6 with decay 0.9, and the
    step went through uncapped)."""
    h = jnp.asarray([6.0])
    tx = shock_aware_lr(optax.sgd(optax.linear_schedule(0.0, 0.5, 2)), fold_target=1.5, curvature_decay=0.9)
    sts = _quad_run(tx, h, 4)
    assert float(sts[0].scale) == float(sts[1].scale) == 1.0  # init_scale: nothing measured yet
    for k in (2, 3):
        np.testing.assert_allclose(float(sts[k].curvature), 6.0, rtol=1e-5)
        np.testing.assert_allclose(float(sts[k].fold_number), 1.5, rtol=1e-5)

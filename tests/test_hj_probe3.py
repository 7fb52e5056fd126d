"""Edge cases of the HJ / Burgers engine found by probing beyond the other tests (THEORY section 3)."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import find_shocks, Grid, solve_burgers, solve_hj


def _sine(n=16):
    g = Grid(n, -1.0, 1.0)
    return g, -jnp.sin(jnp.pi * g.x)


@pytest.mark.parametrize("solve", [solve_burgers, solve_hj])
def test_empty_save_times_are_refused_by_name(solve):
    # an empty ts used to fail inside diffrax with "IndexError: index is out of bounds for axis 0 with size 0"
    g, p0 = _sine()
    with pytest.raises(ValueError, match=r"ts=\[\] is not allowed; pass ts=None"):
        solve(p0, g, nu=0.1, t1=0.1, ts=[])


@pytest.mark.parametrize("ts, match", [([], r"ts=\[\] is not allowed"),
                                       ([0.05, 0.02], r"ts=\[0.05, 0.02\] is not allowed; need non-decreasing")])
def test_known_save_times_are_checked_when_t1_is_traced(ts, match):
    # with t1 traced (vmap over t1) every check of the save times was skipped, also those that do not need t1
    g, p0 = _sine()
    with pytest.raises(ValueError, match=match):
        jax.vmap(lambda t1: solve_burgers(p0, g, nu=0.1, t1=t1, ts=ts).ps)(jnp.array([0.1, 0.2]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_save_time_is_refused_by_name(bad):
    # a NaN save time passed the order / range check (every comparison with NaN is False) and the solve then ran
    # into max_steps, whose message blamed the tolerances and the grid
    g, p0 = _sine()
    with pytest.raises(ValueError, match=r"ts=\[0.05, (nan|inf)\] is not finite"):
        solve_burgers(p0, g, nu=0.1, t1=0.1, ts=[0.05, bad])


def test_traced_non_finite_save_time_is_named():
    # under jit the save times are traced: a NaN one filled the fixed-step solution with NaN and the error said
    # the grid under-resolves the flow
    g, p0 = _sine()
    run = jax.jit(lambda ts: solve_burgers(p0, g, nu=0.1, t1=0.1, ts=ts, dt=0.05).ps)
    ok = np.asarray(run(jnp.array([0.05])))
    assert ok.shape == (2, 16) and np.all(np.isfinite(ok))
    with pytest.raises(Exception, match="nu, t1, ts or the initial field is not finite"):
        jax.block_until_ready(run(jnp.array([jnp.nan])))


@pytest.mark.parametrize("grid", [[Grid(16, -1.0, 1.0)], (16, -1.0, 1.0), None])
def test_a_grid_that_is_not_a_grid_is_refused_by_name(grid):
    # used to fail with "AttributeError: 'list' object has no attribute 'ndim'"
    _, p0 = _sine()
    with pytest.raises(ValueError, match=r"grid=.* is not allowed; need a Grid \(1-D\) or Grid2D"):
        solve_burgers(p0, grid, nu=0.1, t1=0.1)


def _numpy_cole_hopf(loss, x, t, nu):
    """u(x, t) by a plain NumPy trapezoidal quadrature (THEORY section 3) for a 2-periodic loss."""
    x, y = np.asarray(x, np.float64)[:, None], np.linspace(-4.0, 4.0, 16001)[None, :]
    logw = -((x - y) ** 2) / (4 * nu * t) - loss(y) / (2 * nu)
    m = logw.max(axis=1, keepdims=True)
    integral = np.sum(np.exp(logw - m), axis=1) * (y[0, 1] - y[0, 0])
    return -2 * nu * (np.log(integral) + m[:, 0] - 0.5 * np.log(4 * np.pi * nu * t))


@pytest.mark.parametrize("scheme", ["spectral", "fv"])
def test_value_form_accuracy_does_not_depend_on_the_loss_level(x64, scheme):
    # u -> u + c leaves the HJ equation unchanged, but the controller's tolerance atol + rtol |u| did not: at a
    # level of 1000 the adaptive solve took 4 steps instead of 69 (spectral) and its error grew from 1e-10 to
    # 5e-5 (spectral) and 6e-3 (finite volume).  Now the solve integrates the deviation from the mean.
    g = Grid(32, -1.0, 1.0)

    def loss(y):
        return np.cos(np.pi * y) / np.pi + 0.3 * np.sin(2 * np.pi * y + 0.4) / np.pi

    u0 = jnp.asarray(loss(np.asarray(g.x)))
    ref = _numpy_cole_hopf(loss, g.x, 0.3, 0.1)
    base = solve_hj(u0, g, nu=0.1, t1=0.3, scheme=scheme)
    err0 = np.max(np.abs(np.asarray(base.us[-1]) - ref))
    for level in (1e3, -1e3):
        sol = solve_hj(u0 + level, g, nu=0.1, t1=0.3, scheme=scheme)
        assert int(sol.num_steps) == int(base.num_steps)
        np.testing.assert_allclose(np.asarray(sol.us[-1]) - level, np.asarray(base.us[-1]), rtol=0, atol=1e-10)
        assert np.max(np.abs(np.asarray(sol.us[-1]) - level - ref)) <= err0 + 1e-10


@pytest.mark.slow
def test_value_form_derivative_through_the_level(x64):
    # the mean taken off and added back is differentiated: along a constant the derivative is the constant (the
    # solve is shift-equivariant), along a bump it matches central finite differences (forward mode: its compile
    # is a fraction of reverse mode's, which tests/test_hj_gradients.py covers)
    g = Grid(16, -1.0, 1.0)
    x = g.x
    u0 = jnp.cos(jnp.pi * x) / jnp.pi + 2.0
    bump = jnp.exp(-10 * (x - 0.3) ** 2)

    def final(u):
        return solve_hj(u, g, nu=0.1, t1=0.2, dt=0.05, adjoint=dfx.ForwardMode()).us[-1]

    along_one = jax.jvp(final, (u0,), (jnp.ones_like(u0),))[1]
    np.testing.assert_allclose(np.asarray(along_one), 1.0, rtol=0, atol=1e-12)
    along_bump = jax.jvp(final, (u0,), (bump,))[1]
    up, um = (jax.jvp(final, (u0 + e * bump,), (bump,))[0] for e in (1e-5, -1e-5))  # one compiled program
    fd = (up - um) / 2e-5
    np.testing.assert_allclose(np.asarray(along_bump), np.asarray(fd), rtol=0, atol=1e-9)


@pytest.mark.parametrize("threshold", [np.nan, np.inf, -1.0, [1.0, 2.0]])
def test_find_shocks_refuses_a_threshold_that_is_not_a_number_at_least_0(threshold):
    # a NaN threshold made every comparison False, so a field with a clear front reported no shocks
    g = Grid(64, -1.0, 1.0)
    p = -jnp.tanh(g.x / 0.05)
    assert find_shocks(p, g, min_steepness=5.0).to_list()[0]["jump"] == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError, match=r"min_steepness=.* is not allowed; need a finite number >= 0"):
        find_shocks(p, g, min_steepness=threshold)


@pytest.mark.parametrize("solve", [solve_burgers, solve_hj])
def test_smooth_limiter_commutes_with_the_amplitude_scaling(x64, solve):
    # p -> A p, t -> t / A, nu -> A nu maps solutions onto solutions (u -> A u for the value form); the smooth
    # limiter's regularisation e = dx^3 and speed bound sqrt(.. + dx^2) were absolute, so at A = 1e-4 (a flat
    # loss slice) the field was left unlimited and overshot max |p0| by 10%. Now both scale with the data.
    g = Grid(64, -1.0, 1.0)
    x = g.x
    y0 = -jnp.sin(jnp.pi * x) if solve is solve_burgers else jnp.cos(jnp.pi * x) / jnp.pi

    def run(a):
        return solve(a * y0, g, nu=a * 2e-3, t1=0.6 / a, dt=0.01 / a, scheme="fv-smooth").ys[-1] / a

    ref = run(1.0)
    for a in (1e-4, 1e2):
        np.testing.assert_allclose(np.asarray(run(a)), np.asarray(ref), rtol=0, atol=1e-9)
    if solve is solve_burgers:  # the maximum principle of the viscous flow, held by the limited scheme
        assert float(jnp.max(jnp.abs(ref))) <= 1.0

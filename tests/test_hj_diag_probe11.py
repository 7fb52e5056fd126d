"""HJ engine: shock times of flat-bottomed minima in 2-D, shock detection on coarse grids, end-time derivatives."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf_gradient, find_shocks, Grid, shock_time, solve_burgers


def _band(x, centre, half):
    """p0 = -clip(x - centre, -half, half): slope -1 on a band, 0 outside (a concave band of the loss)."""
    return -jnp.clip(x - centre, -half, half)


# 16 nodes a side in the fast suite (the dip showed on 16-64), 33 in the slow suite
@pytest.mark.parametrize("n", [16, pytest.param(33, marks=pytest.mark.slow)])
@pytest.mark.parametrize("periodic", [True, False])
def test_2d_shock_time_of_a_flat_bottomed_minimum_is_the_1d_one(x64, periodic, n):
    # a separable p0 = (f(x), k f(y)) has the Hessian diag(f'(x), k f'(y)) and, with 0 <= k <= 1, lambda_min = -1 on
    # the band |x - cx| < 0.3: shock time 1 exactly (1-D: t* = -1 / min f').  The 2-D quadratic through the nine
    # nodes around the smallest sample dipped below the flat minimum at the band's edge (t* = 0.93-0.99 on 16-64
    # nodes a side, where the 1-D estimate gives 1)
    st = eqx.filter_jit(shock_time)  # one compilation per grid
    g = Grid(n, -1.0, 1.0, periodic=periodic) * Grid(n + 2, -1.0, 1.0, periodic=periodic)
    x, y = g.x
    g1 = Grid(n, -1.0, 1.0, periodic=periodic)
    for cx, cy in ((0.0, 0.0), (0.013, 0.029), (0.05, -0.11)):
        one_d = float(st(_band(g1.x, cx, 0.3), g1))
        assert one_d == pytest.approx(1.0, rel=1e-9), (n, cx)
        for k in (1.0, 0.5, 0.0):
            p0 = jnp.stack([_band(x, cx, 0.3), k * _band(y, cy, 0.3)])
            assert float(st(p0, g)) == pytest.approx(1.0, rel=1e-9), (n, cx, cy, k)


def test_find_shocks_reports_a_one_cell_shock_on_a_steep_ramp(x64):
    # L(y) = a y^2 / 2 - J |y| / 2 (p0 = a y - J sign(y) / 2, moved by the Galilean shift V): the exact Cole-Hopf
    # solution has one shock at x = V t, of inviscid jump J / (1 + a t), on an expanding ramp of slope
    # a / (1 + a t).  At nu = 1e-3 and 4e-3 the front is 0.04-0.3 cells wide on 32-48 points; its steepness (~0.6
    # jump / dx) stayed below 10 x the mean slope, which the ramp's rise dominates, and no shock was reported
    a, jump, v, t = 4.0, 2.0, 0.3, 0.1
    exact_jump, slope = jump / (1 + a * t), a / (1 + a * t)
    find = eqx.filter_jit(find_shocks)
    for n in (32, 48):
        g = Grid(n, -1.0, 1.0, periodic=False)
        for nu in (1e-3, 4e-3):
            p = v + cole_hopf_gradient(lambda y: a * y * y / 2 - jump * jnp.abs(y) / 2, g.x - v * t, t, nu)
            found = find(p, g).to_list()
            assert len(found) == 1, (n, nu, found)
            assert abs(found[0]["location"] - v * t) < 0.5 * g.dx, (n, nu, found)
            # the samples beside the front lie up to about a cell from it on the ramp on either side
            assert exact_jump - 3 * slope * g.dx < found[0]["jump"] < exact_jump * (1 + 1e-6), (n, nu, found)


@pytest.mark.parametrize("periodic, n, c", [(True, 128, 0.9), (False, 256, -0.93)])
def test_find_shocks_does_not_read_the_ringing_beside_an_expansion_step_as_a_shock(x64, periodic, n, c):
    # an upward step (an expansion, no shock) on a sine: the fourth-order stencil rings beside it with a lobe of
    # -jump / (12 dx), which with the sine's own compression passed the default threshold: a "shock" of jump 0.05
    # -0.1 next to the step.  On the periodic grid the only compressive front is the downward step at c - 1
    g = Grid(n, -1.0, 1.0, periodic=periodic)
    x = np.asarray(g.x)
    p = np.sin(np.pi * x) + 2.0 * (x > c)
    if periodic:
        p = p - 2.0 * (x > c - 1.0)
    found = find_shocks(jnp.asarray(p), g).to_list()
    assert len(found) == (1 if periodic else 0), found
    if periodic:
        assert abs(found[0]["location"] - (c - 1.0)) < g.dx and found[0]["jump"] > 1.8, found


# (finite volumes with Tsit5 in the slow suite: the same property, the costlier compilation)
@pytest.mark.parametrize("scheme, solver", [pytest.param("fv", "tsit5", marks=pytest.mark.slow), ("spectral", "etd")])
def test_the_end_time_derivative_at_t1_0_is_the_right_hand_side(x64, scheme, solver):
    # d p(t1) / d t1 at t1 = 0 is p_t = -p p_x + nu p_xx of p0 (exact for p0 = -sin(pi x)); no step is taken there
    # and jax.grad gave 0.  Elsewhere the derivative is unchanged (float64 central differences)
    g = Grid(64, -1.0, 1.0)
    x, nu = g.x, 0.05
    p0 = -jnp.sin(jnp.pi * x)
    exact = -np.pi * jnp.sin(np.pi * x) * jnp.cos(np.pi * x) + nu * np.pi**2 * jnp.sin(np.pi * x)

    def end(t1):
        return solve_burgers(p0, g, nu=nu, t1=t1, scheme=scheme, solver=solver, rtol=1e-10, atol=1e-12).ps[-1]

    start = jax.jacrev(end)(0.0)
    if scheme == "spectral":
        np.testing.assert_allclose(np.asarray(start), np.asarray(exact), atol=1e-9)
    # the discrete flow's one-sided difference (finite volumes differ from the exact p_t by the scheme's error,
    # 0.08 where minmod clips the extrema)
    h = 1e-6
    np.testing.assert_allclose(np.asarray(start), np.asarray((end(h) - end(0.0)) / h), atol=1e-4)
    assert float(jnp.max(jnp.abs(start - exact))) < 0.1
    np.testing.assert_array_equal(np.asarray(end(0.0)), np.asarray(p0))
    h = 1e-4
    central = (end(0.2 + h) - end(0.2 - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(jax.jacrev(end)(0.2)), np.asarray(central), atol=1e-6)

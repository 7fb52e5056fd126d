"""HJ / Burgers engine: symmetries of the equations and exact references beyond the reference problem
(THEORY section 3)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, shock_time, solve_burgers, solve_hj, Spectral


# the large unit (where the limiter was switched off) in the fast suite, the small one in the slow suite
@pytest.mark.parametrize("c", [1e3, pytest.param(1e-3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("solve, periodic", [(solve_burgers, True), (solve_hj, False)])
def test_smooth_limiter_commutes_with_a_change_of_the_unit_of_x(x64, solve, periodic, c):
    # x -> c x, t -> c t, nu -> c nu maps solutions onto solutions (p unchanged, u -> c u). The smooth limiter's
    # regularisation e = dx^3 S^2 and speed bound sqrt(.. + dx^2 S^2) were absolute in x: on [-1000, 1000] the
    # limiter was switched off (the unlimited central slope) and the Burgers shock overshot max|p0| by 12%
    # (against Cole-Hopf: L-inf error 0.27, minmod 0.046). Now both use dx relative to the axis's half-length.
    def run(c):  # (each unit is a grid of its own: one compilation each)
        g = Grid(64, -c, c, periodic=periodic)
        x = g.x / c
        y0 = -jnp.sin(jnp.pi * x) if solve is solve_burgers else c * jnp.cos(jnp.pi * x) / jnp.pi
        out = solve(y0, g, nu=c * 2e-3, t1=0.6 * c, dt=0.01 * c, scheme="fv-smooth").ys[-1]
        return out if solve is solve_burgers else out / c

    ref = run(1.0)
    np.testing.assert_allclose(np.asarray(run(c)), np.asarray(ref), rtol=0, atol=1e-9)
    if solve is solve_burgers and periodic:  # the maximum principle of the viscous flow, held by the limited scheme
        assert float(jnp.max(jnp.abs(ref))) <= 1.0


def test_fixed_step_derivative_in_t1_of_a_save_time_on_the_step_lattice(x64):
    # With dt= the steps are h = t1 / ceil(t1 / dt) and a save time splits the step it falls in; a step ending on
    # a save time that lies on the lattice k h has the size h in value, and ETDRK4 reused its cached coefficients,
    # whose derivative follows h (which moves with t1) while the save time is fixed: d p(ts) / d t1 came out 0.91
    # (here) where it is 0, the solution at a fixed time not depending on t1. d p(t1) / d t1 is the right-hand side.
    g = Grid(32, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x) + 0.2
    w = jnp.cos(0.5 * jnp.pi * g.x)
    nu = 0.1

    ts = jnp.array([0.05, 0.0537, 0.1])  # two on the lattice 0.01 k, one off it

    def saved(t1):  # forward mode: all save times in one pass (reverse mode ran through the same steps)
        return solve_burgers(p0, g, nu=nu, t1=t1, ts=ts, dt=0.01, adjoint=diffrax.ForwardMode()).ps

    ps, dps = jax.jvp(saved, (0.2,), (1.0,))
    d = jnp.sum(w[None] * dps, axis=-1)
    end = ps[-1]
    rate = float(jnp.sum(w * Spectral().rhs(g, "burgers", end, nu)))
    assert np.all(np.abs(np.asarray(d[:-1])) < 1e-6 * abs(rate)), d
    assert abs(float(d[-1]) - rate) < 1e-6 * abs(rate)


def test_bounded_2d_grid_carries_a_non_separable_quadratic_exactly(x64):
    # L = x^T A x / 2 with a cross term and a concave direction, on a bounded 2-D grid of unequal axes: Cole-Hopf
    # gives u = x^T M x / 2 + nu log det(I + t A), p = M x, M = A (I + t A)^-1 (for t < t* = 1 / |lambda_min(A)|).
    # The ghost cells continue u quadratically, so the finite-volume solve holds it to the solver's tolerance, the
    # level of u included, and the inviscid shock time is that of the Hessian.
    a = np.array([[1.2, 0.5], [0.5, -0.6]])
    nu, t1 = 0.05, 0.4
    m = a @ np.linalg.inv(np.eye(2) + t1 * a)
    g = Grid(13, -1.0, 1.5, periodic=False) * Grid(11, -2.0, 1.0, periodic=False)
    x = g.x
    u0 = 0.5 * jnp.einsum("i...,ij,j...->...", x, a, x)
    p0 = jnp.einsum("ij,j...->i...", a, x)
    u_exact = 0.5 * jnp.einsum("i...,ij,j...->...", x, m, x) + nu * np.log(np.linalg.det(np.eye(2) + t1 * a))
    p_exact = jnp.einsum("ij,j...->i...", m, x)
    u = solve_hj(u0, g, nu=nu, t1=t1, scheme="fv-smooth").us[-1]
    assert float(jnp.max(jnp.abs(u - u_exact))) < 1e-5
    # central differences are exact on quadratics (interior nodes)
    grad_u = jnp.stack([jnp.gradient(u, g.dx[0], axis=0), jnp.gradient(u, g.dx[1], axis=1)])[:, 1:-1, 1:-1]
    assert float(jnp.max(jnp.abs(grad_u - p_exact[:, 1:-1, 1:-1]))) < 1e-4
    assert float(shock_time(p0, g)) == pytest.approx(-1.0 / np.linalg.eigvalsh(a)[0], rel=1e-9)

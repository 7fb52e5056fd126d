"""HJ / Burgers engine: symmetries of the equations and exact references beyond the reference problem
(THEORY section 3)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, solve_burgers, solve_hj, Spectral


@pytest.mark.parametrize("solve, periodic", [(solve_burgers, True), (solve_hj, False)])
def test_smooth_limiter_commutes_with_a_change_of_the_unit_of_x(x64, solve, periodic):
    # x -> c x, t -> c t, nu -> c nu maps solutions onto solutions (p unchanged, u -> c u). The smooth limiter's
    # regularisation e = dx^3 S^2 and speed bound sqrt(.. + dx^2 S^2) were absolute in x: on [-1000, 1000] the
    # limiter was switched off (the unlimited central slope) and the Burgers shock overshot max|p0| by 12%
    # (against Cole-Hopf: L-inf error 0.27, minmod 0.046). Now both use dx relative to the axis's half-length.
    def run(c):
        g = Grid(64, -c, c, periodic=periodic)
        x = g.x / c
        y0 = -jnp.sin(jnp.pi * x) if solve is solve_burgers else c * jnp.cos(jnp.pi * x) / jnp.pi
        out = solve(y0, g, nu=c * 2e-3, t1=0.6 * c, dt=0.01 * c, scheme="fv-smooth").ys[-1]
        return out if solve is solve_burgers else out / c

    ref = run(1.0)
    for c in (1e-3, 1e3):
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

"""The HJ / Burgers engine on cases beyond its other tests: the IMEX solver's stage solves at small fixed steps."""

import jax.numpy as jnp

from quotient_sgd.hj import cole_hopf_gradient, Grid, solve_burgers


def _loss(y):
    return jnp.cos(jnp.pi * y) / jnp.pi + 0.3 * jnp.sin(2 * jnp.pi * y) / (2 * jnp.pi)


def test_imex_fixed_small_steps_in_float32_do_not_fail_their_stage_solves():
    """KenCarp's implicit stage equation (the viscous term) is linear, but diffrax's chord iteration always took a
    second iteration and judged it by the ratio of the two corrections: where the predictor was already within the
    tolerance both were rounding, the ratio ~1 read as stagnation and the stage as a failed nonlinear solve.  With
    fixed steps there is no smaller step to retry: 20 steps of 0.001 on 64 spectral points in float32 failed with
    "the diffrax solve failed before t1" (steps of 0.005 ran).  One chord iteration with the exact Jacobian solves
    the linear stage; the solve now runs, to the Cole-Hopf solution."""
    g = Grid(64, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x) + 0.3 * jnp.cos(2 * jnp.pi * g.x)
    sol = solve_burgers(p0, g, nu=0.05, t1=0.02, scheme="spectral", solver="kencarp", dt=0.001)
    assert sol.ps.dtype == jnp.float32 and int(sol.num_steps) == 20
    exact = cole_hopf_gradient(_loss, g.x, 0.02, 0.05)
    assert float(jnp.max(jnp.abs(sol.ps[-1] - exact))) < 1e-4

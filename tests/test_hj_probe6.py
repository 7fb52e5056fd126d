"""HJ / Burgers engine: small grids, odd sizes and published / exact reference problems (THEORY section 3)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf_gradient, Grid, SPECTRAL_TAIL_WARN, solve_burgers


@pytest.mark.parametrize("n", [8, 12])
def test_spectral_tail_sees_an_under_resolved_solve_on_a_small_grid(x64, n):
    # The resolution check's top band (|m| >= 0.8 of the dealiasing cut) held no kept mode on n <= 9 and n = 12
    # points (2/3 rule): spectral_tail was 0 and no warning came, for a solution 0.4 off the exact one.  The band
    # now holds at least the highest kept mode.
    g = Grid(n, -1.0, 1.0)
    nu, t1 = 0.01 / np.pi, 0.5  # the reference problem of Basdevant et al. (1986), past its shock time 1 / pi
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=nu, t1=t1, dt=0.05)
    exact = cole_hopf_gradient(lambda y: jnp.cos(jnp.pi * y) / jnp.pi, g.x, t1, nu)
    assert float(jnp.max(jnp.abs(sol.ps[-1] - exact))) > 0.1  # under-resolved indeed
    assert float(sol.spectral_tail[0]) > SPECTRAL_TAIL_WARN
    assert any(f"under-resolved on the {n} grid" in str(c.message) for c in caught)


def test_traced_save_times_out_of_order_are_refused_by_name():
    # Known save times out of order are refused by name; traced ones (under jit) stopped in Diffrax's own
    # "saveat.ts must be increasing or decreasing", naming neither the solver nor ts.
    g = Grid(8, -1.0, 1.0)
    run = jax.jit(lambda ts: solve_burgers(0.3 * jnp.sin(jnp.pi * g.x), g, nu=0.1, t1=0.2, ts=ts, dt=0.05).ps)
    ok = np.asarray(run(jnp.array([0.05, 0.05, 0.1])))  # repeated save times are in order
    assert ok.shape == (4, 8) and np.all(np.isfinite(ok)) and np.array_equal(ok[0], ok[1])
    with pytest.raises(Exception, match=r"solve_burgers: a traced nu, t1, dt, dt0 or save time is out of range; .*"
                                        r"non-decreasing save times ts in \[0, t1\]"):
        jax.block_until_ready(run(jnp.array([0.1, 0.05, 0.15])))

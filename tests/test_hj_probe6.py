"""HJ / Burgers engine: small grids, traced and mistyped arguments (THEORY section 3)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (cole_hopf, cole_hopf_gradient, cole_hopf_monte_carlo, find_shocks, Grid, shock_time,
                             slice_flow, solve_burgers, SPECTRAL_TAIL_WARN)


def test_spectral_tail_sees_an_under_resolved_solve_on_a_small_grid(x64):
    # The resolution check's top band (|m| >= 0.8 of the dealiasing cut) held no kept mode on n <= 9 and n = 12
    # points (2/3 rule): spectral_tail was 0 and no warning came, for a solution 0.4 off the exact one.  The band
    # now holds at least the highest kept mode.
    n = 8
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


def test_tolerances_save_times_and_flags_that_are_not_what_they_name_are_refused_by_name():
    # rtol="1e-6" and ts="0.1" were read as numbers, rtol=True as a tolerance of 1 and ts=[True] as the time 1.0,
    # a complex rtol or ts failed in a bare "float() argument must be ..."; adaptive="no" and progress="no" chose
    # by their truth value (adaptive stepping, a progress meter); cole_hopf's lipschitz="2" failed in "data type ''
    # not understood".  Each is refused by name before anything is compiled.
    g = Grid(8, -1.0, 1.0)
    p0 = 0.3 * jnp.sin(jnp.pi * g.x)
    real = "is not allowed; need a real number"
    for kw, error, match in [
        (dict(rtol="1e-6"), TypeError, f"rtol='1e-6' {real}"),
        (dict(rtol=True), TypeError, f"rtol=True {real}"),
        (dict(atol=1e-8 + 0j), TypeError, rf"atol=\(1e-08\+0j\) {real}"),
        (dict(ts="0.1"), TypeError, "ts='0.1' is not allowed; need real save times"),
        (dict(ts=[True]), TypeError, r"ts=\[True\] is not allowed; need real save times"),
        (dict(ts=[0.05 + 0j]), TypeError, r"ts=\[\(0.05\+0j\)\] is not allowed"),
        (dict(adaptive="no", dt0=0.01), ValueError, "adaptive='no' is not allowed; need True or False"),
        (dict(progress=1), ValueError, "progress=1 is not allowed; need True or False"),
    ]:
        with pytest.raises(error, match=f"solve_burgers: {match}"):
            solve_burgers(p0, g, nu=0.1, t1=0.1, **kw)
    for lip in ("2", True):
        with pytest.raises(ValueError, match=f"cole_hopf: lipschitz={lip!r} is not allowed; need a finite number"):
            cole_hopf(jnp.cos, jnp.zeros(2), 0.1, 0.1, lipschitz=lip)


def test_find_shocks_and_slice_flow_refuse_flags_and_numbers_of_another_kind_by_name():
    # find_shocks: include_inadmissible="no" failed in "unsupported operand type(s) for |", min_steepness="1" in
    # "'>' not supported", and True was read as 1 for max_shocks, window and min_steepness.  slice_flow:
    # orthonormalize="no" orthonormalised (its truth value), extent="1.0" failed in a bare isfinite error, and
    # extent=True / margin=True were read as 1.
    g = Grid(16, -1.0, 1.0)
    p = jnp.where(g.x < 0, 1.0, -1.0)
    for kw, match in [(dict(include_inadmissible="no"), "include_inadmissible='no' is not allowed; need True or False"),
                      (dict(min_steepness="1"), "min_steepness='1' is not allowed; need a finite number >= 0"),
                      (dict(min_steepness=True), "min_steepness=True is not allowed"),
                      (dict(max_shocks=True), "max_shocks=True is not allowed; need an integer >= 1"),
                      (dict(window=True), "window=True is not allowed; need an integer >= 1")]:
        with pytest.raises(ValueError, match=f"find_shocks: {match}"):
            find_shocks(p, g, **kw)
    base = dict(extent=1.0, n=8, eta=0.1, k=1, nu=0.1)
    for kw, match in [(dict(orthonormalize="no"), "orthonormalize='no' is not allowed; need True or False"),
                      (dict(extent="1.0"), "extent='1.0', margin=0.5 are not allowed"),
                      (dict(extent=True), "extent=True, margin=0.5 are not allowed"),
                      (dict(margin=True), "extent=1.0, margin=True are not allowed")]:
        with pytest.raises(ValueError, match=f"slice_flow: {match}"):
            slice_flow(lambda q: jnp.sum(q * q), jnp.zeros(2), jnp.asarray([1.0, 0.0]), **{**base, **kw})


def test_monte_carlo_refuses_a_traced_time_or_viscosity_out_of_range():
    # Known values are refused by name; traced ones (under vmap / jit) gave a NaN estimate without a word, where the
    # quadrature (cole_hopf) raises.
    def value(t, nu):
        return cole_hopf_monte_carlo(lambda q: jnp.sum(q * q), jnp.ones(3), t, nu, key=jax.random.key(0)).value

    over_nu = jax.jit(jax.vmap(lambda nu: value(0.1, nu)))
    at_t = jax.jit(lambda t: value(t, 0.1))
    assert np.all(np.isfinite(np.asarray(over_nu(jnp.array([0.1, 0.2]))))) and np.isfinite(float(at_t(0.1)))
    msg = "cole_hopf_monte_carlo: t and nu must be finite numbers > 0"
    for bad in (-0.1, 0.0, float("nan")):
        with pytest.raises(Exception, match=msg):
            jax.block_until_ready(over_nu(jnp.array([0.1, bad])))
        with pytest.raises(Exception, match=msg):
            jax.block_until_ready(at_t(bad))


def test_find_shocks_refuses_a_traced_threshold_out_of_range():
    # A known min_steepness out of range is refused by name; a traced NaN (or negative) one reported "no shocks"
    # (every comparison with NaN is False) without a word.
    g = Grid(16, -1.0, 1.0)
    p = jnp.where(g.x < 0, 1.0, -1.0)
    count = jax.jit(lambda m: find_shocks(p, g, min_steepness=m).count)
    assert int(count(1.0)) == 1
    for bad in (float("nan"), -1.0):
        with pytest.raises(Exception, match="find_shocks: a traced min_steepness is not a finite number >= 0"):
            jax.block_until_ready(count(bad))


@pytest.mark.parametrize("periodic", [True, False])
def test_2d_shock_time_is_refined_between_nodes_as_in_1d(x64, periodic):
    # t* = -1 / min lambda_min(Hessian of L) (exact for inviscid Burgers).  In 2-D the smallest node value was used
    # as it is: off by O(dx^2) when the minimum lies between nodes (4.7e-3 relative on 32 x 34 periodic nodes,
    # 4.5e-3 for a valley flat along y, against 8e-5 in 1-D); it is refined by the quadratic through the nine
    # nodes around it.
    g = Grid(32, -1.0, 1.0, periodic=periodic) * Grid(34, -1.0, 1.0, periodic=periodic)
    x, y = g.x

    def loss(a, b):  # lambda_min = -1.5 at (0.03, 0.01) only
        return jnp.cos(jnp.pi * (a - 0.03)) * (1 + 0.5 * jnp.cos(jnp.pi * (b - 0.01))) / np.pi**2

    p0 = jnp.stack(jax.vmap(jax.vmap(jax.grad(loss, (0, 1))))(x, y))
    assert float(shock_time(p0, g)) == pytest.approx(1 / 1.5, rel=2e-4)
    valley = jnp.stack([-jnp.sin(jnp.pi * (x - 0.03)), -0.5 * jnp.sin(jnp.pi * (y - 0.01))])  # lambda_min(y) = -pi
    assert float(shock_time(valley, g)) == pytest.approx(1 / np.pi, rel=2e-4)
    assert float(jax.jit(shock_time)(valley, g)) == float(shock_time(valley, g))

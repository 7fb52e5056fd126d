"""HJ engine and diagnostics: explicit fixed steps against the viscous stability interval, and further cases."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import find_shocks, Grid, shock_time, slice_flow, solve_burgers, solve_hj


def _largest_stable_dt(message: str) -> float:
    return float(re.search(r"need dt <= ([0-9.e+-]+)", message).group(1))


def test_an_explicit_fixed_step_beyond_the_viscous_stability_interval_is_refused(x64):
    # Tsit5 with fixed steps on 16 spectral points at nu = 0.1: h nu max|k|^2 = 0.1 x 0.1 x (8 pi)^2 = 6.3 lies
    # beyond Tsit5's stability interval [-3.51, 0] on the negative real axis; the solve returned a field of 1e31
    # (the exact one stays within max|p0| = 0.5) with only a warning asking for ~1e31 grid points
    g = Grid(16, -1.0, 1.0)
    p0 = 0.5 * jnp.sin(jnp.pi * g.x)
    kw = dict(nu=0.1, t1=0.4, solver="tsit5")
    with pytest.raises(ValueError, match=r"solve_burgers: dt=0\.1 is not allowed with the explicit solver Tsit5 "
                                         r"at nu=0\.1: .* beyond its stability interval .* need dt <= ") as info:
        solve_burgers(p0, g, dt=0.1, **kw)
    limit = _largest_stable_dt(str(info.value))
    # the stated limit is the viscous one, x* / (nu max|k|^2) with x* in [3.5, 3.52] for Tsit5
    kmax2 = (np.pi * 8) ** 2
    assert 3.5 <= limit * 0.1 * kmax2 <= 3.52
    # the largest stable step is accepted, and agrees with ETDRK4 (whose step is not limited by the viscosity)
    p = solve_burgers(p0, g, dt=limit, **kw).ps[-1]
    ref = solve_burgers(p0, g, nu=0.1, t1=0.4, dt=0.1, solver="etd").ps[-1]
    assert float(jnp.max(jnp.abs(p))) <= 0.5
    np.testing.assert_allclose(np.asarray(p), np.asarray(ref), atol=1e-5)
    # the value form and finite volumes (4 / dx^2 per axis, on a bounded grid too) are checked alike
    with pytest.raises(ValueError, match=r"solve_hj: dt=0\.1 is not allowed with the explicit solver Tsit5"):
        solve_hj(0.1 * jnp.cos(jnp.pi * g.x), g, nu=0.1, t1=0.4, dt=0.1, solver="tsit5")
    gb = Grid(17, -1.0, 1.0, periodic=False)
    with pytest.raises(ValueError, match=r"need dt <= ") as info:
        solve_hj(0.1 * jnp.cos(jnp.pi * gb.x), gb, nu=0.1, t1=0.4, dt=0.2, scheme="fv")
    assert 3.5 <= _largest_stable_dt(str(info.value)) * 0.1 * 4 / gb.dx**2 <= 3.52
    # a traced step (under jit) is refused when the computation runs
    with pytest.raises(Exception, match="beyond the explicit solver's stability interval"):
        jax.jit(lambda dt: solve_burgers(p0, g, dt=dt, **kw).ps)(0.1).block_until_ready()
    # no viscosity, no viscous limit
    assert bool(jnp.all(jnp.isfinite(solve_burgers(0.1 * p0, g, nu=0.0, t1=0.1, dt=0.05, solver="tsit5").ps)))


def test_a_finite_volume_blow_up_is_not_told_to_use_finite_volumes(x64):
    # explicit fixed steps at 0.98 of the viscous limit: stable for the viscous term alone, but the Lax-Friedrichs
    # flux's numerical diffusion (~ 2 max|p| / dx) pushes the top mode out of Tsit5's interval and the field
    # overflows; the error said "The grid under-resolves the flow (spectral schemes need ...): use scheme='fv'"
    g = Grid(32, -1.0, 1.0)
    nu = 0.05
    dt = 0.98 * 3.5068 / (4 * nu / g.dx**2)
    p0 = -jnp.sin(jnp.pi * g.x)
    with pytest.raises(Exception, match=r"solve_burgers: the solution is not finite\. The explicit fixed steps are "
                                        r"unstable: .*2 max\|p\| / dx") as info:
        solve_burgers(p0, g, nu=nu, t1=1.0, dt=dt, scheme="fv", solver="tsit5").ps.block_until_ready()
    assert "use scheme='fv'" not in str(info.value)
    # the stated bound holds: below it (0.9 of h (4 nu / dx^2 + 2 max|p| / dx) <= 3.5) the same solve is finite
    ok = 0.9 * 3.5068 / (4 * nu / g.dx**2 + 2 / g.dx)
    assert bool(jnp.all(jnp.isfinite(solve_burgers(p0, g, nu=nu, t1=1.0, dt=ok, scheme="fv", solver="tsit5").ps)))


@pytest.mark.parametrize("lo,hi", [("-1", "1"), (False, True), (b"0", b"1"), (1j, 2.0), (None, 1.0)])
def test_grid_ends_that_are_not_real_numbers_are_refused_by_name(lo, hi):
    # strings, bytes and bools were read as the numbers float() makes of them (Grid(16, False, True) was [0, 1));
    # a complex or None end failed in a bare float() TypeError
    with pytest.raises(ValueError, match=r"Grid needs finite lo < hi \(real numbers\), got lo=.*, hi=.*\."):
        Grid(16, lo, hi)


@pytest.mark.parametrize("n", ["16", None, 16.5, True])
def test_a_grid_size_that_is_not_an_integer_is_refused_showing_what_it_is(n):
    # n="16" was reported as "got n=16" (an integer, as if it were allowed), n=None in a bare int() TypeError
    with pytest.raises(ValueError, match=re.escape(f"Grid needs an integer n >= 4 points, got n={n!r}.")):
        Grid(n, -1.0, 1.0)
    # what a number is, is still read: NumPy and 0-d JAX integers, a whole float
    assert Grid(np.int64(16), np.float32(-1.0), jnp.asarray(1.0)).shape == (16,)
    assert Grid(16.0, -1, 1).n == 16


def test_counts_given_as_none_or_complex_numbers_are_refused_by_name():
    # each failed in a bare "int() argument must be ..." TypeError naming neither the function nor the argument
    g = Grid(16, -1.0, 1.0)
    p = -jnp.sin(jnp.pi * g.x)
    for kw, match in ((dict(max_shocks=None), "max_shocks=None"), (dict(max_shocks=1j), "max_shocks=1j"),
                      (dict(window=1j), "window=1j")):
        with pytest.raises(ValueError, match=re.escape(f"find_shocks: {match} is not allowed; need an integer >= 1")):
            find_shocks(p, g, **kw)
    assert find_shocks(p, g, max_shocks=2.0, window=3.0).valid.shape == (2,)
    with pytest.raises(ValueError, match=re.escape("slice_flow: n=None is not allowed; need an integer >= 4")):
        slice_flow(lambda w: jnp.sum(w**2), jnp.zeros(2), jnp.array([1.0, 0.0]), extent=1.0, n=None, eta=0.1, k=1,
                   nu=0.05)


@pytest.mark.parametrize("n", [64, 100, 256])
def test_shock_time_of_a_kinked_or_expanding_field_reads_the_slopes_of_the_samples(x64, n):
    # THEORY section 3: t* = -1 / min p0'.  p0 = clip(-x, -a, a) (a loss -x^2/2 joined to linear pieces: p0' = -1
    # between two kinks) has t* = 1 exactly; the fourth-order differences undershoot beside a kink and the parabola
    # through the edge of the flat minimum (-1, -1, 0) dips to -1.125: t* came out 0.888-0.975 (n = 64 .. 1000,
    # not converging).  An expansion step (p0 increasing everywhere, a rarefaction: no shock) was read as the
    # compression -jump / (12 dx) beside it: t* = 0.38 at n = 64, 0.096 at n = 256 (-> 0 with dx)
    g = Grid(n, -1.0, 1.0, periodic=False)
    x = np.asarray(g.x)
    for a in (0.3, 0.31, 0.333):
        assert float(shock_time(jnp.asarray(np.clip(-x, -a, a)), g)) == pytest.approx(1.0, rel=1e-9)
    assert float(shock_time(jnp.asarray(0.3 * np.tanh((x - 0.1234) / 1e-3)), g)) > 1e3
    # on a periodic grid the wrap of clip(-x, -a, a) is an expansion (from -a at x -> 1 to a at x = -1) too
    gp = Grid(n, -1.0, 1.0)
    xp = np.asarray(gp.x)
    assert float(shock_time(jnp.asarray(np.clip(-xp, -0.3, 0.3)), gp)) == pytest.approx(1.0, rel=1e-9)
    # a compressive step is still an (almost) instantaneous shock, and a smooth minimum keeps its fourth-order value
    assert float(shock_time(jnp.asarray(-0.3 * np.tanh((x - 0.1234) / 1e-3)), g)) < 2 * g.dx / 0.6
    assert float(shock_time(jnp.asarray(-np.sin(np.pi * xp)), gp)) == pytest.approx(1 / np.pi, rel=1e-5)


def test_shock_time_of_a_2d_expansion_step_is_no_shock(x64):
    # p0 = grad(U(x) + y^2 / 4) with U' a steep increasing step: nowhere compressive (lambda_min of the Hessian
    # >= 0), but the fourth-order difference's lobe beside the step read as -jump / (12 dx): t* = 0.84 on 48 x 50
    # nodes, 0.40 on 100 x 102 (-> 0 with dx)
    g = Grid(48, -1.0, 1.0, periodic=False) * Grid(50, -1.0, 1.0, periodic=False)
    x, y = np.asarray(g.x)
    assert float(shock_time(jnp.asarray(np.stack([0.3 * np.tanh((x - 0.1234) / 1e-3), 0.5 * y])), g)) > 1e3
    # its compressive mirror is still an (almost) instantaneous shock
    assert float(shock_time(jnp.asarray(np.stack([-0.3 * np.tanh((x - 0.1234) / 1e-3), 0.5 * y])), g)) < \
        2 * g.gx.dx / 0.6

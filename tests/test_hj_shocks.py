"""Shock times, Rankine-Hugoniot speeds and entropy admissibility (THEORY section 3)."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import find_shocks, Grid, Spectral, shock_time, shock_time_from_hessian, solve_burgers

# (p0, analytic p0') on [-1, 1) periodic
CASES = {
    "sine": (lambda x: -jnp.sin(jnp.pi * x), lambda x: -np.pi * np.cos(np.pi * x)),
    "two_modes": (lambda x: -jnp.sin(jnp.pi * x) + 0.5 * jnp.sin(2 * jnp.pi * x),
                  lambda x: -np.pi * np.cos(np.pi * x) + np.pi * np.cos(2 * np.pi * x)),
    "shifted_amp": (lambda x: 0.3 - 2.0 * jnp.sin(jnp.pi * (x - 0.2)),
                    lambda x: -2 * np.pi * np.cos(np.pi * (x - 0.2))),
    "bump": (lambda x: jnp.exp(-20 * x**2), lambda x: -40 * x * np.exp(-20 * x**2)),
}


def exact_tstar(dp):
    xs = np.linspace(-1, 1, 200001)
    return -1.0 / dp(xs).min()


@pytest.mark.parametrize("name", sorted(CASES))
def test_shock_time_from_initial_data(name):
    p0, dp = CASES[name]
    g = Grid(256, -1.0, 1.0)
    assert float(shock_time(p0(g.x), g)) == pytest.approx(exact_tstar(dp), rel=1e-2)


@pytest.mark.parametrize("n", [21, 51, 201])
def test_shock_time_bounded_grid_steepest_at_an_end(n):
    """On a bounded grid whose steepest descent is at an end (p0 = -x^3 on [0, 1]: t* = 1/3), the end sample's
    derivative sets the time, not its neighbour's (10.7% off at n = 21 before)."""
    g = Grid(n, 0.0, 1.0, periodic=False)
    for p0, exact in ((-g.x**3, 1 / 3), ((1 - g.x) ** 3, 1 / 3)):  # steepest at the right end, then the left
        assert float(shock_time(p0, g)) == pytest.approx(exact, rel=1e-2)


def test_shock_time_from_hessian_and_2d():
    assert float(shock_time_from_hessian(-4.0)) == pytest.approx(0.25)
    assert np.isinf(float(shock_time_from_hessian(1.0)))
    g = Grid(64, -1.0, 1.0) * Grid(64, -1.0, 1.0)
    x, y = g.x
    # p = grad L for L = cos(pi x) cos(pi y) / pi^2: Hessian min eigenvalue -1 at the origin -> t* = 1
    p0 = jnp.stack([-jnp.sin(jnp.pi * x) * jnp.cos(jnp.pi * y), -jnp.cos(jnp.pi * x) * jnp.sin(jnp.pi * y)]) / jnp.pi
    assert float(shock_time(p0, g)) == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("name", ["sine", "bump"])
def test_solver_steepening_reproduces_shock_time(name):
    # Inviscidly 1 / max|p_x|(t) = 1/|min p0'| - t along the steepest characteristic; fit it from a near-inviscid
    # solve and extrapolate to zero.
    p0, dp = CASES[name]
    tstar = exact_tstar(dp)
    g = Grid(512, -1.0, 1.0)
    ts = jnp.asarray([0.2, 0.4, 0.6], dtype=float) * tstar
    sol = solve_burgers(p0(g.x), g, nu=2e-5, t1=0.7 * tstar, ts=ts, rtol=1e-7, atol=1e-9)
    inv = [1.0 / float(jnp.max(jnp.abs(Spectral().derivative(g, p)))) for p in sol.ps]
    slope, icpt = np.polyfit(np.asarray(sol.ts), inv, 1)
    assert -icpt / slope == pytest.approx(tstar, rel=1e-2)


def riemann(g, pl, pr, width=0.01):
    return pr + (pl - pr) * 0.5 * (1 - jnp.tanh(g.x / width))


@pytest.mark.parametrize("pl,pr", [(1.0, -0.5), (2.0, 1.0), (0.5, -1.5)])
def test_rankine_hugoniot_speed(pl, pr):
    # periodic [-1, 1): a shock at x = 0 (pl > pr) and an expansion at the wrap-around point
    g = Grid(512, -1.0, 1.0)
    p0 = riemann(g, pl, pr)
    sol = solve_burgers(p0, g, nu=1e-3, t1=0.3, ts=jnp.asarray([0.1]), scheme="fv", rtol=1e-6, atol=1e-8)
    s_rh = 0.5 * (pl + pr)
    found = [find_shocks(p, g).to_list() for p in sol.ps]
    assert all(len(f) == 1 for f in found), found  # the expansion is not reported
    x0, x1 = found[0][0]["location"], found[1][0]["location"]
    assert (x1 - x0) / 0.2 == pytest.approx(s_rh, rel=1e-2)
    assert found[1][0]["speed"] == pytest.approx(s_rh, rel=1e-2)
    assert found[1][0]["jump"] == pytest.approx(pl - pr, rel=1e-2)
    assert found[1][0]["admissible"]


def test_expansion_jumps_are_not_shocks():
    g = Grid(512, -1.0, 1.0)  # the grid and save structure of test_rankine_hugoniot_speed: one compilation
    p0 = riemann(g, -0.5, 1.0)  # pl < pr at x = 0: expansion; the wrap-around jump is a shock
    default = find_shocks(p0, g).to_list()
    assert len(default) == 1 and default[0]["location"] == pytest.approx(-1.0, abs=0.02) or \
        default[0]["location"] == pytest.approx(1.0, abs=0.02)
    both = find_shocks(p0, g, include_inadmissible=True).to_list()
    assert len(both) == 2 and sorted(s["admissible"] for s in both) == [False, True]
    # after evolution the expansion has become a fan, with no steep front there
    p = solve_burgers(p0, g, nu=1e-3, t1=0.2, ts=jnp.asarray([0.1]), scheme="fv", rtol=1e-6, atol=1e-8).ps[-1]
    assert all(abs(s["location"]) > 0.5 for s in find_shocks(p, g, include_inadmissible=True).to_list())


def test_grid2d_needs_two_grids():
    from quotient_sgd.hj import Grid, Grid2D

    with pytest.raises(ValueError, match="Grid2D: gy must be a 1-D Grid"):
        Grid2D(Grid(16, 0.0, 1.0), 5)
    assert Grid2D(Grid(16, 0.0, 1.0), Grid(8, 0.0, 1.0)).shape == (16, 8)


def test_shock_time_checks_the_field_shape():
    with pytest.raises(ValueError, match=r"shock_time: p0 has shape \(10,\); on this grid it must be \(16,\)"):
        shock_time(jnp.zeros(10), Grid(16, 0.0, 1.0))


@pytest.mark.parametrize("shift", [0.0, 1e-5, -1e-5, 1e-3])
def test_shock_location_stays_inside_periodic_grid(shift):
    """A front at (or a hair left of) the grid start is reported in [lo, hi): wrapping -tiny by the period used
    to round to hi itself (a location 2.0 on [0, 2))."""
    g = Grid(512, 0.0, 2.0)
    p = -jnp.tanh(jnp.sin(jnp.pi * (g.x + shift * g.dx)) / 0.05)
    sh = find_shocks(p, g).to_list()
    assert len(sh) == 1
    loc = sh[0]["location"]
    assert g.lo <= loc < g.hi, loc
    assert min(loc, g.hi - loc) < g.dx


def test_find_shocks_float32_field_under_x64(x64):
    g = Grid(64, -1.0, 1.0)
    p = -jnp.tanh(g.x / 0.05).astype(jnp.float32)
    sh = eqx.filter_jit(find_shocks)(p, g)  # jitted: faster than dispatching its many small ops one by one
    assert sh.location.dtype == jnp.float32
    assert int(sh.count) == 1 and abs(float(sh.location[0])) < g.dx


def test_shock_time_bounded_grid_interior_fourth_order():
    """Away from its ends a bounded grid differentiates to fourth order like a periodic one (it was second order
    there: 1.7e-3 off for the sine at n = 64, 100x less now)."""
    g = Grid(64, -1.0, 1.0, periodic=False)
    assert float(shock_time(-jnp.sin(jnp.pi * g.x), g)) == pytest.approx(1 / np.pi, rel=2e-5)
    g = Grid(64, -5.0, 5.0, periodic=False)  # p0 = exp(-x^2): min p0' = -sqrt(2) e^(-1/2) at x = 1/sqrt(2)
    assert float(shock_time(jnp.exp(-g.x**2), g)) == pytest.approx(np.exp(0.5) / np.sqrt(2), rel=1e-3)


@pytest.mark.parametrize("args", [(4.5, 0.0, 1.0), (8, 0.0, float("inf")), (8, float("-inf"), 0.0)])
def test_grid_refuses_fractional_n_and_infinite_ends(args):
    # n = 4.5 was truncated to 4 points, hi = inf gave dx = inf
    with pytest.raises(ValueError, match=r"Grid needs (an integer n >= 4|finite lo < hi)"):
        Grid(*args)


@pytest.mark.parametrize("periodic", [True, False])
def test_find_shocks_default_threshold_on_small_grids(periodic):
    """On 5-9 points the default threshold (10 x the mean slope) was above the steepness of any front (a step has
    ~0.6 n x the mean slope), so clear shocks went unreported. Steps and fronts about one cell wide are found now;
    smooth fields (sines, a ramp, a parabola, exponentials) still report none."""
    find = eqx.filter_jit(find_shocks)  # one compilation per grid
    for n in range(5, 10):
        g = Grid(n, -1.0, 1.0, periodic=periodic)
        x = np.asarray(g.x)
        for x0 in (-0.37, 0.0, 0.1, 0.2):
            found = find(jnp.asarray(np.where(x <= x0 + 1e-9, 1.0, -1.0)), g).to_list()
            assert len(found) == 1 and found[0]["jump"] == pytest.approx(2.0), (n, x0)
            assert abs(found[0]["location"] - x0) < 1.01 * g.dx, (n, x0)
            if n >= 7:
                assert len(find(jnp.asarray(-np.tanh((x - x0) / (0.5 * g.dx))), g).to_list()) == 1, (n, x0)
        smooth = [-np.sin(np.pi * x + ph) for ph in (0.0, 0.3, 1.1, 2.0)]
        if not periodic:
            smooth += [-x, -x * x, np.exp(-1.5 * x), x - 0.8 * x**3]
        for i, p in enumerate(smooth):
            assert int(find(jnp.asarray(p), g).count) == 0, (n, i)

"""2-D initial fields must be gradients: the curl check of solve_burgers and shock_time (THEORY section 3).

The 2-D solvers integrate Burgers in the gradient form grad(|p|^2 / 2), which is Burgers only for p = grad u; a
rotational field was solved silently in another equation.  The check (quotient_sgd/hj/_curl.py) measures the curl
node by node with the scheme's derivatives (spectral and fourth-order differences on a periodic grid with the
spectral scheme, the differences otherwise) against rounding plus the derivatives' truncation error on the field.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import FiniteVolume, Grid, shock_time, solve_burgers, Spectral
from quotient_sgd.hj._curl import _differences, _spectral, measure_curl
from quotient_sgd.hj._shocks import _diff

# (grid, scheme): periodic spectral, periodic finite volumes, bounded finite volumes, one axis of each kind
KINDS = {
    "spectral": (lambda n, m: Grid(n, -1.0, 1.0) * Grid(m, -1.0, 1.2), "spectral"),
    "fv-periodic": (lambda n, m: Grid(n, -1.0, 1.0) * Grid(m, -1.0, 1.2), "fv"),
    "fv-bounded": (lambda n, m: Grid(n, -1.0, 1.0, periodic=False) * Grid(m, -1.0, 1.2, periodic=False), "fv"),
    "fv-mixed": (lambda n, m: Grid(n, -1.0, 1.0) * Grid(m, -1.0, 1.2, periodic=False), "fv"),
}
SIZES = [(16, 16), (33, 40), (96, 64)]


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The field's precision: float64 runs under ``jax.enable_x64``."""
    if request.param == "float64":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)


def dtype_cases(name, values, slow):
    """``(dtype, name)`` parameters over both precisions and ``values``, the pairs in ``slow`` marked slow (the fast
    ones keep every precision and every value); ``dtype`` is the fixture above, parametrised indirectly."""
    cases = [pytest.param(d, v, marks=[pytest.mark.slow] if (d, v) in slow else [], id=f"{d}-{v}")
             for d in ("float32", "float64") for v in values]
    return pytest.mark.parametrize(f"dtype, {name}", cases, indirect=["dtype"])


def nodes(grid):
    """The grid's nodes in float64 NumPy (fields are computed there and rounded once to the working dtype)."""
    x, y = (g.lo + g.dx * np.arange(g.n) for g in grid.axes)
    return np.meshgrid(x, y, indexing="ij")


def field(a, b=None):
    """NumPy float64 field(s) as one array in the default float (float64 under ``jax.enable_x64``)."""
    return jnp.asarray(a if b is None else np.stack([a, b]), dtype=jnp.zeros(()).dtype)


def smooth_u(seed, grid, modes=3):
    """A random smooth u and its exact gradient at the nodes: a sum of cos(a x + f) cos(b y + g), periodic on a
    periodic axis, with frequencies off the grid's otherwise."""
    rng = np.random.default_rng(seed)
    x, y = nodes(grid)
    u, ux, uy = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    for a in range(modes + 1):
        for b in range(modes + 1):
            ka = 2 * np.pi * a / grid.gx.length if grid.gx.periodic else 1.3 * a
            kb = 2 * np.pi * b / grid.gy.length if grid.gy.periodic else 0.9 * b
            c, (f, g) = rng.normal() / (1 + a * a + b * b), rng.uniform(0, 2 * np.pi, 2)
            u += c * np.cos(ka * x + f) * np.cos(kb * y + g)
            ux -= c * ka * np.sin(ka * x + f) * np.cos(kb * y + g)
            uy -= c * kb * np.cos(ka * x + f) * np.sin(kb * y + g)
    return field(u), field(ux, uy)


def vortex(grid, centre=(0.2, -0.1), width=0.3):
    """A smooth rotational field ``(-d psi / dy, d psi / dx)``, psi a Gaussian: its curl is Lap psi."""
    x, y = nodes(grid)
    dx, dy = x - centre[0], y - centre[1]
    psi = np.exp(-(dx * dx + dy * dy) / width**2)
    return field(2 * dy / width**2 * psi, -2 * dx / width**2 * psi)


def kinked(grid, centre, radius, aspect, m):
    """The exact gradient of a loss with a kink along the ellipse s = 0, s = |x - c|^2 (aspect on y) - r^2:
    u = |s| for m = 0 (p jumps), else u = max(s, 0)^m / m! (a jump in the (m - 1)-th derivative of p)."""
    x, y = nodes(grid)
    s = (x - centre[0]) ** 2 + aspect * (y - centre[1]) ** 2 - radius**2
    w = np.sign(s) if m == 0 else np.maximum(s, 0.0) ** (m - 1) / math.factorial(m - 1)
    return field(2 * (x - centre[0]) * w, 2 * aspect * (y - centre[1]) * w)


@eqx.filter_jit
def built(grid, u, spectral: bool):
    """grad u by the check's own derivatives: spectral, or the fourth-order differences."""
    if spectral:
        return Spectral().derivative(grid, u)
    return jnp.stack([_diff(u, grid.gx, 0), _diff(u, grid.gy, 1)])


@eqx.filter_jit
def parts(grid, p, spectral: bool):
    """Curl, Jacobian norm, rounding and truncation allowances of the spectral or difference measure."""
    return (_spectral if spectral else _differences)(grid, p)


def worst_ratio(p, grid, scheme):
    """The largest ``|curl| / tolerance`` over the measures the scheme's check uses (the field passes at <= 1)."""
    return max(float(m.ratio) for m in measure_curl(p, grid, scheme == "spectral"))


def refuse():
    """``pytest.raises`` for the solver's refusal of a rotational p0, with the measured numbers."""
    return pytest.raises(ValueError, match=r"solve_burgers: p0 is not a gradient field: at x = .* \|curl p0\| / "
                                           r"max\|grad p0\| = .* exceeds the tolerance there")


# every kind at the odd / unequal and the largest size; the smallest grid with the spectral and the bounded check
# (the two families of stencils and edges); the smallest size of the other two kinds in the slow suite
_SMOOTH_CASES = [pytest.param(kind, size, marks=[pytest.mark.slow] if size == SIZES[0] and kind in
                              ("fv-periodic", "fv-mixed") else [], id=f"{kind}-size{SIZES.index(size)}")
                 for kind in sorted(KINDS) for size in SIZES]


@pytest.mark.parametrize("kind, size", _SMOOTH_CASES)
def test_gradients_of_random_smooth_fields_are_accepted(dtype, kind, size):
    """Exact gradients of random smooth u pass with a margin (below a quarter of the tolerance; measured <= 0.07
    here), and so do gradients built by the derivatives the check uses, from u and from u offset by 100 (rounding of
    the level of u; measured <= 0.02 with the differences, <= 0.1 spectral)."""
    make, scheme = KINDS[kind]
    grid = make(*size)
    for seed in range(3):
        u, p = smooth_u(seed, grid)
        assert p.dtype == dtype
        assert worst_ratio(p, grid, scheme) < 0.25, (seed, worst_ratio(p, grid, scheme))
        for level in (0.0, 100.0):
            assert worst_ratio(built(grid, u + level, False), grid, "fv") < 0.25, (seed, level)
            if scheme == "spectral":
                assert worst_ratio(built(grid, u + level, True), grid, scheme) < 0.25, (seed, level)


# the spectral check in float64 (where rounding is smallest) and the differences in float32
@dtype_cases("kind", ["spectral", "fv-bounded"], slow={("float32", "spectral"), ("float64", "fv-bounded")})
def test_a_gradient_built_by_the_checks_own_derivatives_is_curl_free_to_rounding(dtype, kind):
    """The consistent discrete curl: spectral derivatives of a spectral gradient, differences of a difference
    gradient, commute; the curl is within the rounding allowance alone (measured <= 0.09 of it here, <= 0.16 on
    grids up to 512 nodes), no truncation needed."""
    make, _ = KINDS[kind]
    for size in SIZES:
        grid = make(*size)
        for seed in range(3):
            u, _ = smooth_u(seed, grid)
            spectral = kind == "spectral"
            curl, _, rounding, _ = parts(grid, built(grid, u, spectral), spectral)
            assert float(jnp.max(jnp.abs(curl))) < 0.5 * float(rounding), (size, seed)


def test_spectral_curl_of_a_spectral_gradient_is_at_rounding_in_float64(x64):
    grid = Grid(64, -1.0, 1.0) * Grid(48, 0.0, 2.0)
    u, _ = smooth_u(0, grid)
    p = built(grid, u, True)
    (m, _) = measure_curl(p, grid, True)
    assert float(m.relative_curl) < 1e-13
    assert float(m.tolerance) < 1e-11  # a rotational part above ~1e-11 of the gradient is refused


# every kind in float32, the spectral and the bounded check in float64 too
@dtype_cases("kind", sorted(KINDS), slow={("float64", "fv-periodic"), ("float64", "fv-mixed")})
def test_pure_rotations_are_refused_naming_p0(dtype, kind):
    make, scheme = KINDS[kind]
    grid = make(*SIZES[1])  # a size of the accepted smooth fields above: the check compiled once for both
    x, y = grid.x
    ly = grid.gy.length
    rotations = {
        "(-sin y, sin x)": jnp.stack([-jnp.sin(2 * np.pi * y / ly), jnp.sin(np.pi * x)]),
        "(-y, x) bump": jnp.stack([-y, x]) * jnp.exp(-(x * x + y * y) / 0.1)[None],
        "vortex": vortex(grid),
    }
    for name, p0 in rotations.items():
        assert p0.dtype == dtype
        with refuse() as info:
            solve_burgers(p0, grid, nu=0.1, t1=0.01, scheme=scheme)
        msg = str(info.value)
        assert jnp.dtype(dtype).name in msg and "33 x 40 grid" in msg and "solve_hj" in msg, (name, msg)
        assert "(rounding " in msg and " + truncation " in msg, msg


def test_non_periodic_rotation_on_a_periodic_grid_is_refused_by_the_differences():
    """(-y, x) jumps at the seam of a periodic grid, so every Fourier derivative rings and the spectral tolerance
    is large; the differences still see the rotation away from the seam."""
    grid = Grid(32, -1.0, 1.0) * Grid(32, -1.0, 1.0)
    x, y = grid.x
    p0 = jnp.stack([-y, x])
    spec, diff = measure_curl(p0, grid, True)
    assert float(spec.ratio) < 1 < float(diff.ratio)
    with pytest.raises(ValueError, match=r"p0 is not a gradient field: .*\(fourth-order differences;"):
        solve_burgers(p0, grid, nu=0.1, t1=0.01)


# the spectral and the bounded check in both precisions, the periodic and the mixed differences in one each (the
# other in the slow suite)
@dtype_cases("kind", sorted(KINDS), slow={("float64", "fv-periodic"), ("float32", "fv-mixed")})
def test_a_small_rotational_part_above_the_tolerance_is_refused_and_one_within_rounding_is_accepted(dtype, kind):
    make, scheme = KINDS[kind]
    grid = make(*SIZES[2])  # a size of the tests above: the measures compiled once for them all
    _, p = smooth_u(1, grid)
    r = vortex(grid)
    measures = measure_curl(p, grid, scheme == "spectral")
    # the largest tolerance over the nodes, relative to max |grad p| (the check's first measure)
    _, jac, rounding, truncation = parts(grid, p, scheme == "spectral")
    tol = float(jnp.max(rounding + truncation) / jnp.max(jac))
    r_rel = float(jnp.max(jnp.abs(parts(grid, r, False)[0])) / jnp.max(jac))
    # the tolerance is small: rounding for the spectral check, the fourth-order truncation for the differences
    bound = {"spectral": 1e-3 if dtype == jnp.float32 else 1e-11}.get(kind, 1e-3)
    assert tol < bound, (kind, tol)
    big = 20 * tol / r_rel  # a rotational part 20 x the tolerance
    with refuse():
        solve_burgers(p + big * r, grid, nu=0.1, t1=0.01, scheme=scheme)
    assert 20 * tol < 0.05  # "small": a few percent of the gradient at most
    # within rounding: a rotational part of 1% of the rounding allowance, and the field rounded to a few ulps
    m = measures[-1]
    tiny = 0.01 * float(m.rounding) / r_rel
    noise = jax.random.normal(jax.random.key(0), p.shape, dtype)
    for q in (p + tiny * r, p * (1 + 4 * jnp.finfo(dtype).eps * noise)):
        assert worst_ratio(q, grid, scheme) < 0.5


def test_float64_gradient_rounded_to_float32_is_accepted(x64):
    grid = Grid(48, -1.0, 1.0) * Grid(40, -1.0, 1.2)
    for seed in range(3):
        _, p = smooth_u(seed, grid)
        p32 = p.astype(jnp.float32)
        assert worst_ratio(p32, grid, "spectral") < 0.25
        assert worst_ratio(p32, grid, "fv") < 0.25


# the periodic (spectral) check in float32, the bounded one in float64; the other two pairs in the slow suite
@dtype_cases("periodic", [True, False], slow={("float32", False), ("float64", True)})
def test_piecewise_smooth_gradients_are_accepted(dtype, periodic):
    """Gradients of losses with kinks along a curve: p jumps (u = |s|) or one of its derivatives does
    (u = max(s, 0)^m): the differences' error there is covered (measured <= 0.31 of the tolerance here, <= 0.39 on
    grids up to 1024 nodes)."""
    for n in (32, 128):
        grid = Grid(n, -1.0, 1.0, periodic=periodic) * Grid(n + 1, -1.0, 1.0, periodic=periodic)
        for centre, radius, aspect in (((0.0, 0.0), 0.5, 1.0), ((0.13, -0.21), 0.37, 1.7), ((0.8, 0.7), 0.5, 1.3)):
            for m in range(5):
                p = kinked(grid, centre, radius, aspect, m)
                assert worst_ratio(p, grid, "spectral" if periodic else "fv") < 0.5, (n, centre, m)


# (the spectral solve in the slow suite: test_differentiation_through_a_checked_solve[spectral] runs one)
@pytest.mark.parametrize("kind", [pytest.param("spectral", marks=pytest.mark.slow), "fv-mixed"])
def test_solvers_accept_gradients(x64, kind):
    """The check passes the fields the solver is for, and the 2-D solve runs (its agreement with Cole-Hopf is
    tested in test_hj_cole_hopf_slices)."""
    make, scheme = KINDS[kind]
    grid = make(16, 12)
    _, p0 = smooth_u(2, grid, modes=1)
    p = solve_burgers(0.2 * p0, grid, nu=0.2, t1=0.01, scheme=scheme, dt=0.005).ps[-1]
    assert p.shape == (2, 16, 12) and bool(jnp.all(jnp.isfinite(p)))


def test_traced_fields_are_checked_when_the_computation_runs():
    """Under jit and vmap a field passed in is a tracer: the check runs with the computation (equinox.error_if), the
    message names p0."""
    grid = Grid(16, -1.0, 1.0) * Grid(16, -1.0, 1.0)
    _, p0 = smooth_u(0, grid, modes=1)
    r = vortex(grid)
    run = jax.jit(lambda p: solve_burgers(p, grid, nu=0.2, t1=0.01, dt=0.005).ps[-1])
    assert bool(jnp.all(jnp.isfinite(run(0.2 * p0))))
    with pytest.raises(Exception, match="solve_burgers: p0 is not a gradient field"):
        jax.block_until_ready(run(0.2 * p0 + 0.1 * r))
    # a known field closed over by the jitted function is measured while it traces: the full ValueError
    q = 0.2 * p0 + 0.1 * r
    with refuse():
        jax.jit(lambda nu: solve_burgers(q, grid, nu=nu, t1=0.01, dt=0.005).ps[-1])(0.2)
    batched = jax.vmap(lambda a: solve_burgers(0.2 * p0 + a * r, grid, nu=0.2, t1=0.01, dt=0.005).ps[-1])
    assert batched(jnp.zeros(2)).shape == (2, 2, 16, 16)
    with pytest.raises(Exception, match="solve_burgers: p0 is not a gradient field"):
        jax.block_until_ready(batched(jnp.asarray([0.0, 0.1])))


# (finite volumes in the slow suite: test_solvers_accept_gradients differentiates nothing but solves them)
@pytest.mark.parametrize("scheme", ["spectral", pytest.param("fv-smooth", marks=pytest.mark.slow)])
def test_differentiation_through_a_checked_solve(x64, scheme):
    """jax.grad with respect to p0 and nu goes through the check (it measures the primal only) and agrees with
    central differences; finite differences in p0 must perturb along a gradient: a rotational step of 1e-5 is
    refused where the tolerance is below it (the spectral check's, at rounding)."""
    grid = Grid(16, -1.0, 1.0) * Grid(16, -1.0, 1.0)
    x, y = grid.x
    _, p0 = smooth_u(0, grid, modes=1)
    p0 = 0.3 * p0
    _, dv = smooth_u(5, grid, modes=1)  # a perturbation along a gradient
    w = (jnp.cos(2 * x + 0.3) * jnp.sin(y + 0.1) + 0.5)[None]
    kw = dict(scheme="spectral") if scheme == "spectral" else dict(scheme=FiniteVolume("smooth"), solver="tsit5")

    def obs(p, nu):
        return jnp.sum(w * solve_burgers(p, grid, nu=nu, t1=0.1, dt=0.01, **kw).ps[-1])

    g_p, g_nu = jax.grad(obs, argnums=(0, 1))(p0, 0.1)
    h = 1e-5
    fd_p = (obs(p0 + h * dv, 0.1) - obs(p0 - h * dv, 0.1)) / (2 * h)
    fd_nu = (obs(p0, 0.1 + h) - obs(p0, 0.1 - h)) / (2 * h)
    assert abs(float(jnp.sum(g_p * dv)) - float(fd_p)) < 1e-6 * max(1.0, abs(float(fd_p)))
    assert abs(float(g_nu) - float(fd_nu)) < 1e-6 * max(1.0, abs(float(fd_nu)))
    # the gradient is defined in every direction, rotational ones included
    r = vortex(grid, width=0.5)
    assert np.isfinite(float(jnp.sum(g_p * r)))
    if scheme == "spectral":
        with pytest.raises(ValueError, match="p0 is not a gradient field"):
            obs(p0 + h * r, 0.1)


# float32 in the fast suite (the float64 curl check is in the fast suite through the solver's refusals above)
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)], indirect=True)
def test_shock_time_refuses_a_rotational_field(dtype):
    grid = Grid(64, -1.0, 1.0) * Grid(64, -1.0, 1.0)
    x, y = grid.x
    # p = grad L for L = cos(pi x) cos(pi y) / pi^2: Hessian min eigenvalue -1 at the origin -> t* = 1
    p0 = jnp.stack([-jnp.sin(jnp.pi * x) * jnp.cos(jnp.pi * y), -jnp.cos(jnp.pi * x) * jnp.sin(jnp.pi * y)]) / jnp.pi
    assert float(shock_time(p0, grid)) == pytest.approx(1.0, rel=1e-2)
    for rot in (jnp.stack([-jnp.sin(jnp.pi * y), jnp.sin(jnp.pi * x)]), p0 + 0.05 * vortex(grid)):
        with pytest.raises(ValueError, match=r"shock_time: p0 is not a gradient field: .* shock_time_from_hessian"):
            shock_time(rot, grid)
    # traced (as inside slice_flow, whose field is built by the same differences): not checked
    assert np.isfinite(float(jax.jit(lambda p: shock_time(p, grid))(jnp.stack([-y, x]))))

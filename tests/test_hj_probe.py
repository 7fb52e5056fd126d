"""HJ engine on cases beyond the other test_hj files: grid sizes, dtypes, non-finite input, jit (THEORY section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (cole_hopf, find_shocks, Grid, shock_time, shock_time_from_hessian, slice_flow,
                             solve_burgers, solve_hj, Spectral)


@pytest.mark.parametrize("n", [63, 64, 96, 97])
@pytest.mark.parametrize("form", ["burgers", "hj"])
def test_dealiasing_leaves_no_aliased_mode(x64, n, form):
    """The product of cos(m x) with itself has modes 0 and 2m only; the dealiased nonlinearity may drop them but
    must not put anything elsewhere.  With n divisible by 3 the mode n/3 was kept and 2 n/3 aliased onto it."""
    g = Grid(n, 0.0, 2 * np.pi)
    s = Spectral()
    ms = np.arange(n // 2 + 1)
    fields = jnp.cos(jnp.asarray(ms, dtype=float)[:, None] * g.x[None, :])
    out = np.abs(np.asarray(jax.vmap(lambda f: s.nonlinear_hat(g, form, s.forward(g, f)))(fields)))
    allowed = np.zeros_like(out, dtype=bool)
    allowed[:, 0] = True
    allowed[ms[2 * ms <= n // 2], 2 * ms[2 * ms <= n // 2]] = True
    assert np.max(np.where(allowed, 0.0, out)) < 1e-9 * n * n, np.argwhere(~allowed & (out > 1e-9 * n * n))


@pytest.mark.parametrize("arg", ["t1", "nu", "p0", "dt"])
def test_solve_refuses_non_finite_inputs(arg):
    """A NaN t1 returned the initial data as the solution at t = 0; a NaN nu or p0 ran 16384 steps into a
    max_steps error; t1 = inf did too."""
    g = Grid(16, -1.0, 1.0)
    kw = dict(p0=-jnp.sin(jnp.pi * g.x), nu=0.1, t1=0.1, dt=0.01)
    kw[arg] = kw[arg].at[3].set(jnp.nan) if arg == "p0" else float("nan")
    with pytest.raises(ValueError, match=f"{arg}.*finite"):
        solve_burgers(kw.pop("p0"), g, **kw)
    with pytest.raises(ValueError, match="t1=inf is not finite"):
        solve_hj(jnp.cos(g.x), g, nu=0.1, t1=float("inf"))


def test_traced_non_finite_t1_raises():
    g = Grid(16, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    run = jax.jit(lambda t1: solve_burgers(p0, g, nu=0.1, t1=t1, dt=0.05).ps[-1])
    assert np.all(np.isfinite(np.asarray(run(0.1))))
    with pytest.raises(Exception, match="not finite"):
        jax.block_until_ready(run(jnp.nan))


def test_half_precision_field_runs_in_float32_and_complex_is_refused():
    g = Grid(16, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    ref = solve_burgers(p0, g, nu=0.1, t1=0.1, dt=0.05).ps[-1]
    for half in (jnp.float16, jnp.bfloat16):
        p = solve_burgers(p0.astype(half), g, nu=0.1, t1=0.1, dt=0.05).ps[-1]
        assert p.dtype == jnp.float32
        assert np.max(np.abs(np.asarray(p - ref))) < 1e-2
    with pytest.raises(TypeError, match="p0 has dtype complex64"):
        solve_burgers(p0.astype(jnp.complex64), g, nu=0.1, t1=0.1)


def test_cole_hopf_integer_points_and_num(x64):
    """Integer points gave NaN in 2-D (the quadrature nodes took the points' integer dtype); num=1 gave -inf."""
    t, nu = 0.5, 0.1  # L = |y|^2 / 2: u = |x|^2 / (2 (1 + t)) + d nu log(1 + t)
    u = cole_hopf(lambda z: 0.5 * (z[0] ** 2 + z[1] ** 2), jnp.asarray([[0, 1], [1, 0]]), t, nu, ndim=2, num=61)
    assert np.allclose(np.asarray(u), 1 / (2 * (1 + t)) + 2 * nu * np.log(1 + t), atol=1e-8)
    u1 = cole_hopf(lambda y: 0.5 * y * y, jnp.asarray([0, 1]), t, nu)
    assert np.allclose(np.asarray(u1), np.asarray([0.0, 1.0]) / (2 * (1 + t)) + nu * np.log(1 + t), atol=1e-8)
    for num in (1, 2, 10.5):
        with pytest.raises(ValueError, match="num="):
            cole_hopf(lambda y: 0.5 * y * y, jnp.asarray([0.0]), t, nu, num=num)


def test_slice_flow_under_jit(x64):
    """slice_flow sized its margin with jnp.ceil, a tracer under jax.jit: any jitted caller crashed."""
    w, d = jnp.asarray([0.3, -0.2]), jnp.asarray([1.0, 0.0])

    def loss_fn(p):
        return 0.5 * jnp.sum(p**2)

    def run(eta, nu):
        return slice_flow(loss_fn, w, d, extent=1.0, n=11, eta=eta, k=3, nu=nu, dt=0.05).u

    u = jax.jit(run)(0.1, 0.05)
    a, t = np.linspace(-1.0, 1.0, 11), 0.3  # quadratic slice: u = 0.02 + (a + 0.3)^2 / (2 (1 + t)) + nu log(1 + t)
    assert np.allclose(np.asarray(u), 0.02 + (a + 0.3) ** 2 / (2 * (1 + t)) + 0.05 * np.log(1 + t), atol=1e-4)
    with pytest.raises(ValueError, match="extent=-1.0"):
        slice_flow(loss_fn, w, d, extent=-1.0, n=21, eta=0.1, k=3, nu=0.05)


@pytest.mark.parametrize("periodic", [True, False])
def test_find_shocks_on_grids_smaller_than_its_slots(periodic):
    """n = 4..7 points with the default 8 slots crashed in lax.top_k; a step down is found, other slots stay empty
    (an explicit threshold here; tests/test_hj_shocks.py checks the default one on small grids)."""
    for n in (4, 7):
        g = Grid(n, -1.0, 1.0, periodic=periodic)
        s = find_shocks(jnp.where(g.x < 0.2, 1.0, -1.0), g, window=1, min_steepness=0.5)
        assert s.location.shape == (8,) and 1 <= int(s.count) <= 2  # the step down (and the seam, if periodic)
        assert max(d["jump"] for d in s.to_list()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="window=0"):
        find_shocks(jnp.zeros(8), Grid(8, -1.0, 1.0), window=0)


def test_shock_time_of_a_nan_field_is_nan():
    """A NaN field (a diverged solve) was read as 'no compression': t* = inf.  Given as a value it is refused by
    name (as find_shocks and the solvers refuse it); traced (under jit, where it cannot be checked) t* is NaN."""
    g = Grid(32, -1.0, 1.0)
    field = jnp.where(g.x < 0, jnp.nan, -jnp.sin(jnp.pi * g.x))
    with pytest.raises(ValueError, match="p0 is not finite"):
        shock_time(field, g)
    assert np.isnan(float(jax.jit(lambda p: shock_time(p, g))(field)))
    assert np.isnan(float(shock_time_from_hessian(jnp.nan)))
    assert np.isinf(float(shock_time_from_hessian(2.0))) and float(shock_time_from_hessian(-2.0)) == 0.5


def test_forward_mode_through_a_solve_with_forward_mode_adjoint(x64):
    """``jax.jvp`` works with ``adjoint=diffrax.ForwardMode()`` (the documented forward-mode path) and matches a
    central difference in nu."""
    import diffrax as dfx

    g = Grid(32, 0.0, 2 * np.pi)
    p0 = jnp.sin(g.x)
    f = lambda nu: solve_burgers(p0, g, nu=nu, t1=0.3, adjoint=dfx.ForwardMode()).ps[-1]  # noqa: E731
    _, tangent = jax.jvp(f, (0.1,), (1.0,))
    fd = (f(0.1 + 1e-6) - f(0.1 - 1e-6)) / 2e-6
    assert float(jnp.max(jnp.abs(tangent - fd)) / jnp.max(jnp.abs(fd))) < 1e-6

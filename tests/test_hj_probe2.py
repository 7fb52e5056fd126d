"""HJ engine against exact references on cases the other test_hj files do not use (THEORY section 3)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (cole_hopf, cole_hopf_gradient, cole_hopf_monte_carlo, find_shocks, Grid, shock_time,
                             solve_burgers, slice_flow, solve_hj, Spectral)


def taylor_shock(x, nu, amplitude, speed, x0):
    """Taylor's travelling viscous shock, an exact solution of p_t + p p_x = nu p_xx: jump 2 A, speed s."""
    return speed - amplitude * jnp.tanh(amplitude * (x - x0) / (2 * nu))


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("n,length", [(201, 0.04), pytest.param(101, 0.04, marks=pytest.mark.slow),
                                      pytest.param(400, 0.04, marks=pytest.mark.slow),
                                      pytest.param(512, 0.01, marks=pytest.mark.slow),
                                      pytest.param(129, 0.08, marks=pytest.mark.slow)])
def test_find_shocks_states_of_a_resolved_taylor_shock(n, length, periodic):
    """The front's states are read beyond its width: the default window was max(4, n // 32) cells whatever the
    front's width, so a resolved front (a few cells per tanh length 2 nu / A) lost 5-10% of its jump and the
    Rankine-Hugoniot speed was 3-9% off (jump 1.79 and speed 0.298 for 2.0 and 0.3 at n = 201, speed 0.273 at
    n = 101).  Exact: jump 2 A, speed s, location x0, steepness A^2 / (2 nu).  On the periodic grid the profile
    jumps back up at the seam (an expansion, not a shock)."""
    g = Grid(n, -1.0, 1.0, periodic=periodic)
    find = eqx.filter_jit(find_shocks)
    for amplitude, speed, x0 in ((1.0, 0.3, 0.15), (0.5, -0.2, -0.31)):
        nu = length * amplitude / 2
        found = find(taylor_shock(g.x, nu, amplitude, speed, x0), g).to_list()
        assert len(found) == 1, (n, nu, found)
        (sh,) = found
        assert sh["jump"] == pytest.approx(2 * amplitude, rel=2e-3), (n, nu, sh)
        assert sh["speed"] == pytest.approx(speed, abs=2e-3 * amplitude), (n, nu, sh)
        assert sh["location"] == pytest.approx(x0, abs=0.1 * min(g.dx, length))
        if length >= 5 * g.dx:  # resolved: the fourth-order derivative at the peak (2% at 4 cells per tanh length)
            assert sh["steepness"] == pytest.approx(amplitude / length, rel=1e-2)


def numpy_cole_hopf_gradient(loss, x, t, nu, half_width=12.0, num=8001):
    """p(x, t) = E_w[(x - y) / t], w(y) ~ exp(-(x - y)^2 / (4 nu t) - L(y) / (2 nu)), by a plain NumPy quadrature
    (compiling cole_hopf_gradient would dominate a quick test)."""
    x = np.asarray(x, np.float64)[:, None]
    y = x + np.linspace(-half_width, half_width, num)[None, :]
    logw = -((x - y) ** 2) / (4 * nu * t) - loss(y) / (2 * nu)
    w = np.exp(logw - logw.max(axis=1, keepdims=True))
    return np.sum(w * (x - y), axis=1) / (t * np.sum(w, axis=1))


@pytest.mark.parametrize("t", [1.5, 4.0])
def test_find_shocks_speed_of_the_shifted_sine_shock(t):
    """p0 = c - sin(x) on [0, 2 pi): p - c is odd about the shock at x = c t, so its Rankine-Hugoniot speed is c
    exactly and its jump does not depend on the grid.  With the fixed default window the speed was 3% off
    (0.514, 0.489, 0.511 at n = 128, 256) and the jump moved with n."""
    c, nu = 0.5, 0.05
    find = eqx.filter_jit(find_shocks)
    jumps = []
    for n in (128, 256):
        g = Grid(n, 0.0, 2 * np.pi)
        p = numpy_cole_hopf_gradient(lambda y: c * y + np.cos(y), g.x, t, nu)
        (sh,) = find(jnp.asarray(p, jnp.float32), g).to_list()
        assert sh["location"] == pytest.approx(c * t, abs=0.05 * g.dx)
        assert sh["speed"] == pytest.approx(c, abs=1e-3)
        jumps.append(sh["jump"])
    assert jumps[0] == pytest.approx(jumps[1], rel=2e-3)


@pytest.mark.parametrize("arg", ["t", "nu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cole_hopf_refuses_non_finite_t_and_nu(arg, value):
    """A NaN or infinite t or nu made every value NaN, silently (the solvers refuse them naming the argument)."""
    loss = lambda y: jnp.cos(y)  # noqa: E731
    kw = {"t": 0.5, "nu": 0.1, arg: value}
    for f in (cole_hopf, cole_hopf_gradient):
        with pytest.raises(ValueError, match=f"{f.__name__}: {arg}={value} is not finite"):
            f(loss, jnp.asarray([0.0, 1.0]), kw["t"], kw["nu"])
    with pytest.raises(ValueError, match=f"cole_hopf_monte_carlo: {arg}={value} is not finite"):
        cole_hopf_monte_carlo(lambda v: jnp.sum(v * v), jnp.zeros(2), kw["t"], kw["nu"], key=jax.random.key(0))


def test_cole_hopf_traced_non_finite_nu_raises(x64):
    f = jax.jit(lambda nu: cole_hopf(lambda y: 0.5 * y * y, jnp.asarray([1.0]), 1.0, nu, num=201))
    assert float(f(0.1)[0]) == pytest.approx(0.25 + 0.1 * np.log(2.0), abs=1e-9)  # x^2 / (2 (1 + t)) + nu log(1 + t)
    with pytest.raises(Exception, match="t and nu must be finite"):
        jax.block_until_ready(f(jnp.nan))


@pytest.mark.parametrize("kw,match", [
    (dict(rtol=-1.0), r"rtol=-1.0 is not allowed; need a finite number >= 0"),
    (dict(atol=-1e-8), r"atol=-1e-08 is not allowed"),
    (dict(rtol=float("nan")), r"rtol=nan is not allowed"),
    (dict(rtol=0.0, atol=0.0), r"rtol=0 and atol=0 is not allowed"),
    (dict(max_steps=0), r"max_steps=0 is not allowed; need an integer >= 1"),
    (dict(max_steps=2.5), r"max_steps=2.5 is not allowed"),
])
def test_solve_refuses_bad_tolerances_and_step_budgets(kw, match):
    """rtol=-1 was accepted and every step taken at the largest growth (3 steps, 1e-3 off, on the problem below);
    rtol=atol=0 ran into max_steps; max_steps=0 failed inside diffrax ('Must have at least one checkpoint')."""
    g = Grid(16, -1.0, 1.0)
    for solve in (solve_burgers, solve_hj):
        with pytest.raises(ValueError, match=f"{solve.__name__}: {match}"):
            solve(-jnp.sin(jnp.pi * g.x), g, nu=0.1, t1=0.2, **kw)


def test_find_shocks_two_close_fronts():
    """Two Taylor fronts 4 and 6 tanh lengths apart: each one's states are read up to the valley of the steepness
    between them (the fixed window reached across: jumps 1.08 and 0.75 for 1.0 and 0.6 at 4 lengths)."""
    g = Grid(400, -1.0, 1.0, periodic=False)
    length = 0.02
    find = eqx.filter_jit(find_shocks)
    for gap in (4 * length, 6 * length):
        p = 0.1 - 0.5 * jnp.tanh((g.x + gap / 2) / length) - 0.3 * jnp.tanh((g.x - gap / 2) / length)
        found = sorted(find(p, g).to_list(), key=lambda d: d["location"])
        assert len(found) == 2
        for sh, x0, jump, speed in zip(found, (-gap / 2, gap / 2), (1.0, 0.6), (0.4, -0.4)):
            assert sh["location"] == pytest.approx(x0, abs=0.1 * g.dx)
            assert sh["jump"] == pytest.approx(jump, abs=2e-3)
            assert sh["speed"] == pytest.approx(speed, abs=2e-3)


def _quadratic_case(dtypes):
    a = {"w": jnp.linspace(0.5, 2.0, 6).reshape(2, 3), "b": jnp.asarray([0.3, 1.0])}
    th = {"w": jnp.sin(jnp.arange(6.0)).reshape(2, 3), "b": jnp.asarray([0.4, -1.0])}
    th = {k: v.astype(dtypes[k]) for k, v in th.items()}

    def loss_fn(p):
        return sum(jnp.sum(0.5 * a[k].astype(jnp.float32) * p[k].astype(jnp.float32) ** 2) for k in p)

    return a, th, loss_fn


@pytest.mark.parametrize("dtypes", [
    pytest.param({"w": jnp.float32, "b": jnp.float64}, id="f32-f64"),
    pytest.param({"w": jnp.float64, "b": jnp.float32}, id="f64-f32", marks=pytest.mark.slow),
    pytest.param({"w": jnp.bfloat16, "b": jnp.float32}, id="bf16-f32")])
def test_monte_carlo_on_params_of_mixed_dtypes(x64, dtypes):
    """Params mixing float32 and float64 leaves (a float64 bias beside float32 kernels) or bfloat16 ones failed
    under strict promotion (the weights were computed in the first leaf's dtype).  Exact for
    L = sum a th^2 / 2: u = sum a th^2 / (2 (1 + a t)) + nu log(1 + a t), p = a th / (1 + a t); each gradient
    leaf keeps its parameter's dtype."""
    a, th, loss_fn = _quadratic_case(dtypes)
    t, nu = 0.1, 0.5
    est = jax.jit(lambda p: cole_hopf_monte_carlo(loss_fn, p, t, nu, key=jax.random.key(1), num_samples=1024))(th)
    thf = {k: v.astype(jnp.float64) for k, v in th.items()}
    u = sum(float(jnp.sum(a[k] * thf[k] ** 2 / (2 * (1 + a[k] * t)) + nu * jnp.log1p(a[k] * t))) for k in a)
    slack = 2e-2 if jnp.bfloat16 in dtypes.values() else 1e-4  # bfloat16 sample points are rounded to 3 digits
    assert abs(float(est.value) - u) < 5 * float(est.value_std) + slack
    for k in a:
        assert est.grad[k].dtype == th[k].dtype and est.grad_std[k].dtype == th[k].dtype
        err = jnp.abs(est.grad[k].astype(jnp.float64) - a[k] * thf[k] / (1 + a[k] * t))
        assert float(jnp.max(err - 5 * est.grad_std[k].astype(jnp.float64))) < slack


def test_cole_hopf_half_precision_points_and_a_loss_of_another_dtype(x64):
    """bfloat16 / float16 points ran the quadrature in half precision (u 1e-3 off) and a loss computing in another
    dtype than the points (float32 at bfloat16 points, float64 at float32 points) failed under strict promotion.
    Exact for L = y^2 / 2: u = x^2 / (2 (1 + t)) + nu log(1 + t)."""
    t, nu = 0.5, 0.1
    x = jnp.asarray([-1.0, 0.25, 0.5], jnp.float32)
    exact = np.asarray(x, np.float64) ** 2 / (2 * (1 + t)) + nu * np.log1p(t)
    f = jax.jit(lambda x, loss: cole_hopf(loss, x, t, nu, num=401), static_argnums=1)
    cases = ((jnp.bfloat16, lambda y: 0.5 * y.astype(jnp.float32) ** 2),
             (jnp.float16, lambda y: 0.5 * y * y),
             (jnp.float32, lambda y: 0.5 * y.astype(jnp.float64) ** 2))
    for dtype, loss in cases:
        u = f(x.astype(dtype), loss)
        assert u.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(u, np.float64), exact, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dealias", [0.0, -1.0, float("nan"), 1.5, "2/3"])
def test_spectral_refuses_a_dealias_fraction_outside_0_1(dealias):
    """dealias <= 0 (or NaN) kept no mode in the products: the solve ran the heat equation without a word."""
    with pytest.raises(ValueError, match=r"Spectral\(dealias=.*\) is not allowed; need a number in \(0, 1\]"):
        Spectral(dealias=dealias)
    assert Spectral(dealias=1.0).dealias == 1.0 and Spectral().dealias == pytest.approx(2 / 3)


@pytest.mark.parametrize("arg,value", [("eta", -0.1), ("k", -3), ("nu", -0.05), ("eta", float("nan")),
                                       ("nu", float("inf"))])
def test_slice_flow_names_a_bad_eta_k_or_nu(arg, value):
    """A negative eta or k was reported as 'solve_hj: t1=-0.30000001192092896 is not allowed', naming neither."""
    kw = {"eta": 0.1, "k": 3, "nu": 0.05, arg: value}
    with pytest.raises(ValueError, match=f"slice_flow: {arg}={value!r} is not allowed; need a finite number >= 0"):
        slice_flow(lambda p: 0.5 * jnp.sum(p**2), jnp.asarray([0.3, -0.2]), jnp.asarray([1.0, 0.0]), extent=1.0, n=11,
                   dt=0.05, **kw)


def test_solve_names_the_initial_field_of_a_wrong_shape():
    """The shape error said 'initial field', not the argument (p0 / u0)."""
    g = Grid(8, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"solve_burgers: p0 has shape \(5,\); on this grid it must be \(8,\)\."):
        solve_burgers(jnp.zeros(5), g, nu=0.1, t1=0.1)
    with pytest.raises(ValueError, match=r"solve_hj: u0 has shape \(2, 8, 8\); on this grid it must be \(8, 8\) "
                                         r"\(a value field \(nx, ny\) on a 2-D grid\)"):
        solve_hj(jnp.zeros((2, 8, 8)), g * g, nu=0.1, t1=0.1)
    with pytest.raises(ValueError, match=r"solve_burgers: p0 has shape \(8, 8\); .* \(2, 8, 8\) \(a gradient field"):
        solve_burgers(jnp.zeros((8, 8)), g * g, nu=0.1, t1=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_find_shocks_refuses_a_non_finite_field(bad):
    """A NaN field (a diverged solve) was reported as having no shocks: every comparison with NaN is False."""
    g = Grid(64, -1.0, 1.0)
    p = jnp.where(g.x < 0.0, 1.0, -1.0).at[40].set(bad)
    with pytest.raises(ValueError, match=r"find_shocks: p is not finite \(1 NaN or infinite entries, the first at "
                                         r"index 40\)"):
        find_shocks(p, g)
    s = find_shocks(jnp.where(g.x < 0.0, 1.0, -1.0), g)  # the same front, finite, is found
    assert int(s.valid.sum()) >= 1


def _slice_case():
    x = jnp.linspace(-1.0, 1.0, 16)
    loss = lambda p: jnp.mean(jnp.tanh(x * p["w"]) ** 2)  # noqa: E731
    return loss, {"w": jnp.asarray(0.7)}, {"w": jnp.asarray(1.0)}, dict(extent=1.0, n=17, eta=0.1, k=3, nu=0.05)


def test_slice_flow_compiled_path_checks_a_known_array_tolerance():
    """slice_flow runs its array work as one compiled program; a known array tolerance is fixed in it as a number
    and still refused when out of range (solve_hj checks it as the program is traced)."""
    loss, p, d, kw = _slice_case()
    with pytest.raises(ValueError, match="rtol=-1.0 is not allowed"):
        slice_flow(loss, p, d, rtol=jnp.asarray(-1.0), **kw)


def test_slice_flow_compiles_for_nnx_state_parameters(monkeypatch):
    """Parameters held in an ``nnx.State`` (unhashable) took the op-by-op path: the cache key hashed every
    non-array argument, parameters included.  Only the static arguments key it now."""
    from flax import nnx

    import quotient_sgd.hj._slices as slices
    from quotient_sgd.models import MLP

    _, params = nnx.split(MLP(2, (3,), 1, rngs=nnx.Rngs(0)), nnx.Param)
    d = jax.tree.map(lambda a: jnp.zeros_like(a), params)
    d["layers"][0]["kernel"] = nnx.Param(jnp.ones((2, 3)) / np.sqrt(6.0))

    def op_by_op(*args):
        raise AssertionError("slice_flow ran op by op")

    monkeypatch.setattr(slices, "_flow", op_by_op)  # the compiled program traces the original
    with pytest.raises(ValueError, match="rtol=-1.0 is not allowed"):  # raised as the compiled program traces
        slice_flow(lambda p: sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(p)), params, d, extent=1.0,
                   n=17, eta=0.1, k=3, nu=0.05, rtol=jnp.asarray(-1.0))


@pytest.mark.slow
def test_slice_flow_op_by_op_for_an_unhashable_loss_gives_the_same_slice():
    """An unhashable loss_fn cannot key the compiled program's cache: it runs op by op, to the same slice."""
    loss, p, d, kw = _slice_case()

    class Unhashable:
        __hash__ = None

        def __call__(self, q):
            return loss(q)

    a, b = slice_flow(loss, p, d, **kw), slice_flow(Unhashable(), p, d, **kw)
    for f in ("loss", "u", "p", "t", "reach"):
        ref = getattr(a, f)
        np.testing.assert_allclose(getattr(b, f), ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))),
                                   err_msg=f)


def test_bounded_grid_shock_time_is_fourth_order_at_an_end(x64):
    """The steepest descent of p0 = -sin(x) on the bounded grid [0, 1] is at the left end (p0'(0) = -1, t* = 1).
    The end nodes used second-order one-sided stencils, so shock_time converged at second order there (error
    ratio ~4 per halving of dx); the five-point stencils make it fourth order (ratio ~16), like the interior.
    Float64."""
    errs = []
    for n in (17, 33, 65):
        g = Grid(n, 0.0, 1.0, periodic=False)
        errs.append(abs(float(shock_time(-jnp.sin(jnp.asarray(g.x, jnp.float64)), g)) - 1.0))
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(orders > 3.5), (errs, orders)


def test_find_shocks_refuses_a_non_finite_field_under_jit():
    """Under jit a NaN field reported "no shocks" (every comparison with NaN is False); now the compiled check
    raises when the computation runs, while a finite field still gives its shock."""
    g = Grid(64, -1.0, 1.0)
    p = -jnp.tanh(g.x / 0.05)
    find = jax.jit(lambda q: find_shocks(q, g).valid)
    assert bool(find(p)[0])
    with pytest.raises(Exception, match="find_shocks: p is not finite"):
        jax.block_until_ready(find(p.at[7].set(jnp.nan)))

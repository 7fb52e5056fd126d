"""Cole-Hopf references (2-D quadrature, Monte Carlo) and loss slices (THEORY section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (
    cole_hopf,
    cole_hopf_gradient,
    cole_hopf_monte_carlo,
    Grid,
    slice_flow,
    solve_burgers,
    solve_hj,
)


def test_2d_solvers_match_2d_quadrature(x64):
    g = Grid(24, -1.0, 1.0) * Grid(24, -1.0, 1.0)
    nu, t1 = 0.1, 0.2

    def loss(y):
        return jnp.cos(jnp.pi * y[0]) * jnp.cos(jnp.pi * y[1]) / jnp.pi**2

    x, y = g.x
    u0 = jnp.cos(jnp.pi * x) * jnp.cos(jnp.pi * y) / jnp.pi**2
    u_ref = cole_hopf(loss, g.x, t1, nu, ndim=2, num=61)
    p_ref = cole_hopf_gradient(loss, g.x, t1, nu, ndim=2, num=61)
    u = solve_hj(u0, g, nu=nu, t1=t1, rtol=1e-9, atol=1e-11).us[-1]
    p0 = jnp.stack([-jnp.sin(jnp.pi * x) * jnp.cos(jnp.pi * y), -jnp.cos(jnp.pi * x) * jnp.sin(jnp.pi * y)]) / jnp.pi
    p = solve_burgers(p0, g, nu=nu, t1=t1, rtol=1e-9, atol=1e-11).ps[-1]
    assert float(jnp.max(jnp.abs(u - u_ref))) < 1e-6
    assert float(jnp.max(jnp.abs(p - p_ref))) < 1e-6
    p_fv = solve_burgers(p0, g, nu=nu, t1=t1, scheme="fv", rtol=1e-9, atol=1e-11).ps[-1]
    assert float(jnp.max(jnp.abs(p_fv - p_ref))) < 2e-2


def test_monte_carlo_matches_exact_quadratic(getkey):
    # L = sum_i a_i th_i^2 / 2: u = sum_i a_i th_i^2 / (2 (1 + a_i t)) + nu log(1 + a_i t), p_i = a_i th_i/(1 + a_i t)
    a = {"w": jnp.linspace(0.5, 2.0, 20).reshape(4, 5), "b": jnp.linspace(0.1, 1.0, 3)}
    th = {"w": jnp.sin(jnp.arange(20.0)).reshape(4, 5), "b": jnp.array([0.3, -1.0, 0.5])}

    def loss_fn(p):
        return sum(jnp.sum(0.5 * a[k] * p[k] ** 2) for k in p)

    t, nu = 0.1, 0.5  # small nu in high dimension collapses the weights (ess -> 1): see MonteCarloEstimate
    est = cole_hopf_monte_carlo(loss_fn, th, t, nu, key=getkey(), num_samples=2048)
    u_exact = sum(jnp.sum(a[k] * th[k] ** 2 / (2 * (1 + a[k] * t)) + nu * jnp.log1p(a[k] * t)) for k in a)
    assert abs(float(est.value - u_exact)) < 5 * float(est.value_std) + 1e-4
    for k in a:
        z = (est.grad[k] - a[k] * th[k] / (1 + a[k] * t)) / (est.grad_std[k] + 1e-6)
        assert float(jnp.max(jnp.abs(z))) < 5
    assert 10.0 < float(est.ess) <= 2048


def test_monte_carlo_matches_1d_quadrature(getkey):
    def loss(y):
        return jnp.cos(jnp.pi * y) / jnp.pi

    est = cole_hopf_monte_carlo(lambda v: loss(v[0]), jnp.array([0.2]), 0.2, 0.05, key=getkey(), num_samples=2048)
    u = float(cole_hopf(loss, jnp.array(0.2), 0.2, 0.05))
    p = float(cole_hopf_gradient(loss, jnp.array(0.2), 0.2, 0.05))
    assert abs(float(est.value) - u) < 5 * float(est.value_std) + 1e-5
    assert abs(float(est.grad[0]) - p) < 5 * float(est.grad_std[0]) + 1e-5


def _toy():
    d = {"w": jnp.array([0.6, 0.8, 0.0]), "b": jnp.zeros(())}
    centre = {"w": jnp.array([0.0, 0.0, 0.5]), "b": jnp.asarray(0.1)}

    def loss_fn(p):  # along d this is cos(pi a)/pi + const: a shock forms at a = 0 after t* = 1/pi
        return jnp.cos(jnp.pi * jnp.dot(p["w"], d["w"])) / jnp.pi + p["b"] ** 2 + 0.1 * p["w"][2] ** 2

    return loss_fn, centre, d


def test_slice_flow_shock_and_cole_hopf(x64):
    loss_fn, centre, d = _toy()
    # one jitted program: run op by op, slice_flow's solve, derivatives and shock search dispatched ~160 small ops
    res = jax.jit(lambda: slice_flow(loss_fn, centre, d, extent=0.8, n=161, eta=0.01, k=45, nu=2e-3, margin=1.0))()
    assert bool(res.boundary_ok)
    const = 0.1**2 + 0.1 * 0.25
    ref = cole_hopf(lambda y: jnp.cos(jnp.pi * y) / jnp.pi + const, res.grid.x, 0.45, 2e-3)
    assert float(jnp.max(jnp.abs(res.u - ref))) < 5e-3
    shocks = res.shocks.to_list()
    assert len(shocks) == 1 and abs(shocks[0]["location"]) < 0.02 and shocks[0]["admissible"]
    assert float(res.shock_time) == pytest.approx(1 / np.pi, rel=1e-2)


def test_slice_flow_differentiable_in_eta_and_nu(x64):
    loss_fn, centre, d = _toy()

    def obs(eta, nu):
        r = slice_flow(loss_fn, centre, d, extent=0.8, n=41, eta=eta, k=20, nu=nu, margin=1.0, rtol=1e-10, atol=1e-12)
        return jnp.sum(r.u * jnp.linspace(0.0, 1.0, 41))

    # jitted: the gradient and the four finite-difference evaluations share one compiled program (eta and nu are
    # traced; the differences read its value)
    value_and_grad = jax.jit(jax.value_and_grad(obs, argnums=(0, 1)))
    ge, gn = value_and_grad(0.01, 0.02)[1]
    obs = lambda eta, nu: value_and_grad(eta, nu)[0]  # noqa: E731
    fe = (obs(0.01 + 1e-4, 0.02) - obs(0.01 - 1e-4, 0.02)) / 2e-4
    fn = (obs(0.01, 0.02 + 1e-4) - obs(0.01, 0.02 - 1e-4)) / 2e-4
    assert float(ge) == pytest.approx(float(fe), rel=1e-4)
    assert float(gn) == pytest.approx(float(fn), rel=1e-4)


def test_cole_hopf_refuses_non_positive_t_and_nu():
    loss = lambda y: jnp.cos(jnp.pi * y) / jnp.pi  # noqa: E731
    x = jnp.linspace(-1.0, 1.0, 5)
    for f in (cole_hopf, cole_hopf_gradient):
        with pytest.raises(ValueError, match=r"nu=-0.01 is not allowed; need nu > 0"):
            f(loss, x, 0.3, -0.01)
        with pytest.raises(ValueError, match=r"t=0.0 is not allowed; need t > 0"):
            f(loss, x, 0.0, 0.01)
    with pytest.raises(ValueError, match=r"cole_hopf_monte_carlo: nu=0.0"):
        cole_hopf_monte_carlo(lambda v: loss(v[0]), jnp.array([0.2]), 0.2, 0.0, key=jax.random.key(0))
    # traced values cannot be checked here and pass through (grad with respect to nu still works)
    d = jax.grad(lambda nu: cole_hopf(loss, jnp.array(0.2), 0.3, nu, num=801))(0.05)
    assert bool(jnp.isfinite(d))


def test_monte_carlo_standard_errors_count_antithetic_pairs_once():
    """At the minimum of an even loss the two samples of an antithetic pair are equal: the gradient estimate is
    exactly 0 for every key (its standard error must be ~0, it was reported as ~0.16) and the value has the
    error of m / 2 draws, not m (reported sqrt(2) too small)."""
    est = jax.jit(jax.vmap(lambda k: cole_hopf_monte_carlo(lambda p: 2 * jnp.sum(p**2), jnp.zeros(3), 0.5, 0.2,
                                                             key=k, num_samples=64)))(
        jax.random.split(jax.random.key(0), 400))
    # keys whose effective sample size is below MC_MIN_ESS (9 of 400 here) report inf: compare the others
    ok = np.asarray(est.reliable)
    assert ok.mean() > 0.95 and np.all(np.isinf(np.asarray(est.value_std)[~ok]))
    assert float(jnp.max(jnp.abs(est.grad))) < 1e-6 and float(jnp.max(est.grad_std[ok])) < 1e-6
    assert float(jnp.mean(est.value_std[ok])) == pytest.approx(float(jnp.std(est.value[ok])), rel=0.15)
    with pytest.raises(ValueError, match=r"num_samples=7 is not allowed; need an even number >= 4"):
        cole_hopf_monte_carlo(lambda p: jnp.sum(p**2), jnp.zeros(3), 0.5, 0.2, key=jax.random.key(0), num_samples=7)


def test_cole_hopf_window_holds_steep_losses(x64):
    """The window used to assume |grad L| <= lipschitz = 1 and cut the weight of steeper losses silently (u off
    by O(1) at slope 8). Exact references: L = y^2/2 at slopes 5..10 gives u = x^2 / (2 (1 + t)) + nu log(1 + t),
    p = x / (1 + t); L = 8 y gives u = 8 x - 32 t, p = 8."""
    t, nu = 2.0, 0.05
    x = jnp.linspace(5.0, 10.0, 6)
    quad = lambda y: 0.5 * y * y  # noqa: E731
    u, p = cole_hopf(quad, x, t, nu), cole_hopf_gradient(quad, x, t, nu)
    assert np.allclose(np.asarray(u), np.asarray(x**2 / (2 * (1 + t)) + nu * np.log1p(t)), rtol=0, atol=1e-10)
    assert np.allclose(np.asarray(p), np.asarray(x / (1 + t)), rtol=0, atol=1e-10)
    xs = jnp.linspace(-1.0, 1.0, 3)
    assert np.allclose(np.asarray(cole_hopf(lambda y: 8.0 * y, xs, 0.5, 0.01)), np.asarray(8 * xs - 16), atol=1e-10)
    # a given bound that is false is refused, naming it and the bound whose window holds the weight
    with pytest.raises(ValueError, match=r"lipschitz=1.0 is too small .* needs lipschitz=8"):
        cole_hopf(lambda y: 8.0 * y, xs, 0.5, 0.01, lipschitz=1.0)
    assert np.allclose(np.asarray(cole_hopf(lambda y: 8.0 * y, xs, 0.5, 0.01, lipschitz=8.0)), np.asarray(8 * xs - 16),
                       atol=1e-10)
    with pytest.raises(ValueError, match="lipschitz=-1"):
        cole_hopf(quad, x, t, nu, lipschitz=-1)


def test_cole_hopf_steep_window_under_jit_grad_vmap_and_2d(x64):
    t, nu = 1.0, 0.1
    quad = lambda y: 0.5 * y * y  # noqa: E731
    # L = y^2/2 at slopes 6 and 8 (windows searched under jit, vmap and grad): u = x^2 / (2 (1 + t)) + nu log(1 + t),
    # du/dx = p = x / (1 + t), du/dnu = log(1 + t)
    f = jax.value_and_grad(lambda x, nu: cole_hopf(quad, x, t, nu), argnums=(0, 1))
    u, (p, d) = jax.jit(jax.vmap(f, in_axes=(0, None)))(jnp.array([-8.0, 6.0]), nu)
    assert np.allclose(np.asarray(u), np.array([16.0, 9.0]) + nu * np.log1p(t), atol=1e-9)
    assert np.allclose(np.asarray(p), [-4.0, 3.0], atol=1e-9)
    assert np.allclose(np.asarray(d), np.log1p(t), atol=1e-9)
    with pytest.raises(Exception, match="lipschitz"):  # traced: equinox.error_if at run time
        jax.jit(lambda x: cole_hopf(quad, x, t, nu, lipschitz=1.0))(jnp.array([8.0])).block_until_ready()
    x2 = jnp.array([[6.0], [-5.0]])  # 2-D, L = |y|^2 / 2: u = |x|^2 / (2 (1 + t)) + 2 nu log(1 + t)
    u2 = cole_hopf(lambda z: 0.5 * (z[0] ** 2 + z[1] ** 2), x2, t, nu, ndim=2, num=121)
    assert float(u2[0]) == pytest.approx(61.0 / 4 + 2 * nu * np.log1p(t), abs=1e-9)
    with pytest.raises(ValueError, match="num=201 is too coarse"):
        cole_hopf(quad, jnp.array([1.0]), 1.0, 1e-6, num=201)

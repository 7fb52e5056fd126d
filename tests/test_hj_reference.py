"""The HJ / Burgers engine against reference problems of the literature, with references computed here
independently of the package (NumPy / SciPy in float64): THEORY section 3.

Conventions: THEORY's Burgers form ``p_t + p p_x = nu p_xx`` is the classical viscous Burgers equation with u = p;
the value form ``u_t + u_x^2 / 2 = nu u_xx`` has ``p = u_x``; Cole-Hopf: ``p = -2 nu phi_x / phi``, ``u = -2 nu log
phi`` for any positive solution ``phi`` of the heat equation ``phi_t = nu phi_xx``.  Closed forms built from such
``phi`` (no quadrature) are exact references on periodic grids (trigonometric ``phi``) and on bounded ones
(exponential ``phi``: Taylor's viscous shock, which moves with any added constant by Galilean invariance).

Basdevant et al., Computers & Fluids 14 (1986): ``u0 = -sin(pi x)`` on [-1, 1], ``nu = 0.01 / pi``, ``u(+-1, t) =
0``.  The solution stays odd, so the Dirichlet problem is the periodic one the engine solves.  Their Cole-Hopf value
by Hermite quadrature: the steepest slope ``max |u_x| = 152.00516`` at ``x = 0``, ``t = 1.6037 / pi``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, roots_hermite

from quotient_sgd.hj import (
    cole_hopf,
    cole_hopf_gradient,
    find_shocks,
    Grid,
    shock_time,
    solve_burgers,
    solve_hj,
    Spectral,
)

NU = 0.01 / np.pi
T_PUBLISHED = 1.6037 / np.pi
SLOPE_PUBLISHED = 152.00516  # |u_x(0, t)| at its maximum over t, 8 digits (rounded to 5e-6)
_HERMITE = roots_hermite(200)  # measured: 100, 200, 400 and 800 nodes agree to 1e-14 relative on the slope


def _hermite_weights(y, t, nu, amp):
    """Normalised Cole-Hopf weights at the nodes ``y = x - sqrt(4 nu t) z`` for the loss ``amp cos(pi y) / pi``
    (``p0 = -amp sin(pi x)``): Gauss-Hermite in the Gaussian variable, as in Basdevant et al."""
    logw = np.log(_HERMITE[1]) - amp * np.cos(np.pi * y) / (2 * np.pi * nu)
    return np.exp(logw - logsumexp(logw, axis=-1, keepdims=True))


def sine_profile(x, t, nu=NU, amp=1.0):
    """p(x, t) from ``p0 = -amp sin(pi x)``: ``E_w[p0(y)]`` under the Cole-Hopf weight."""
    y = np.asarray(x, np.float64)[..., None] - np.sqrt(4 * nu * t) * _HERMITE[0]
    return np.sum(_hermite_weights(y, t, nu, amp) * (-amp * np.sin(np.pi * y)), axis=-1)


def sine_slope_at_0(t, nu=NU, amp=1.0):
    """p_x(0, t) from ``p0 = -amp sin(pi x)``: with f = exp(-amp cos(pi y) / (2 pi nu)) even and
    ``p = -E[amp sin(pi y) f] / E[f]`` (Gaussian expectations), ``p(0) = 0`` and
    ``p_x(0) = -E_w[amp pi cos(pi y) + amp^2 sin(pi y)^2 / (2 nu)]``."""
    y = np.sqrt(4 * nu * t) * _HERMITE[0]
    w = _hermite_weights(y, t, nu, amp)
    return -np.sum(w * (amp * np.pi * np.cos(np.pi * y) + amp**2 * np.sin(np.pi * y) ** 2 / (2 * nu)))


def central(f, v, h):
    return (f(v + h) - f(v - h)) / (2 * h)


def sine_loss(amp=1.0):
    return lambda y: amp * jnp.cos(jnp.pi * y) / jnp.pi


def heat_front(x, t, nu, *, a1=0.9, speed=0.0):
    """Exact periodic solution from ``phi = 1 + a1 cos(pi xi) exp(-nu pi^2 t)``, ``xi = x - speed t`` (0 < a1 < 1;
    a front at xi = 0 that steepens as a1 -> 1), boosted by ``speed`` (Galilean invariance: ``p -> p + speed``,
    ``u -> u + speed x - speed^2 t / 2``).  Returns ``(p, u)``."""
    x = np.asarray(x, np.float64)
    xi = x - speed * t
    e = a1 * np.exp(-nu * np.pi**2 * t)
    phi = 1 + e * np.cos(np.pi * xi)
    p = speed + 2 * nu * np.pi * e * np.sin(np.pi * xi) / phi
    u = -2 * nu * np.log(phi) + speed * x - 0.5 * speed**2 * t
    return p, u


def taylor(x, t, nu, *, jump=2.0, speed=0.0):
    """Taylor's viscous shock ``p = speed - U tanh(U (x - speed t) / (2 nu))``, ``U = jump / 2`` (``phi =
    cosh(U (x - speed t) / (2 nu)) ...``): steady for ``speed = 0``, else moving at the Rankine-Hugoniot speed."""
    half = jump / 2
    return speed - half * np.tanh(half * (np.asarray(x, np.float64) - speed * t) / (2 * nu))


# -- Basdevant et al. (1986) -----------------------------------------------------------------------------------


def test_published_basdevant_slope_is_the_maximum_of_the_independent_cole_hopf_integral():
    # the published digits, checked against the Cole-Hopf integral computed here (NumPy / SciPy, float64)
    res = minimize_scalar(sine_slope_at_0, bracket=(0.45, 0.51, 0.56), tol=1e-12)
    assert abs(-res.fun - SLOPE_PUBLISHED) < 5e-6  # measured 152.0051616
    assert abs(res.x * np.pi - 1.6037) < 5e-5  # measured t = 1.603688 / pi
    assert abs(sine_slope_at_0(T_PUBLISHED) + SLOPE_PUBLISHED) < 5e-6
    # at the inviscid breaking time 1 / pi the front is not yet at its steepest
    assert -35 < sine_slope_at_0(1 / np.pi) < -34
    # the slope at x = 0 is the steepest of the profile (the solution is odd about 0)
    x = np.linspace(-1, 1, 2001)
    p = sine_profile(x, T_PUBLISHED)
    assert np.max(np.abs(p + sine_profile(-x, T_PUBLISHED))) < 1e-12
    assert np.max(-np.diff(p) / np.diff(x)) < SLOPE_PUBLISHED


def test_package_cole_hopf_reproduces_the_basdevant_solution_and_its_derivatives(x64):
    g = Grid(64, -1.0, 1.0)
    p = cole_hopf_gradient(sine_loss(), g.x, T_PUBLISHED, NU)
    assert float(jnp.max(jnp.abs(p - sine_profile(np.asarray(g.x), T_PUBLISHED)))) < 1e-11

    def slope(nu, amp):
        return jax.grad(lambda x: cole_hopf_gradient(sine_loss(amp), x, T_PUBLISHED, nu))(0.0)

    # the steepest slope and its derivatives with respect to nu and to the amplitude of p0 (jax.grad through the
    # package's quadrature) against central differences of the independent integral: measured -1.4e4 and -296
    value, (d_nu, d_amp) = jax.value_and_grad(slope, (0, 1))(NU, 1.0)
    assert float(value) == pytest.approx(-SLOPE_PUBLISHED, abs=5e-6)
    assert float(d_nu) == pytest.approx(central(lambda v: sine_slope_at_0(T_PUBLISHED, v), NU, 1e-6 * NU), rel=1e-6)
    assert float(d_amp) == pytest.approx(central(lambda a: sine_slope_at_0(T_PUBLISHED, amp=a), 1.0, 1e-6), rel=1e-6)


def test_basdevant_shock_diagnostics_put_the_front_at_0_and_breaking_at_1_over_pi(x64):
    g = Grid(256, -1.0, 1.0)
    assert float(shock_time(-jnp.sin(jnp.pi * g.x), g)) == pytest.approx(1 / np.pi, rel=1e-7)
    # the front of the exact profile, at the breaking time and at the published time of steepest slope
    for t in (1 / np.pi, T_PUBLISHED):
        shocks = find_shocks(jnp.asarray(sine_profile(np.asarray(g.x), t)), g).to_list()
        assert len(shocks) == 1
        s = shocks[0]
        top = float(np.max(sine_profile(np.linspace(-1, 0, 4001), t)))  # the largest state left of the front
        assert abs(s["location"]) < 1e-9 and abs(s["speed"]) < 1e-9 and s["admissible"]
        assert s["left"] == pytest.approx(-s["right"], abs=1e-9) and 0.9 * top < s["left"] <= top
        print(f"t = {t:.6f}: front state {s['left']:.6f}, largest state {top:.6f}")


@pytest.mark.slow
@pytest.mark.parametrize("n, scheme, rel", [(2048, "spectral", 3e-8), (4096, "fv", 2e-3)])
def test_solvers_reproduce_the_basdevant_slope(x64, n, scheme, rel):
    # measured against the independent 152.0051616: spectral N = 2048 6e-9 (slope by spectral derivative; 1.6e-4
    # at N = 1024), finite volumes (minmod) N = 4096 1.5e-3 (slope by central difference at 0; 6.2e-3 at N = 2048);
    # profile errors 3.8e-10 and 9.3e-4
    g = Grid(n, -1.0, 1.0)
    p = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=NU, t1=T_PUBLISHED, scheme=scheme, rtol=1e-10, atol=1e-13,
                      max_steps=60000).ps[-1]
    exact = sine_slope_at_0(T_PUBLISHED)
    if scheme == "spectral":
        slope = float(Spectral().derivative(g, p)[n // 2])
    else:
        slope = float(p[n // 2 + 1] - p[n // 2 - 1]) / (2 * g.dx)
    assert slope == pytest.approx(exact, rel=rel)
    assert float(jnp.max(jnp.abs(p - sine_profile(np.asarray(g.x), T_PUBLISHED)))) < (1e-9 if rel < 1e-6 else 1e-2)
    s = find_shocks(p, g).to_list()
    assert len(s) == 1 and abs(s[0]["location"]) < 1e-9


# -- closed forms ---------------------------------------------------------------------------------------------


def test_etdrk4_is_fourth_order_in_time_on_a_travelling_periodic_front(x64):
    # fixed ETDRK4 steps on 64 points: the spatial error (measured 3e-9) is below the time errors, measured
    # 3.1e-4, 2.0e-5, 1.2e-6, 8.1e-8 at dt = t1 / 8 .. t1 / 64: orders 3.96, 3.99, 3.95
    nu, t1, speed = 0.05, 0.5, 0.7
    g = Grid(64, -1.0, 1.0)
    x = np.asarray(g.x)
    p0, _ = heat_front(x, 0.0, nu, speed=speed)
    ref = heat_front(x, t1, nu, speed=speed)[0]
    # a traced step: one compilation for all of them (a known one sets the checkpoints to its step count)
    solve = jax.jit(lambda dt: solve_burgers(jnp.asarray(p0), g, nu=nu, t1=t1, dt=dt, max_steps=64).ps[-1])
    errs = np.array([float(jnp.max(jnp.abs(solve(t1 / k) - ref))) for k in (8, 16, 32, 64)])
    orders = -np.diff(np.log2(errs))
    print(f"\nETDRK4 errors {errs}, orders {np.round(orders, 2)}")
    assert errs[-1] < 2e-7
    assert np.all(orders > 3.7)


def test_taylor_shock_is_steady_and_a_boosted_one_moves_at_its_rankine_hugoniot_speed(x64):
    nu, t1 = 0.02, 0.5
    # the closed form solves the equation: its residual u_t + u u_x - nu u_xx vanishes (central differences,
    # h = 1e-4: truncation ~1e-6 against terms of size 1 / (4 nu) = 12.5)
    x, h = np.linspace(-0.3, 0.3, 61), 1e-4
    for speed in (0.0, 0.3):
        def p(x, t):
            return taylor(x, t, nu, speed=speed)

        res = ((p(x, h) - p(x, -h)) / (2 * h) + p(x, 0) * (p(x + h, 0) - p(x - h, 0)) / (2 * h)
               - nu * (p(x + h, 0) - 2 * p(x, 0) + p(x - h, 0)) / h**2)
        assert np.max(np.abs(res)) < 1e-4
    # finite volumes on a bounded grid (the tanh tails are flat to 1e-10 at the ends); the front width 2 nu / U
    # spans 4 cells
    g = Grid(201, -1.0, 1.0, periodic=False)
    x = np.asarray(g.x)
    for speed, tol in ((0.0, 1.2e-2), (0.3, 1.5e-2)):  # measured 9.2e-3, 1.1e-2 (minmod)
        p = solve_burgers(jnp.asarray(taylor(x, 0.0, nu, speed=speed)), g, nu=nu, t1=t1, scheme="fv").ps[-1]
        assert float(jnp.max(jnp.abs(p - taylor(x, t1, nu, speed=speed)))) < tol
        s = find_shocks(p, g).to_list()
        assert len(s) == 1
        assert abs(s[0]["location"] - speed * t1) < 0.25 * g.dx  # measured 8e-4 (dx = 1e-2)
        assert s[0]["speed"] == pytest.approx(speed, abs=2e-3) and s[0]["jump"] == pytest.approx(2.0, abs=3e-3)
    # inviscid shock time -1 / min p0' = 2 nu / U^2 (measured 1.8e-3 off: the front spans 4 cells)
    assert float(shock_time(jnp.asarray(taylor(x, 0.0, nu)), g)) == pytest.approx(2 * nu, rel=3e-3)


def test_2d_cole_hopf_of_a_non_separable_heat_solution(x64):
    # phi = 1 + a cos(pi x) E + b cos(pi y) E + c cos(pi (x + y)) E^2, E = exp(-nu pi^2 t): u = -2 nu log phi exactly
    nu, t1 = 0.05, 0.5

    def phi(q, t):
        e = jnp.exp(-nu * jnp.pi**2 * t)
        return 1 + 0.4 * jnp.cos(jnp.pi * q[0]) * e + 0.3 * jnp.cos(jnp.pi * q[1]) * e + 0.2 * jnp.cos(
            jnp.pi * (q[0] + q[1])) * e * e

    pts = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, 5), jnp.linspace(-0.7, 0.9, 4), indexing="ij"))
    exact_u = -2 * nu * jnp.log(phi(pts, t1))
    exact_p = jax.vmap(jax.vmap(jax.grad(lambda q: -2 * nu * jnp.log(phi(q, t1))), 1, 1), 2, 2)(pts)
    loss = jax.jit(lambda q: -2 * nu * jnp.log(phi(q, 0.0)))
    assert float(jnp.max(jnp.abs(cole_hopf(loss, pts, t1, nu, ndim=2, num=101) - exact_u))) < 1e-12
    assert float(jnp.max(jnp.abs(cole_hopf_gradient(loss, pts, t1, nu, ndim=2, num=101) - exact_p))) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("scheme, n, tol_u, tol_p", [("spectral", 32, 1e-9, 3e-8), ("fv", 64, 1e-4, 4e-4)])
def test_2d_solvers_on_a_non_separable_heat_solution(x64, scheme, n, tol_u, tol_p):
    # measured: spectral 32 x 32: 1.5e-10 (value), 5.3e-9 (gradient); fv 64 x 64: 2.7e-5, 1.1e-4
    nu, t1 = 0.05, 0.5
    g = Grid(n, -1.0, 1.0) * Grid(n, -1.0, 1.0)

    def value(q, t):
        e = jnp.exp(-nu * jnp.pi**2 * t)
        return -2 * nu * jnp.log(1 + 0.4 * jnp.cos(jnp.pi * q[0]) * e + 0.3 * jnp.cos(jnp.pi * q[1]) * e
                                 + 0.2 * jnp.cos(jnp.pi * (q[0] + q[1])) * e * e)

    def grad(t):
        return jax.vmap(jax.vmap(jax.grad(lambda q: value(q, t)), 1, 1), 2, 2)(g.x)

    u = solve_hj(value(g.x, 0.0), g, nu=nu, t1=t1, scheme=scheme, rtol=1e-9, atol=1e-11).us[-1]
    assert float(jnp.max(jnp.abs(u - value(g.x, t1)))) < tol_u
    p = solve_burgers(grad(0.0), g, nu=nu, t1=t1, scheme=scheme, rtol=1e-9, atol=1e-11).ps[-1]
    assert float(jnp.max(jnp.abs(p - grad(t1)))) < tol_p


# -- convergence orders claimed in the docstrings (spectral: exponential; finite volumes: second order) ------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:solve_burgers. the spectral solution is under-resolved on the 16 grid")
def test_spectral_converges_exponentially_on_a_travelling_periodic_front(x64):
    # measured: 3.7e-3, 5.3e-5, 3.2e-9 on 16, 32, 64 points (ratios 70, 1.7e4)
    nu, t1, speed = 0.05, 0.5, 0.7
    errs = []
    for n in (16, 32, 64):
        g = Grid(n, -1.0, 1.0)
        x = np.asarray(g.x)
        p = solve_burgers(jnp.asarray(heat_front(x, 0.0, nu, speed=speed)[0]), g, nu=nu, t1=t1, rtol=1e-11,
                          atol=1e-13).ps[-1]
        errs.append(float(jnp.max(jnp.abs(p - heat_front(x, t1, nu, speed=speed)[0]))))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert errs[-1] < 1e-8 and ratios[1] > 100 * ratios[0] > 1000  # each doubling gains more than the last


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fv", "fv-smooth"])
def test_finite_volumes_converge_at_second_order_on_closed_forms(x64, scheme):
    # measured (minmod / smooth): periodic front, Burgers 2.3e-3, 6.1e-4, 1.6e-4 / 1.8e-3, 3.8e-4, 8.1e-5 and value
    # form 3.9e-4, 1.1e-4, 2.9e-5 / 3.1e-4, 6.7e-5, 1.5e-5 on 64, 128, 256 points: orders 1.8-2.2
    nu, t1 = 0.05, 0.5
    errs = {"burgers": [], "hj": []}
    ns = (64, 128, 256)
    for n in ns:
        g = Grid(n, -1.0, 1.0)
        x = np.asarray(g.x)
        (p0, u0), (p1, u1) = heat_front(x, 0.0, nu), heat_front(x, t1, nu)
        kw = dict(nu=nu, t1=t1, scheme=scheme, rtol=1e-10, atol=1e-12)
        errs["burgers"].append(float(jnp.max(jnp.abs(solve_burgers(jnp.asarray(p0), g, **kw).ps[-1] - p1))))
        errs["hj"].append(float(jnp.max(jnp.abs(solve_hj(jnp.asarray(u0), g, **kw).us[-1] - u1))))
    for form, e in errs.items():
        orders = -np.diff(np.log2(e))
        assert np.all(orders > 1.75), (form, e, orders)


@pytest.mark.slow
def test_finite_volume_taylor_shock_error_falls_at_second_order(x64):
    # measured (minmod) on 201, 401, 801 points (front width 2 nu / U: 4, 8, 16 cells): 9.2e-3, 2.6e-3, 6.8e-4
    nu, t1 = 0.02, 0.5
    errs = []
    for n in (201, 401, 801):
        g = Grid(n, -1.0, 1.0, periodic=False)
        x = np.asarray(g.x)
        p = solve_burgers(jnp.asarray(taylor(x, 0.0, nu, speed=0.3)), g, nu=nu, t1=t1, scheme="fv").ps[-1]
        errs.append(float(jnp.max(jnp.abs(p - taylor(x, t1, nu, speed=0.3)))))
    assert np.all(-np.diff(np.log2(errs)) > 1.7), errs


# -- derivatives of the solvers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_solver_derivatives_in_nu_and_amplitude_match_the_cole_hopf_integral(x64):
    # p(0.5, 0.5) and p_x(0, 0.5) from p0 = -amp sin(pi x), nu = 0.05, spectral N = 64, dt = t1 / 50: jax.grad
    # against float64 central differences of the same solve (measured 4e-8 relative) and against the derivative
    # of the independent Cole-Hopf integral (measured 3e-4 relative: the discretisation)
    nu, t1, amp = 0.05, 0.5, 1.0
    g = Grid(64, -1.0, 1.0)
    i = 48  # x = 0.5

    def observed(nu, amp):
        p = solve_burgers(-amp * jnp.sin(jnp.pi * g.x), g, nu=nu, t1=t1, dt=t1 / 50).ps[-1]
        return jnp.stack([p[i], Spectral().derivative(g, p)[g.n // 2]])

    jac = jax.jacrev(observed, (0, 1))(nu, amp)
    fd = [(observed(nu + 1e-6, amp) - observed(nu - 1e-6, amp)) / 2e-6,
          (observed(nu, amp + 1e-6) - observed(nu, amp - 1e-6)) / 2e-6]
    exact = [np.array([central(lambda v: sine_profile(0.5, t1, v, amp), nu, 1e-6),
                       central(lambda v: sine_slope_at_0(t1, v, amp), nu, 1e-6)]),
             np.array([central(lambda a: sine_profile(0.5, t1, nu, a), amp, 1e-6),
                       central(lambda a: sine_slope_at_0(t1, nu, a), amp, 1e-6)])]
    for got, f, e in zip(jac, fd, exact):
        np.testing.assert_allclose(np.asarray(got), np.asarray(f), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got), e, rtol=1e-3)

"""Differentiating through the HJ / Burgers solves; vmap; error messages (THEORY section 3)."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import FiniteVolume, Grid, solve_burgers, solve_hj


def fd(f, x, eps):
    return (f(x + eps) - f(x - eps)) / (2 * eps)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


SETUPS = {
    # spectral + ETDRK4, fixed steps so that autodiff differentiates exactly the map finite differences see
    "spectral": dict(scheme="spectral", adaptive=False, dt0=0.01),
    # finite volume with the smooth limiter, resolved regime (see FiniteVolume's docstring)
    "fv-smooth": dict(scheme=FiniteVolume("smooth"), solver="tsit5", adaptive=False, dt0=0.002),
}


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_gradients_match_finite_differences(x64, name):
    kw = SETUPS[name]
    g = Grid(64, -1.0, 1.0)
    x = g.x
    w = jnp.cos(3 * x) + jnp.sin(2 * x) + 0.5  # observation weights (with an odd part: p is odd)
    bump = jnp.exp(-10 * (x - 0.3) ** 2)
    p0 = -jnp.sin(jnp.pi * x)

    def obs(p0, nu, t1):
        return jnp.sum(w * solve_burgers(p0, g, nu=nu, t1=t1, **kw).ps[-1])

    nu, t1 = 0.05, 0.305  # t1 off the fixed-step lattice: FD keeps the step count
    g_p0, g_nu, g_t1 = jax.grad(obs, argnums=(0, 1, 2))(p0, nu, t1)
    checks = {
        "nu": (float(g_nu), fd(lambda a: obs(p0, a, t1), nu, 1e-5)),
        "t1": (float(g_t1), fd(lambda a: obs(p0, nu, a), t1, 1e-5)),
        "p0 . bump": (float(jnp.sum(g_p0 * bump)), fd(lambda a: obs(p0 + a * bump, nu, t1), 0.0, 1e-5)),
    }
    for what, (ad, num) in checks.items():
        assert rel(ad, float(num)) < 1e-6, (name, what, ad, num)


@pytest.mark.slow
def test_gradient_adaptive_value_form(x64):
    g = Grid(32, -1.0, 1.0)
    u0 = jnp.cos(jnp.pi * g.x) / jnp.pi

    def obs(nu):
        return jnp.sum(solve_hj(u0, g, nu=nu, t1=0.3, rtol=1e-12, atol=1e-14).us[-1] ** 2)

    assert rel(float(jax.grad(obs)(0.05)), float(fd(obs, 0.05, 1e-4))) < 1e-6


def test_vmap_over_64_viscosities():
    g = Grid(64, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    nus = jnp.linspace(0.01, 0.2, 64)
    solve = jax.jit(lambda nu: solve_burgers(p0, g, nu=nu, t1=0.3, rtol=1e-5, atol=1e-7).ps[-1])
    batched = jax.vmap(solve)(nus)
    separate = jnp.stack([solve(nu) for nu in nus])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(separate), rtol=1e-5, atol=1e-6)


def test_vmap_over_initial_data_and_2d():
    g = Grid(16, -1.0, 1.0) * Grid(16, -1.0, 1.0)
    x, y = g.x
    u0 = jnp.stack([a * jnp.cos(jnp.pi * x) * jnp.cos(jnp.pi * y) for a in (0.2, 0.4)])
    us = jax.vmap(lambda u: solve_hj(u, g, nu=0.05, t1=0.2).us[-1])(u0)
    assert us.shape == (2, 16, 16) and bool(jnp.all(jnp.isfinite(us)))


def test_clear_errors():
    g = Grid(64, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    with pytest.raises(Exception, match="max_steps=3.*use scheme='fv'"):
        solve_burgers(p0, g, nu=0.05, t1=0.3, max_steps=3).ps.block_until_ready()
    # on finite volumes the advice is the viscous step limit of the explicit solver, not "use scheme='fv'"
    with pytest.raises(Exception, match=r"max_steps=3.*dt <= dx\^2 / \(2 nu\)") as info:
        solve_burgers(p0, g, nu=0.05, t1=0.3, scheme="fv", max_steps=3).ps.block_until_ready()
    assert "use scheme='fv'" not in str(info.value)
    with pytest.raises(Exception, match="not finite|failed|max_steps"):
        solve_burgers(p0 * jnp.nan, g, nu=0.05, t1=0.3, max_steps=3).ps.block_until_ready()  # same compilation
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        solve_burgers(p0, g, nu=0.05, t1=0.3, adjoint=dfx.BacksolveAdjoint())
    with pytest.raises(ValueError, match="periodic"):
        solve_burgers(p0, Grid(64, -1.0, 1.0, periodic=False), nu=0.05, t1=0.3)
    # an ill-posed (anti-diffusive) or backward problem, and non-positive steps, are refused naming the argument
    for kw, match in ((dict(nu=-0.01, t1=0.3), "nu=-0.01"), (dict(nu=0.05, t1=-0.1), "t1=-0.1"),
                      (dict(nu=0.05, t1=0.3, adaptive=False, dt=-0.01), "dt=-0.01")):
        with pytest.raises(ValueError, match=match):
            solve_burgers(p0, g, **kw)
        with pytest.raises(ValueError, match=match):
            solve_hj(p0, g, **kw)


def test_clear_errors_for_save_times_and_non_scalar_arguments():
    g = Grid(16, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    for ts in ([0.2, 0.1], [0.1, 0.5], [-0.1, 0.1]):  # refused before any compilation, naming ts
        with pytest.raises(ValueError, match=r"ts=.* need non-decreasing save times in \[0, t1\]"):
            solve_burgers(p0, g, nu=0.05, t1=0.3, ts=jnp.asarray(ts))
    with pytest.raises(ValueError, match=r"ts must be a 1-D array"):
        solve_hj(p0, g, nu=0.05, t1=0.3, ts=jnp.full((2, 2), 0.1))
    for kw, match in ((dict(nu=jnp.array([0.05, 0.1]), t1=0.3), r"nu must be a scalar, got shape \(2,\)"),
                      (dict(nu=0.05, t1=jnp.array([0.3])), r"t1 must be a scalar, got shape \(1,\)")):
        with pytest.raises(ValueError, match=match):
            solve_burgers(p0, g, **kw)
    # one save time may be given as a scalar
    sol = solve_burgers(p0, g, nu=0.05, t1=0.3, ts=0.1, dt=0.05)
    assert np.allclose(np.asarray(sol.ts), [0.1, 0.3])

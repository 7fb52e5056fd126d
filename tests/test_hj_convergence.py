"""Convergence of the HJ / Burgers solvers to the Cole-Hopf solution (THEORY section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (
    cole_hopf,
    cole_hopf_gradient,
    FiniteVolume,
    Grid,
    solve_burgers,
    solve_hj,
)

NU = 0.01 / np.pi  # Basdevant et al. (1986) reference problem


def loss(y):
    return jnp.cos(jnp.pi * y) / jnp.pi


def linf_errors(ns, t1, scheme, form="burgers", nu=NU):
    errs = []
    for n in ns:
        g = Grid(n, -1.0, 1.0)
        if form == "burgers":
            ref = cole_hopf_gradient(loss, g.x, t1, nu)
            y = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=nu, t1=t1, scheme=scheme, rtol=1e-9, atol=1e-11).ps
        else:
            ref = cole_hopf(loss, g.x, t1, nu)
            y = solve_hj(loss(g.x), g, nu=nu, t1=t1, scheme=scheme, rtol=1e-9, atol=1e-11).us
        errs.append(float(jnp.max(jnp.abs(y[-1] - ref))))
    errs = np.array(errs)
    orders = -np.diff(np.log2(errs)) / np.diff(np.log2(ns))
    print(f"\n{form} {scheme} N={ns} Linf={errs} observed orders={np.round(orders, 2)}")
    return errs, orders


def test_spectral_smooth_fast_decay(x64):
    # t1 = 0.2 < t* = 1/pi: smooth solution; spectral error decays faster than any power.
    errs, orders = linf_errors([32, 64], 0.2, "spectral")
    assert errs[-1] < 1e-4 and orders[0] > 4


@pytest.mark.slow
def test_spectral_smooth_fast_decay_fine(x64):
    errs, orders = linf_errors([32, 64, 128], 0.2, "spectral")
    assert errs[-1] < 1e-7
    assert orders[1] > orders[0] > 4


@pytest.mark.slow
def test_spectral_shock_resolved(x64):
    # Past the shock time (t = 1.6037/pi, max slope ~152): fast decay once the viscous front is resolved.
    errs, orders = linf_errors([256, 512], 1.6037 / np.pi, "spectral")
    assert errs[-1] < 5e-3 and orders[-1] > 3


def test_fv_smooth_second_order(x64):
    errs, orders = linf_errors([128, 256], 0.2, FiniteVolume("mc"))
    assert orders[-1] > 1.7


def test_fv_through_shock(x64):
    errs, orders = linf_errors([512, 1024], 1.6037 / np.pi, "fv")
    assert np.all(orders >= 1.0) and errs[-1] < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("limiter", ["minmod", "mc", "smooth"])
def test_fv_through_shock_fine_grids(x64, limiter):
    errs, orders = linf_errors([256, 512, 1024, 2048], 1.6037 / np.pi, FiniteVolume(limiter))
    assert np.all(orders >= 1.0) and errs[-1] < 5e-3


@pytest.mark.parametrize("scheme", ["spectral", "fv"])
def test_value_form_matches_cole_hopf_and_mean_moves(x64, scheme):
    n = 64
    errs, _ = linf_errors([n], 0.2, scheme, form="hj")
    assert errs[0] < (1e-6 if scheme == "spectral" else 2e-3)
    g = Grid(n, -1.0, 1.0)
    u = solve_hj(loss(g.x), g, nu=NU, t1=0.2, scheme=scheme, rtol=1e-9, atol=1e-11).us[-1]
    # the mean of u decreases (u_t = -|u_x|^2/2 + nu u_xx has negative mean); it is not held fixed
    assert float(jnp.mean(u)) < float(jnp.mean(loss(g.x))) - 1e-3


def test_explicit_and_imex_solvers_agree_with_etd(x64):
    g = Grid(64, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    ref = cole_hopf_gradient(loss, g.x, 0.2, 0.05)
    for solver in ["etd", "tsit5", "kencarp"]:
        p = solve_burgers(p0, g, nu=0.05, t1=0.2, solver=solver, rtol=1e-9, atol=1e-11).ps[-1]
        assert float(jnp.max(jnp.abs(p - ref))) < 1e-6, solver


@pytest.mark.slow
def test_fv_imex(x64):
    g = Grid(64, -1.0, 1.0)
    ref = cole_hopf_gradient(loss, g.x, 0.2, 0.05)
    p = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=0.05, t1=0.2, scheme="fv", solver="kencarp", rtol=1e-7,
                      atol=1e-9).ps[-1]
    assert float(jnp.max(jnp.abs(p - ref))) < 5e-3


def test_save_times(x64):
    g = Grid(64, -1.0, 1.0)
    ts = jnp.array([0.05, 0.1])
    sol = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=0.05, t1=0.2, ts=ts, rtol=1e-9, atol=1e-11)
    assert sol.ts.shape == (3,) and float(sol.ts[-1]) == pytest.approx(0.2)
    for t, p in zip(np.asarray(sol.ts), sol.ps):
        assert float(jnp.max(jnp.abs(p - cole_hopf_gradient(loss, g.x, float(t), 0.05)))) < 1e-7

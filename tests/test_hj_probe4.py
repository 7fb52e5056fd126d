"""HJ / Burgers engine: resolution check of spectral solves, Monte Carlo Cole-Hopf at a small effective sample
size, and edge cases found by probing (THEORY section 3)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (cole_hopf, cole_hopf_gradient, cole_hopf_monte_carlo, Grid, MC_MIN_ESS, shock_time,
                             solve_burgers, solve_hj)


def _reference(n):
    g = Grid(n, -1.0, 1.0)
    return g, -jnp.sin(jnp.pi * g.x), lambda y: jnp.cos(jnp.pi * y) / jnp.pi


@pytest.mark.parametrize("solve", [solve_burgers, solve_hj])
def test_under_resolved_spectral_solve_warns_and_reports_its_tail(x64, solve):
    # THEORY's reference problem past its shock time (t* = 1/pi) on n = 128 points: at nu = 0.01 / pi the viscous
    # length nu / max|p| is 0.2 grid spacings and the spectral solution rings (Gibbs); at nu = 0.1 / pi it spans
    # 2.5 and the solution is resolved.  The solve used to say nothing in either case.
    t1 = 0.5
    g, p0, loss = _reference(128)
    y0 = p0 if solve is solve_burgers else loss(g.x)
    for nu in (0.01 / np.pi, 0.1 / np.pi):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = solve(y0, g, nu=nu, t1=t1)
        msgs = [str(w.message) for w in caught if "under-resolved" in str(w.message)]
        assert sol.spectral_tail.shape == sol.ts.shape
        tail = float(sol.spectral_tail[-1])
        if nu < 0.01:
            assert len(msgs) == 1, msgs
            assert "128 grid" in msgs[0] and "use about n=" in msgs[0]
            need = int(msgs[0].split("use about n=")[1].split(" ")[0])
            p = sol.ys[-1] if solve is solve_burgers else jnp.gradient(sol.ys[-1], g.dx)
            # the suggested grid makes the viscous length span >= 1.5 spacings (1 % slack: FD grad u)
            assert nu / (float(jnp.max(jnp.abs(p))) * 2.0 / need) >= 1.5 * 0.99
            assert tail > 1e-2
        else:
            assert msgs == []
            assert tail < 1e-5
        if solve is solve_burgers:
            # the tail tracks the error against the exact Cole-Hopf solution (Gibbs ringing when large)
            err = float(jnp.max(jnp.abs(sol.ys[-1] - cole_hopf_gradient(loss, g.x, t1, nu))))
            assert (err > 0.05) if nu < 0.01 else (err < 1e-4)
            assert tail / 10 < err < 10 * tail


def test_spectral_tail_is_none_for_finite_volumes_and_zero_for_a_constant_field():
    g, p0, _ = _reference(16)
    assert solve_burgers(p0, g, nu=0.5, t1=0.01, scheme="fv", dt=0.005).spectral_tail is None
    sol = solve_burgers(jnp.ones_like(p0), g, nu=0.5, t1=0.01)
    np.testing.assert_array_equal(np.asarray(sol.spectral_tail), 0.0)


def test_spectral_tail_under_vmap_is_computed_per_member():
    g, p0, _ = _reference(16)
    tails = jax.vmap(lambda nu: solve_burgers(p0, g, nu=nu, t1=0.5).spectral_tail[-1])(jnp.asarray([3e-3, 0.3]))
    assert tails[0] > 1e-3 > 1e-4 > tails[1]


def test_save_times_as_a_list_raise_no_jax_deprecation_warning():
    # jnp.ndim(list) is deprecated in jax ("ndim requires ndarray or scalar arguments ... will be an error")
    g, p0, _ = _reference(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        sol = solve_burgers(p0, g, nu=0.5, t1=0.1, ts=[0.05])
    assert sol.ts.shape == (2,)


@jax.jit
def _quadratic_mc(t, nu, keys):
    # L = a |x|^2 / 2 in 20 dimensions, 64 samples: u(x, t) = a |x|^2 / (2 (1 + a t)) + nu d log(1 + a t)
    a, th = 4.0, 0.5 * jnp.ones(20)
    est = jax.vmap(lambda k: cole_hopf_monte_carlo(lambda p: 0.5 * a * jnp.sum(p * p), th, t, nu, key=k,
                                                  num_samples=64))(keys)
    exact = a * jnp.sum(th * th) / (2 * (1 + a * t)) + nu * 20 * jnp.log1p(a * t)
    return est, exact


def test_monte_carlo_at_a_small_effective_sample_size_reports_an_unknown_error(x64):
    # t = 0.5, nu = 0.1: the weights collapse (ess ~ 1) and the estimate is biased toward min L by ~3 while the
    # delta-method standard error read ~0.17 (17 standard errors off, for 98 % of keys)
    keys = jax.random.split(jax.random.key(0), 4)
    est, exact = _quadratic_mc(0.5, 0.1, keys)
    assert np.all(np.asarray(est.ess) < MC_MIN_ESS)
    assert float(jnp.mean(est.value - exact)) > 1.0  # the bias, measured against the exact integral
    assert not np.any(np.asarray(est.reliable))
    assert np.all(np.isinf(np.asarray(est.value_std))) and np.all(np.isinf(np.asarray(est.grad_std)))
    # t = 0.02, nu = 1: the weights spread (ess >= 20), the errors stay finite and cover the exact value
    est, exact = _quadratic_mc(0.02, 1.0, keys)
    assert np.all(np.asarray(est.ess) >= MC_MIN_ESS) and np.all(np.asarray(est.reliable))
    assert np.all(np.abs(np.asarray(est.value - exact)) < 5 * np.asarray(est.value_std))
    assert np.all(np.isfinite(np.asarray(est.grad_std)))


@pytest.mark.parametrize("arg", ["t", "nu"])
def test_cole_hopf_refuses_an_array_of_times_or_viscosities_by_name(arg):
    # an array nu failed with "div got incompatible shapes for broadcasting: (4001,), (2,)"
    kw = {"t": 0.1, "nu": 0.1, arg: jnp.asarray([0.1, 0.2])}
    for f in (cole_hopf, cole_hopf_gradient):
        with pytest.raises(ValueError, match=f"{f.__name__}: {arg} must be a scalar, got shape \\(2,\\); .*vmap"):
            f(lambda y: y * y, jnp.zeros(3), kw["t"], kw["nu"], num=51)
    with pytest.raises(ValueError, match=f"cole_hopf_monte_carlo: {arg} must be a scalar"):
        cole_hopf_monte_carlo(lambda p: jnp.sum(p * p), jnp.zeros(3), kw["t"], kw["nu"], key=jax.random.key(0))
    # vmap over the same argument is the documented way, and equals separate calls
    f = lambda v: cole_hopf(lambda y: jnp.cos(jnp.pi * y) / jnp.pi, jnp.zeros(1), **{**kw, arg: v}, num=401)  # noqa
    np.testing.assert_allclose(np.asarray(jax.vmap(f)(kw[arg]))[:, 0], [float(f(v)[0]) for v in (0.1, 0.2)],
                               rtol=1e-5)


def test_non_finite_points_and_fields_are_refused_by_name():
    # a NaN evaluation point gave a NaN value (cole_hopf), a NaN initial field a NaN shock time (shock_time); the
    # solvers and find_shocks already refuse them
    with pytest.raises(ValueError, match="cole_hopf: x is not finite"):
        cole_hopf(lambda y: y * y, jnp.asarray([0.0, jnp.nan]), 0.1, 0.1, num=51)
    g, p0, _ = _reference(16)
    with pytest.raises(ValueError, match="shock_time: p0 is not finite"):
        shock_time(p0.at[3].set(jnp.nan), g)
    np.testing.assert_allclose(float(shock_time(p0, g)), 1 / np.pi, rtol=1e-2)  # finite data unchanged


def test_monte_carlo_refuses_integer_params_by_name():
    # failed inside jax.random.normal with "data type <class 'numpy.int32'> not inexact"
    with pytest.raises(ValueError, match="cole_hopf_monte_carlo: params has a leaf of dtype int32"):
        cole_hopf_monte_carlo(lambda p: jnp.sum(p * p), jnp.zeros(3, jnp.int32), 0.1, 0.1, key=jax.random.key(0))

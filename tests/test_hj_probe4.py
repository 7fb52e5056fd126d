"""HJ / Burgers engine: resolution check of spectral solves, Monte Carlo Cole-Hopf at a small effective sample
size, and edge cases found by probing (THEORY section 3)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf_gradient, Grid, solve_burgers, solve_hj


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

"""HJ / Burgers engine: edge cases found by probing against exact references (THEORY section 3)."""

import warnings

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (cole_hopf, cole_hopf_gradient, cole_hopf_monte_carlo, find_shocks, Grid, shock_time,
                             slice_flow, solve_burgers, solve_hj)


def _under_resolved_t1_derivative(mode):
    # An under-resolved spectral solve (reference problem past t* = 1/pi on 32 points) differentiated with respect
    # to t1 only: nu is known, so the resolution check runs, and the save time it names is traced.  It raised a
    # ConcretizationTypeError instead of warning.
    g = Grid(32, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    w = jnp.sin(g.x + 0.3)  # an odd part: p is odd
    adjoint = dfx.ForwardMode() if mode == "jvp" else dfx.RecursiveCheckpointAdjoint()

    def obs(t1):
        return jnp.sum(w * solve_burgers(p0, g, nu=0.01, t1=t1, dt=0.05, adjoint=adjoint).ps[-1])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = jax.jvp(obs, (0.42,), (1.0,))[1] if mode == "jvp" else jax.grad(obs)(0.42)
    msgs = [str(c.message) for c in caught if "under-resolved on the 32 grid" in str(c.message)]
    assert len(msgs) == 1 and "at t=0.42 " in msgs[0], msgs
    assert np.isfinite(float(d)) and float(d) != 0.0


def test_under_resolved_warning_under_jvp_with_respect_to_t1_alone(x64):
    _under_resolved_t1_derivative("jvp")


@pytest.mark.slow
def test_under_resolved_warning_under_grad_with_respect_to_t1_alone(x64):
    _under_resolved_t1_derivative("grad")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.bfloat16])
def test_shock_time_and_find_shocks_read_integer_boolean_and_half_precision_fields(dtype):
    # Integer and boolean fields failed under strict dtype promotion (TypePromotionError / "sub does not accept
    # dtype bool") while the solvers accept them; they are read as the solvers read them.
    g = Grid(64, 0.0, 64.0)
    i = np.arange(64)
    step = np.where((i >= 20) & (i < 40), 1, 0)  # a unit step up at 20 (expansion) and down at 40 (shock)
    p = jnp.asarray(step.astype(bool) if dtype == jnp.bool_ else step, dtype)
    ref = jnp.asarray(step, jnp.float32)
    assert float(shock_time(p, g)) == float(shock_time(ref, g))
    assert 0 < float(shock_time(p, g)) < np.inf
    got, want = find_shocks(p, g).to_list(), find_shocks(ref, g).to_list()
    assert got == want and len(got) == 1 and abs(got[0]["location"] - 39.5) < 0.5, got


def test_shock_time_and_find_shocks_refuse_complex_fields_and_non_grids_by_name():
    g = Grid(32, -1.0, 1.0)
    p = jnp.sin(jnp.pi * g.x)
    for f, arg in ((shock_time, "p0"), (find_shocks, "p")):
        name = f.__name__
        with pytest.raises(TypeError, match=f"{name}: {arg} has dtype complex64; the field must be real"):
            f(p.astype(jnp.complex64), g)
        with pytest.raises(ValueError, match=f"{name}: grid=32 is not allowed; need a Grid"):
            f(p, 32)
    g2 = Grid(16, -1.0, 1.0) * Grid(8, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"find_shocks: grid is 2-D \(16 x 8\); it takes a 1-D field on a 1-D Grid"):
        find_shocks(jnp.zeros((16, 8)), g2)


@pytest.mark.parametrize("value", ["0.1", None, 0.1 + 1j, True])
def test_solves_and_cole_hopf_refuse_a_time_or_viscosity_that_is_not_a_real_number(value):
    # A string "0.1" was read as 0.1 and a bool as 0 / 1 (both solved); None and complex numbers failed with
    # unnamed errors ("None is not a valid value for jnp.array", "float() argument must be ...").
    g = Grid(8, -1.0, 1.0)
    calls = {
        "solve_burgers: nu": lambda: solve_burgers(jnp.zeros(8), g, nu=value, t1=0.1),
        "solve_hj: t1": lambda: solve_hj(jnp.zeros(8), g, nu=0.1, t1=value),
        "solve_burgers: dt": lambda: solve_burgers(jnp.zeros(8), g, nu=0.1, t1=0.1, dt=value),
        "cole_hopf: t": lambda: cole_hopf(jnp.cos, jnp.zeros(3), value, 0.1),
        "cole_hopf_gradient: nu": lambda: cole_hopf_gradient(jnp.cos, jnp.zeros(3), 0.1, value),
        "cole_hopf_monte_carlo: nu": lambda: cole_hopf_monte_carlo(jnp.cos, jnp.zeros(()), 0.1, value,
                                                                     key=jax.random.key(0)),
        "slice_flow: eta": lambda: slice_flow(lambda q: jnp.sum(q * q), jnp.zeros(2), jnp.asarray([1.0, 0.0]),
                                              extent=1.0, n=8, eta=value, k=1, nu=0.1),
    }
    for what, call in calls.items():
        if value is None and what.endswith("dt"):
            continue  # dt=None means adaptive steps
        with pytest.raises(TypeError, match=f"{what}={value!r} is not allowed; need a real number".replace(
                "(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            call()
    # real numbers of any kind still pass (the solves' other tests pass Python floats): a Python int, a NumPy
    # float, a 0-d float32 array; a constant loss stays constant under the flow
    for nu in (1, np.float64(0.1), jnp.asarray(0.1, jnp.float32)):
        np.testing.assert_allclose(np.asarray(cole_hopf(lambda y: 2.0, jnp.zeros(3), 0.1, nu)), 2.0, rtol=1e-5)


def test_grid_refuses_a_periodic_flag_that_is_not_a_bool():
    # Grid(..., periodic="no") was periodic (bool("no") is True) and periodic=0 / 1 chose by truth value
    for flag in ("no", 0, None):
        with pytest.raises(ValueError, match=f"Grid: periodic={flag!r} is not allowed; need True"):
            Grid(16, -1.0, 1.0, periodic=flag)
    assert not Grid(16, -1.0, 1.0, periodic=np.bool_(False)).periodic


@pytest.mark.parametrize("ndim", [1, 2])
def test_cole_hopf_refuses_a_loss_that_is_not_scalar_valued_by_name(ndim):
    # A vector-valued loss failed inside the quadrature with an unnamed broadcasting error ("Operands could not be
    # broadcast together", or "Incompatible shapes" under standard rank promotion); a loss returning None failed
    # in jnp.array.
    x = jnp.zeros(3) if ndim == 1 else jnp.zeros((2, 3))
    at = "a scalar point" if ndim == 1 else r"a point of shape \(2,\)"
    with pytest.raises(ValueError, match=rf"cole_hopf: loss returns shape \(2,\) and dtype float32 at {at}; it must "
                                         "return a real scalar"):
        cole_hopf(lambda y: jnp.stack([jnp.sum(y), jnp.sum(y)]), x, 0.1, 0.1, ndim=ndim)
    with pytest.raises(ValueError, match="cole_hopf_gradient: loss returns None"):
        cole_hopf_gradient(lambda y: None, x, 0.1, 0.1, ndim=ndim)
    # a constant loss written as a Python number is a real scalar: u = L for any t (the weight integrates to 1)
    np.testing.assert_allclose(np.asarray(cole_hopf(lambda y: 2.0, x, 0.1, 0.1, ndim=ndim)), 2.0, rtol=1e-5)


def test_traced_out_of_range_viscosity_time_step_or_save_time_is_refused_by_name():
    # Under jit (and vmap, grad) the Python range checks cannot see the values: a negative nu solved the anti-diffusive
    # equation, a negative t1 integrated backwards and a dt <= 0 took a single step of size t1, each returning a
    # field without a word; a save time beyond t1 failed in Diffrax's own message.
    g = Grid(8, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)

    @jax.jit
    def solve(nu, t1, dt, ts):
        return solve_burgers(p0, g, nu=nu, t1=t1, dt=dt, ts=ts).ps

    assert np.all(np.isfinite(np.asarray(solve(0.1, 0.1, 0.05, jnp.asarray([0.05])))))
    msg = "solve_burgers: a traced nu, t1, dt, dt0 or save time is out of range; need nu >= 0, t1 >= 0, dt > 0"
    for nu, t1, dt, ts in ((-0.1, 0.1, 0.05, 0.05), (0.1, -0.1, 0.05, 0.0), (0.1, 0.1, -0.05, 0.05),
                           (0.1, 0.1, 0.0, 0.05), (0.1, 0.1, 0.05, 0.2)):
        with pytest.raises(Exception, match=msg):
            solve(nu, t1, dt, jnp.asarray([ts])).block_until_ready()

"""The HJ / Burgers engine on cases beyond its other tests: float32 fields under float64 mode with the IMEX solver and
save times."""

import diffrax as dfx
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, solve_burgers
from quotient_sgd.hj._solve import _KenCarp4


def test_kencarp_dense_output_keeps_the_state_dtype_under_x64(x64):
    """With ``jax_enable_x64`` on, a float32 field solved with ``solver="kencarp"`` and save times ``ts`` failed in
    Diffrax's bare "When doing `buffer.at[i].set(value)`, then `value` must have a dtype that can be promoted ..."
    (or, under strict dtype promotion, in ``jnp.polyval``): KenCarp4's dense output multiplies the state by float64
    NumPy coefficients, so the state interpolated to a save time came out float64 for a float32 buffer (adaptive and
    fixed steps, both schemes; without save times, or with Tsit5 / ETDRK4, it ran).  The interpolation now keeps the
    state's dtype.  Checked on the dense output itself (no solve compiled): a float32 state and stages give float32
    values at every point of the step, equal to Diffrax's own KenCarp4 interpolation of the same data in float64 to
    float32 rounding; a float64 state gives Diffrax's values exactly."""
    rng = np.random.default_rng(0)
    y0, ke, ki = rng.normal(size=16), rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    t0, t1 = 0.2, 0.45
    cls = _KenCarp4.interpolation_cls

    def build(make, a, b, dtype, interp=cls):
        return interp(t0=make(a), t1=make(b), y0=jnp.asarray(y0, dtype), y1=None,
                      k=(jnp.asarray(ke, dtype), jnp.asarray(ki, dtype)))

    ref = build(jnp.float64, t0, t1, jnp.float64, dfx.KenCarp4.interpolation_cls)
    f64, f32 = build(jnp.float64, t0, t1, jnp.float64), build(jnp.float32, t0, t1, jnp.float32)
    for t in (0.2, 0.3, 0.45):
        want = np.asarray(ref.evaluate(jnp.float64(t)))
        np.testing.assert_array_equal(np.asarray(f64.evaluate(jnp.float64(t))), want)
        got = f32.evaluate(jnp.float32(t))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    two = f32.evaluate(jnp.float32(0.25), jnp.float32(0.4))
    assert two.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(two), np.asarray(ref.evaluate(jnp.float64(0.25), jnp.float64(0.4))),
                               rtol=1e-5, atol=1e-5)
    # a zero-length step (t0 == t1) reads the start, as Diffrax's does
    same = build(jnp.float32, t0, t0, jnp.float32)
    np.testing.assert_allclose(np.asarray(same.evaluate(jnp.float32(t0))), y0, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_kencarp_keeps_a_float32_field_float32_at_save_times_under_x64(x64):
    """The solve of the case above (a float32 field under x64, ``solver="kencarp"``, save times), which failed in
    Diffrax's "buffer.at[i].set(value)" dtype error: it comes back float32 and equal to the float64 solve to float32
    rounding."""
    g = Grid(16, -1.0, 1.0)
    p0 = jnp.sin(jnp.pi * g.x) + 0.3
    ts = jnp.asarray([0.1, 0.17])
    ref = solve_burgers(p0, g, nu=0.05, t1=0.3, ts=ts, scheme="fv", solver="kencarp").ps
    sol = solve_burgers(p0.astype(jnp.float32), g, nu=0.05, t1=0.3, ts=ts, scheme="fv", solver="kencarp")
    assert sol.ps.dtype == jnp.float32 and sol.ps.shape == (3, 16)
    np.testing.assert_allclose(np.asarray(sol.ps), np.asarray(ref), atol=2e-5)

"""The HJ / Burgers engine on cases beyond its other tests: float32 fields under float64 mode with the IMEX solver and
save times; step budgets and shock counts given as NumPy integers; Cole-Hopf counts and keys of another kind;
reverse mode through the forward-mode adjoint."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf, cole_hopf_monte_carlo, Grid, slice_flow, solve_burgers, solve_hj
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


def test_numpy_integer_step_budgets_and_shock_counts_are_read_as_counts():
    """``max_steps`` given as a NumPy integer (``np.int64(100)``, as a config or an array computation hands it) passed
    the check "an integer >= 1" and was then traced by the compiled solve, which failed inside ``diffeqsolve`` in a
    bare ``TracerBoolConversionError``; ``slice_flow`` traced ``max_steps`` and ``max_shocks`` given so before its
    checks, and refused them as "max_steps=JitTracer(int32[]) is not allowed".  Both are read as the Python ints they
    are, and give the results of the int ones."""
    g = Grid(8, -1.0, 1.0)
    p0 = jnp.sin(jnp.pi * g.x)
    a = solve_burgers(p0, g, nu=0.1, t1=0.1, scheme="fv", max_steps=np.int64(100)).ps  # (adaptive: a fixed dt sets
    b = solve_burgers(p0, g, nu=0.1, t1=0.1, scheme="fv", max_steps=100).ps  # the budget from its step count)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def loss(q):
        return jnp.sum(jnp.cos(3 * q))

    kw = dict(extent=1.0, n=9, eta=0.1, k=2, nu=0.05, dt=0.1)
    ref = slice_flow(loss, jnp.zeros(2), jnp.array([1.0, 0.0]), max_steps=1000, max_shocks=4, **kw)
    got = slice_flow(loss, jnp.zeros(2), jnp.array([1.0, 0.0]), max_steps=np.int64(1000), max_shocks=np.int32(4), **kw)
    np.testing.assert_array_equal(np.asarray(got.u), np.asarray(ref.u))
    assert got.shocks.location.shape == ref.shocks.location.shape == (4,)


def test_cole_hopf_counts_and_keys_of_another_kind_are_refused_by_name():
    """``cole_hopf_monte_carlo(..., num_samples=None)`` (or a complex count) failed in a bare ``int()`` ``TypeError``
    and ``key=0`` (an int seed) in JAX's bare "invalid PRNG key data"; ``cole_hopf(..., ndim=True)`` ran the 1-D
    quadrature (``True == 1``).  Each is now a ``ValueError`` naming the argument; keys of both kinds (typed and raw)
    still run (a typed key here, under ``jax.vmap``)."""
    def loss(q):
        return jnp.sum(q * q)

    kw = dict(t=0.1, nu=0.1)
    for bad, match in ((dict(num_samples=None), "num_samples=None is not allowed"),
                       (dict(num_samples=8 + 0j), "num_samples=.* is not allowed"),
                       (dict(num_samples=True), "num_samples=True is not allowed"),
                       (dict(key=0), "key=0 is not allowed; need a JAX PRNG key"),
                       (dict(key=jnp.zeros(2, jnp.int32)), "key=.* is not allowed; need a JAX PRNG key")):
        args = dict(key=jax.random.PRNGKey(0), num_samples=8) | bad
        with pytest.raises(ValueError, match=match):
            cole_hopf_monte_carlo(loss, jnp.ones(3), **kw, **args)
    for bad, match in ((dict(ndim=True), r"ndim 1 or 2 \(got True\)"), (dict(num=5 + 0j), r"num=.* is not allowed")):
        with pytest.raises(ValueError, match=match):
            cole_hopf(lambda y: y * y, jnp.linspace(-1.0, 1.0, 5), 0.1, 0.1, **bad)
    typed = jax.vmap(lambda k: cole_hopf_monte_carlo(loss, jnp.ones(3), **kw, key=k, num_samples=8).value)(
        jax.random.split(jax.random.key(0), 2))
    assert typed.shape == (2,) and bool(jnp.all(jnp.isfinite(typed)))


def test_reverse_mode_through_the_forward_mode_adjoint_is_refused_by_name():
    """``jax.grad`` (or ``jax.vjp``) through a solve with ``adjoint=diffrax.ForwardMode()`` failed in JAX's bare
    "Reverse-mode differentiation does not work for lax.while_loop or lax.fori_loop with dynamic start/stop values",
    naming neither the solve nor the adjoint.  It is now a ``ValueError`` naming ``adjoint`` and what to use.  (Forward
    mode through it, jvp / jacfwd / nested jacfwd / vmap / jit, was checked against the default adjoint's reverse mode
    and finite differences to 1e-14; the refusal is the identity in value.)"""
    g = Grid(8, -1.0, 1.0)
    u0 = jnp.cos(jnp.pi * g.x)

    def f(nu):
        return jnp.sum(solve_hj(u0, g, nu=nu, t1=0.2, scheme="fv", dt=0.05, adjoint=dfx.ForwardMode()).us[-1] ** 2)

    with pytest.raises(ValueError, match=r"solve_hj: adjoint=diffrax.ForwardMode\(\) differentiates in forward mode "
                                         r"only .*RecursiveCheckpointAdjoint"):
        jax.grad(f)(0.1)


@pytest.mark.parametrize("solver", [dfx.Kvaerno5(), dfx.ImplicitEuler()])
def test_implicit_solver_objects_with_fixed_steps_are_refused_by_name(solver):
    """``solver=diffrax.Kvaerno5()`` (or ``ImplicitEuler()``, which the solver-object refusal names as allowed) with
    a fixed step ``dt`` failed in Diffrax's bare "A fixed step size controller is being used alongside an implicit
    solver, but the tolerances for the implicit solver have not been specified": an implicit solver's root finder
    takes its tolerances from the adaptive controller.  Refused now, before any solve, naming ``solver`` and what
    works (adaptive steps, ``solver='kencarp'``, a root finder given its own tolerances); adaptive steps still run
    (the refusal is only for fixed steps)."""
    grid = Grid(16, -1.0, 1.0)
    p0 = jnp.sin(jnp.pi * jnp.linspace(-1.0, 1.0, 16, endpoint=False))
    with pytest.raises(ValueError, match=r"solver=.*not allowed with fixed steps.*kencarp"):
        solve_burgers(p0, grid, nu=0.05, t1=0.1, scheme="fv", solver=solver, dt=0.01)
    with pytest.raises(ValueError, match=r"solver=.*not allowed with fixed steps"):
        solve_hj(p0, grid, nu=0.05, t1=0.1, scheme="fv", solver=solver, dt0=0.01, adaptive=False)

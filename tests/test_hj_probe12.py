"""The HJ / Burgers engine on cases beyond its other tests: fields that are not numbers at all; fronts read from
rounding or from the solve's error on flat fields and loss slices."""

import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf, find_shocks, Grid, shock_time, slice_flow, solve_burgers, solve_hj


@pytest.mark.parametrize("bad", ["abc", None, ["a", "b"]])
def test_fields_that_are_not_numbers_are_refused_by_name(bad):
    """A field given as a string, ``None`` or a list of strings failed in JAX's own ``TypeError`` ("Value 'abc' with
    dtype <U3 is not a valid JAX array type") or ``ValueError`` ("None is not a valid value for jnp.array"), naming
    neither the function nor the argument, in solve_burgers / solve_hj (p0 / u0), shock_time (p0), find_shocks (p)
    and cole_hopf (x).  Each now raises a ``TypeError`` naming both.  (The checks run before any compilation.)"""
    g = Grid(8, -1.0, 1.0)
    calls = {"solve_burgers: p0=": lambda: solve_burgers(bad, g, nu=0.1, t1=0.1),
             "solve_hj: u0=": lambda: solve_hj(bad, g, nu=0.1, t1=0.1),
             "shock_time: p0=": lambda: shock_time(bad, g),
             "find_shocks: p=": lambda: find_shocks(bad, g),
             "cole_hopf: x=": lambda: cole_hopf(lambda y: y * y, bad, 0.1, 0.1)}
    for start, call in calls.items():
        with pytest.raises(TypeError, match=f"^{start}.* is not allowed; need a real array of numbers"):
            call()
    assert np.isfinite(float(shock_time([0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0], g)))  # a list of numbers is fine


def test_find_shocks_reads_no_front_in_rounding():
    """``find_shocks``' criteria are free of the units of p, so rounding on a flat field read as fronts: ``1.5``
    everywhere but one node one ulp higher gave a shock of jump one ulp (2.2e-16 in float64, 1.2e-7 in float32), and
    ``1.5`` plus noise of an ulp filled all eight slots.  A jump within 64 ulp of ``max|p|`` is no front now; a real
    front of jump 2e-3 on the same level is still found, at its place."""
    g = Grid(64, -1.0, 1.0, periodic=False)
    x = np.asarray(g.x, np.float32)
    one_ulp = np.full(64, 1.5, np.float32)
    one_ulp[20] = np.nextafter(np.float32(1.5), np.float32(2.0))
    noisy = (1.5 + 2e-7 * np.random.default_rng(0).normal(size=64)).astype(np.float32)
    front = (1.5 - 1e-3 * np.tanh((x - 0.1) / 0.05)).astype(np.float32)
    for p in (one_ulp, noisy):
        assert int(find_shocks(p, g).count) == 0
    (shock,) = find_shocks(front, g).to_list()
    assert abs(shock["location"] - 0.1) < 0.1 * g.dx and abs(shock["jump"] - 2e-3) < 1e-5


def _wells(q):
    """``q[1] + q[2] a + q[3] (a^2 - 1)^2 / 4`` along ``a = q[0]``: a linear loss or a double well."""
    return q[1] + q[2] * q[0] + q[3] * (q[0] ** 2 - 1) ** 2 / 4


def test_slice_flow_reads_no_front_in_the_solves_error():
    """On a linear loss ``1 + a`` (its flow ``u = L - t / 2`` never forms a shock) ``slice_flow`` in float32 reported
    two shocks of jump 2.6e-5 and 1e-5: p is the fourth-order derivative of u, which turns the solve's error and
    rounding into steep little wiggles, and ``find_shocks`` is free of the units of p.  Fronts within that noise,
    ``3 (8 eps max|u| + rtol max|u - mean L| + atol) / dx``, are not reported now; the double well ``(a^2 - 1)^2 / 4``
    past its shock time 1 still shows its one shock at ``a = 0`` (the same compiled program: params are traced)."""
    e0 = jnp.array([1.0, 0.0, 0.0, 0.0], jnp.float32)
    kw = dict(extent=1.5, n=65, eta=0.1, k=12, nu=0.01, margin=1.5)
    linear = slice_flow(_wells, jnp.array([0.0, 1.0, 1.0, 0.0], jnp.float32), e0, **kw)
    assert bool(linear.boundary_ok) and int(linear.shocks.count) == 0
    assert float(jnp.max(jnp.abs(linear.p - 1.0))) < 1e-3  # (the flow itself is right)
    wells = slice_flow(_wells, jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32), e0, **kw)
    (shock,) = wells.shocks.to_list()
    assert abs(shock["location"]) < 0.01 and shock["jump"] > 0.5


def test_fourier_modes_of_a_bounded_grid_are_refused():
    """``Grid(..., periodic=False).wavenumbers()`` returned ``2 pi m / length`` as if the grid were periodic: its n
    samples span ``(n - 1) dx = length``, so these were not the wavenumbers of the samples' FFT (off by the factor
    ``n / (n - 1)``: FFT bin 1 of 8 bounded samples of [-1, 1] has the period 8 dx = 16 / 7, wavenumber 7 pi / 8,
    which the method gave as pi), and ``index_frequencies`` likewise.  Both now
    raise a ``ValueError`` saying the grid is bounded; a periodic grid's are unchanged."""
    for method in ("wavenumbers", "index_frequencies"):
        with pytest.raises(ValueError, match=f"Grid.{method}: the grid is bounded"):
            getattr(Grid(8, -1.0, 1.0, periodic=False), method)()
    np.testing.assert_allclose(np.asarray(Grid(8, -1.0, 1.0).wavenumbers(real=True)), np.pi * np.arange(5))
    np.testing.assert_array_equal(Grid(8, -1.0, 1.0).index_frequencies(), [0, 1, 2, 3, -4, -3, -2, -1])

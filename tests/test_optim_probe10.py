"""quotient_sgd.observables / optim on further inputs: Lanczos on spectra whose bulk is tiny against their top."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd import observables as qobs


def _operator(n, top, bulk, seed, null=0, repeat=1):
    """A float64 symmetric ``n x n`` matrix with eigenvalues ``top``, ``null`` zeros and the rest drawn uniformly
    from the interval ``bulk`` (each value ``repeat`` times), in a random orthonormal basis; and its eigenvalues
    (ascending) as the exact reference."""
    m = n - len(top) - null
    draws = np.random.RandomState(seed).uniform(bulk[0], bulk[1], m // repeat)
    ev = np.concatenate([np.asarray(top, np.float64), np.zeros(null), np.repeat(draws, repeat)])
    assert ev.shape == (n,)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (n, n), jnp.float64))
    return (q * jnp.asarray(ev)[None, :]) @ q.T, np.sort(ev)


@pytest.mark.parametrize("bulk", [(-1e-10, 1e-10), (1e-11, 1e-10)])
def test_lanczos_resolves_a_bulk_eleven_decades_below_the_top(x64, bulk):
    """A top of 1 over a bulk at 1e-10 - 1e-11: once the outliers are found, the residuals are of the size of the
    bulk (~1e5 eps), new directions, not rounding noise.  The breakdown test took them for a breakdown (a fixed
    1e-10 of |A q|), and the bottom eigenvalues came out 35-340% off the dense ones; now the bottom-2 agree to
    1e-5 of the bulk's width when the Krylov space is the whole space, the top-2 to eps."""
    n = 24
    a, ev = _operator(n, [1.0, 0.5, 0.3], bulk, 0)
    width = bulk[1] - bulk[0]
    v0 = jax.random.normal(jax.random.key(1), (n,), jnp.float64)
    # (the loop only: the straight-line iteration takes the same step, and its n steps compile in seconds)
    for method in ("loop",):
        ex = jax.jit(lambda v, m=method: qobs.lanczos_extremes(lambda u: a @ u, v, num_matvecs=n, k=2, method=m))(v0)
        np.testing.assert_allclose(ex.bottom, ev[:2], rtol=0, atol=1e-5 * width, err_msg=method)
        np.testing.assert_allclose(ex.top, ev[::-1][:2], rtol=0, atol=1e-14, err_msg=method)
        # the Ritz vector of the bottom value is its eigenvector (the residual at the bulk's scale)
        v = ex.bottom_vectors[0]
        assert float(jnp.linalg.norm(a @ v - ex.bottom[0] * v)) < 1e-4 * width


def test_lanczos_small_bulk_through_the_hessian_observable(x64):
    """The same through ``sharpness_raw`` (Hessian-vector products of a quadratic loss): the bottom eigenvalue of a
    Hessian whose bulk sits at 1e-10 of its top, from fewer steps than dimensions (the start's Krylov space, k=1)."""
    n = 40
    a, ev = _operator(n, [3.0, 2.0], (-1e-10, 1e-10), 2)
    loss = lambda p: 0.5 * p["w"] @ (a @ p["w"])  # noqa: E731
    ex = jax.jit(lambda p: qobs.sharpness_raw(loss, p, key=jax.random.key(4), num_matvecs=n))(
        {"w": jnp.ones(n, jnp.float64)})
    np.testing.assert_allclose(ex.bottom[0], ev[0], rtol=1e-4)
    np.testing.assert_allclose(ex.top[0], ev[-1], rtol=1e-13)


def test_lanczos_small_bulk_still_stops_where_the_space_is_exhausted(x64):
    """A bulk at 1e-11 - 1e-10 beside an exact null space (8 dimensions) and a repeated top: the iteration must go
    on through the bulk (every value of it exact) and stop where the Krylov space is exhausted (``restart=False``:
    NaN past the space built, which holds the outliers, the bulk and a few null directions, not all ``n``); with
    restarts the extremes come with their multiplicities (the top twice, 0 eight times)."""
    n, null = 32, 8
    a, ev = _operator(n, [2.0, 2.0, 1.0], (1e-11, 1e-10), 3, null=null)
    bulk = ev[null:-3]
    v0 = jax.random.normal(jax.random.key(5), (n,), jnp.float64)
    for method in ("loop",):  # (the straight-line iteration takes the same steps)
        stop = jax.jit(lambda v, m=method: qobs.lanczos_extremes(lambda u: a @ u, v, num_matvecs=n, k=n, method=m,
                                                                 restart=False))(v0)
        bottom = np.asarray(stop.bottom)
        built = int(np.sum(np.isfinite(bottom)))
        assert 2 + bulk.size + 1 <= built < n - 2, (method, built)  # (the stored matrix's rounding seeds copies)
        assert np.all(np.isnan(bottom[built:])), method
        found = bottom[:built]
        np.testing.assert_allclose(found[np.abs(found) < 1e-15], 0.0, atol=1e-15, err_msg=method)
        np.testing.assert_allclose(found[(found > 1e-15) & (found < 1e-6)], bulk, rtol=0, atol=1e-15, err_msg=method)
        full = jax.jit(lambda v, m=method: qobs.lanczos_extremes(lambda u: a @ u, v, num_matvecs=n, k=12, method=m))(
            v0)
        np.testing.assert_allclose(full.bottom, ev[:12], rtol=0, atol=1e-15, err_msg=method)
        np.testing.assert_allclose(full.top[:3], [2.0, 2.0, 1.0], rtol=0, atol=1e-14, err_msg=method)

"""The HJ / Burgers engine on cases beyond its other tests: the spectral gradient of 2-D fields with content in the
Nyquist mode of the first axis."""

import jax.numpy as jnp
import numpy as np

from quotient_sgd.hj import Grid, Spectral


def _field(x, y, nx, ny):
    """A trigonometric polynomial sampled on the nodes, with content in the Nyquist mode of each even axis (only as
    ``cos(N x) f(y)`` / ``g(x) cos(M y)``, whose derivative across that mode vanishes at every node), and its exact
    gradient there."""
    n, m = nx // 2, ny // 2
    u = (np.sin(x + 0.2) * np.cos(y) + 0.3 * np.cos(n * x) * np.sin(2 * y + 0.5) + 0.2 * np.cos(2 * x)
         + 0.4 * np.cos(x - 0.7) * np.cos(m * y))
    ux = (np.cos(x + 0.2) * np.cos(y) - 0.3 * n * np.sin(n * x) * np.sin(2 * y + 0.5) - 0.4 * np.sin(2 * x)
          - 0.4 * np.sin(x - 0.7) * np.cos(m * y))
    uy = (-np.sin(x + 0.2) * np.sin(y) + 0.6 * np.cos(n * x) * np.cos(2 * y + 0.5)
          - 0.4 * m * np.cos(x - 0.7) * np.sin(m * y))
    return u, ux, uy


def test_spectral_derivative_of_the_first_axis_nyquist_mode_on_a_2d_grid(x64):
    """``Spectral().derivative`` on a 2-D grid with an even number of points along x kept the Nyquist row of the
    x-derivative with the wavenumber ``-pi / dx`` of the full FFT, which breaks the Hermitian symmetry of the real
    field's transform: ``d/dx`` of ``cos(4 x) cos(y)`` on 8 x 6 nodes of ``[0, 2 pi)^2`` came out 3.46 at some node,
    where it is 0 at every one (``sin(4 x) = 0`` there); on 16 x 12 nodes the field below was off by 2.1.  (Along the
    last axis ``irfft`` drops that term by itself; the 1-D derivative was right.)  This is the derivative README and
    the 2-D solvers' curl message recommend for building ``p0 = grad u``.  Checked against the exact gradient of a
    trigonometric polynomial, and against the y-derivative of the transposed field on the transposed grid."""
    for nx, ny in ((8, 6), (10, 7)):
        g = Grid(nx, 0.0, 2 * np.pi) * Grid(ny, 0.0, 2 * np.pi)
        x, y = np.asarray(g.x)
        u, ux, uy = _field(x, y, nx, ny)
        d = np.asarray(Spectral().derivative(g, jnp.asarray(u)))
        assert d.shape == (2, nx, ny)
        np.testing.assert_allclose(d[0], ux, atol=1e-12)
        np.testing.assert_allclose(d[1], uy, atol=1e-12)
        # the same field with its axes swapped: d/dx is the transposed grid's d/dy (the last, rfft axis)
        gt = Grid(ny, 0.0, 2 * np.pi) * Grid(nx, 0.0, 2 * np.pi)
        dt = np.asarray(Spectral().derivative(gt, jnp.asarray(u.T)))
        np.testing.assert_allclose(dt[1].T, d[0], atol=1e-12)
        np.testing.assert_allclose(dt[0].T, d[1], atol=1e-12)
    # 1-D (rfft alone): the Nyquist mode's derivative is 0 at the nodes, as before
    g1 = Grid(8, 0.0, 2 * np.pi)
    x1 = np.asarray(g1.x)
    d1 = np.asarray(Spectral().derivative(g1, jnp.asarray(np.cos(4 * x1) + np.sin(x1))))
    np.testing.assert_allclose(d1, np.cos(x1), atol=1e-12)

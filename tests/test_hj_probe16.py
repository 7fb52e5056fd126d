"""The HJ / Burgers engine on cases beyond its other tests: 2-D finite volumes on separable fields."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from quotient_sgd.hj import FiniteVolume, Grid


def test_smooth_limiter_flows_a_separable_gradient_field_as_its_two_sections(x64):
    """Burgers decouples a separable gradient field ``p = (f(x), g(y))`` (the loss ``F(x) + G(y)``): each component
    flows as the 1-D Burgers solution of its section, and the minmod scheme, the spectral one and the value form
    keep that to rounding.  The smooth limiter of the gradient form took its data scale from the spreads of both
    components summed, so that ``g`` set the regularisation and the wave-speed bound of ``f``'s faces: on 16 x 9
    nodes (x periodic, y bounded; a cosine loss along x, a cubic along y, nu = 0.05, fixed steps of 0.002 to t = 0.3)
    ``p_x`` came out 1.4e-3 away from the 1-D solve of ``f``, and the right-hand side below 0.057 away from the 1-D
    ones.  The semi-discrete right-hand side
    of the 2-D field is checked against those of its two 1-D sections, with the axes in both orders (the solve
    integrates it, so a solve decouples when it does)."""
    nu = 0.05
    rhs = eqx.filter_jit(lambda grid, p: FiniteVolume(limiter="smooth").rhs(grid, "burgers", p, nu))
    ax, ay = Grid(16, -1.0, 1.0), Grid(9, -0.5, 1.5, periodic=False)
    f = -0.5 * jnp.sin(jnp.pi * ax.x) + 0.2 * jnp.cos(2 * jnp.pi * ax.x)
    g = 3.0 * ay.x + 0.9 * ay.x**2
    rf, rg = (np.asarray(rhs(a, q)) for a, q in ((ax, f), (ay, g)))
    for grid, first, second in ((ax * ay, (f, rf), (g, rg)), (ay * ax, (g, rg), (f, rf))):
        p = jnp.stack(jnp.broadcast_arrays(first[0][:, None], second[0][None, :]))
        r = np.asarray(rhs(grid, p))
        np.testing.assert_allclose(r[0], np.broadcast_to(first[1][:, None], r[0].shape), rtol=0, atol=1e-12)
        np.testing.assert_allclose(r[1], np.broadcast_to(second[1][None, :], r[1].shape), rtol=0, atol=1e-12)

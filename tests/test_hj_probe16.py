"""The HJ / Burgers engine on cases beyond its other tests: 2-D finite volumes on separable fields."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import FiniteVolume, Grid, shock_time, solve_burgers


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


def test_a_gradient_field_with_a_tangential_jump_at_a_periodic_seam_is_refused_by_name(x64):
    """``p0 = (y, x)``, the gradient of the saddle ``x y``, sampled on a periodic grid jumps across each seam in its
    tangential component (``p_y = x`` across the seam of x): the gradient of no continuous periodic loss, a curl
    concentrated on the seam (relative curl 1.04 there on 64 x 64 nodes, that of a rotation).  The curl check reads
    the jump as grid-scale content within the derivatives' error, and ``solve_burgers`` integrated it without a
    word, where ``solve_hj`` refuses ``u0 = x y`` as not periodic (``shock_time`` read the jump as a Hessian
    eigenvalue of -8: t* = 0.12 for 1 on 16 x 16 nodes).  Now refused by both, naming p0 and the component, also
    on a grid periodic along one axis only; a jump of the normal component at the seam (``p0 = (x, 0)``, the
    periodic sawtooth: a Riemann problem) is still solved, each row as the 1-D sawtooth."""
    g = Grid(8, -1.0, 1.0)
    for grid in (g * g, g * Grid(8, -1.0, 1.0, periodic=False)):
        x, y = grid.x
        for scheme in ("fv", "spectral") if grid.periodic else ("fv",):
            with pytest.raises(ValueError, match="p0 is not the gradient of a periodic loss.*p_y jumps across the "
                                                 "seam of axis 0"):
                solve_burgers(jnp.stack([y, x]), grid, nu=0.05, t1=0.05, scheme=scheme)
        with pytest.raises(ValueError, match="shock_time: p0 is not the gradient of a periodic loss"):
            shock_time(jnp.stack([y, x]), grid)
    x = (g * g).x[0]
    p = solve_burgers(jnp.stack([x, jnp.zeros_like(x)]), g * g, nu=0.05, t1=0.05, scheme="fv", dt=0.01).ps[-1]
    row = np.asarray(solve_burgers(g.x, g, nu=0.05, t1=0.05, scheme="fv", dt=0.01).ps[-1])
    np.testing.assert_allclose(np.asarray(p[0]), np.broadcast_to(row[:, None], p[0].shape), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(p[1]), 0.0, rtol=0, atol=1e-12)

"""HJ engine: shock times of flat-bottomed minima in 2-D, shock detection on coarse grids, end-time derivatives."""

import equinox as eqx
import jax.numpy as jnp
import pytest

from quotient_sgd.hj import Grid, shock_time


def _band(x, centre, half):
    """p0 = -clip(x - centre, -half, half): slope -1 on a band, 0 outside (a concave band of the loss)."""
    return -jnp.clip(x - centre, -half, half)


@pytest.mark.parametrize("periodic", [True, False])
def test_2d_shock_time_of_a_flat_bottomed_minimum_is_the_1d_one(x64, periodic):
    # a separable p0 = (f(x), k f(y)) has the Hessian diag(f'(x), k f'(y)) and, with 0 <= k <= 1, lambda_min = -1 on
    # the band |x - cx| < 0.3: shock time 1 exactly (1-D: t* = -1 / min f').  The 2-D quadratic through the nine
    # nodes around the smallest sample dipped below the flat minimum at the band's edge (t* = 0.93-0.99 on 16-64
    # nodes a side, where the 1-D estimate gives 1)
    st = eqx.filter_jit(shock_time)  # one compilation per grid
    for n in (16, 33):
        g = Grid(n, -1.0, 1.0, periodic=periodic) * Grid(n + 2, -1.0, 1.0, periodic=periodic)
        x, y = g.x
        g1 = Grid(n, -1.0, 1.0, periodic=periodic)
        for cx, cy in ((0.0, 0.0), (0.013, 0.029), (0.05, -0.11)):
            one_d = float(st(_band(g1.x, cx, 0.3), g1))
            assert one_d == pytest.approx(1.0, rel=1e-9), (n, cx)
            for k in (1.0, 0.5, 0.0):
                p0 = jnp.stack([_band(x, cx, 0.3), k * _band(y, cy, 0.3)])
                assert float(st(p0, g)) == pytest.approx(1.0, rel=1e-9), (n, cx, cy, k)

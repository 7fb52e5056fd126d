"""Edge cases of the HJ / Burgers engine found by probing beyond the other tests (THEORY section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, solve_burgers, solve_hj


def _sine(n=16):
    g = Grid(n, -1.0, 1.0)
    return g, -jnp.sin(jnp.pi * g.x)


@pytest.mark.parametrize("solve", [solve_burgers, solve_hj])
def test_empty_save_times_are_refused_by_name(solve):
    # an empty ts used to fail inside diffrax with "IndexError: index is out of bounds for axis 0 with size 0"
    g, p0 = _sine()
    with pytest.raises(ValueError, match=r"ts=\[\] is not allowed; pass ts=None"):
        solve(p0, g, nu=0.1, t1=0.1, ts=[])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_save_time_is_refused_by_name(bad):
    # a NaN save time passed the order / range check (every comparison with NaN is False) and the solve then ran
    # into max_steps, whose message blamed the tolerances and the grid
    g, p0 = _sine()
    with pytest.raises(ValueError, match=r"ts=\[0.05, (nan|inf)\] is not finite"):
        solve_burgers(p0, g, nu=0.1, t1=0.1, ts=[0.05, bad])


def test_traced_non_finite_save_time_is_named():
    # under jit the save times are traced: a NaN one filled the fixed-step solution with NaN and the error said
    # the grid under-resolves the flow
    g, p0 = _sine()
    run = jax.jit(lambda ts: solve_burgers(p0, g, nu=0.1, t1=0.1, ts=ts, dt=0.05).ps)
    ok = np.asarray(run(jnp.array([0.05])))
    assert ok.shape == (2, 16) and np.all(np.isfinite(ok))
    with pytest.raises(Exception, match="nu, t1, ts or the initial field is not finite"):
        jax.block_until_ready(run(jnp.array([jnp.nan])))


@pytest.mark.parametrize("grid", [[Grid(16, -1.0, 1.0)], (16, -1.0, 1.0), None])
def test_a_grid_that_is_not_a_grid_is_refused_by_name(grid):
    # used to fail with "AttributeError: 'list' object has no attribute 'ndim'"
    _, p0 = _sine()
    with pytest.raises(ValueError, match=r"grid=.* is not allowed; need a Grid \(1-D\) or Grid2D"):
        solve_burgers(p0, grid, nu=0.1, t1=0.1)

"""The HJ / Burgers engine on cases beyond its other tests: fields that are not numbers at all."""

import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf, find_shocks, Grid, shock_time, solve_burgers, solve_hj


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

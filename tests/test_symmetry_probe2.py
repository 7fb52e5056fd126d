"""Symmetry groups of the NNX models on configurations and inputs beyond the other symmetry tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from quotient_sgd.symmetry import GL, quotient_distance

from helpers import tree_norm


def test_quotient_distance_to_own_orbit_is_finite_when_a_gauss_newton_step_overflows():
    """One GL(2) bond in float32, an element of condition number e^12: a Gauss-Newton candidate (the exponential
    of a large step) is not finite.  Its NaN distance used to win the argmin, so quotient_distance was NaN; now
    it counts as infinitely far, and the distance is at float32 rounding."""
    group = GL(left=(("a",), None), right=(("b",), None), kind="vo", name="gl")
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"a": jax.random.normal(k1, (2, 2)), "b": jax.random.normal(k2, (2, 2))}
    moved = group.act(group.sample(jax.random.key(3), params, 4.0), params)
    d = float(quotient_distance(group, params, moved, rounds=0, iters=1))
    assert d <= 1e-3 * float(tree_norm(params))

"""Regression tests for defects found by exercising the symmetry groups and models beyond the other tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from quotient_sgd.models import MLP
from quotient_sgd.symmetry import Product, Rescale, verify


def _tanh_mlp_with_a_false_rescale():
    """A tanh MLP and a group declaring the rescale of its hidden units, which tanh does not have."""
    model = MLP(3, (4,), 2, activation="tanh", rngs=nnx.Rngs(0))
    k0, b0, k1 = ("layers", 0, "kernel"), ("layers", 0, "bias"), ("layers", 1, "kernel")
    group = Product([Rescale(incoming=((k0, 1), (b0, 0)), outgoing=((k1, 0),), name="rescale/layers.0")])
    return model, group


def test_verify_refuses_an_empty_batch_instead_of_passing_any_action():
    """``verify`` on an ``x`` of no examples compared empty outputs: every relative change was 0 and a rescale forced
    onto a tanh MLP (not a symmetry: on five examples it raises SymmetryError) was returned as ``0.0``, a pass."""
    model, group = _tanh_mlp_with_a_false_rescale()
    x = jax.random.normal(jax.random.key(0), (5, 3))
    with pytest.raises(ValueError, match="empty.*at least one example"):
        verify(model, group, x[:0], jax.random.key(1))


@pytest.mark.parametrize("scale", [0, 0.0, jnp.asarray(0.0)])
def test_verify_refuses_scale_zero_whose_elements_move_nothing(scale):
    """At ``scale=0`` the rescale, scale and translation elements are the identity: ``verify`` of the false rescale
    above returned ``0.0`` (a pass) instead of checking anything."""
    model, group = _tanh_mlp_with_a_false_rescale()
    x = jax.random.normal(jax.random.key(0), (5, 3))
    with pytest.raises(ValueError, match="scale must be > 0"):
        verify(model, group, x, jax.random.key(1), scale=scale)

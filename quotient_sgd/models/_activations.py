"""Elementwise activations, and which of them are positively homogeneous (THEORY section 1, "rescale").

An activation ``sigma`` is *positively homogeneous* when ``sigma(a z) = a sigma(z)`` for every ``a > 0``; only
then is ``w_in,j -> a_j w_in,j, b_j -> a_j b_j, w_out,j -> w_out,j / a_j`` a symmetry of the two layers it joins.
ReLU, leaky ReLU and the identity are; tanh and GELU are not, so a model using them declares no rescale.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LEAKY_RELU_SLOPE = 0.01


def _leaky_relu(z: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(z, negative_slope=LEAKY_RELU_SLOPE)


def _identity(z: jax.Array) -> jax.Array:
    return z


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": _leaky_relu,
    "identity": _identity,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
}
"""The activations models accept, by name."""

HOMOGENEOUS: frozenset[str] = frozenset({"relu", "leaky_relu", "identity"})
"""Names of the positively homogeneous activations (those that admit the rescale symmetry)."""


def check_activation(activation: str, argname: str = "activation") -> str:
    """Validate an activation name; ``ValueError`` naming the argument and the allowed values otherwise."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"{argname} must be one of {sorted(ACTIVATIONS)}, got {activation!r}. "
            f"(Only {sorted(HOMOGENEOUS)} are positively homogeneous and admit the rescale symmetry.)"
        )
    return activation


def get_activation(activation: str, argname: str = "activation") -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``activation`` (validated by :func:`check_activation`)."""
    return ACTIVATIONS[check_activation(activation, argname)]


def is_homogeneous(activation: str) -> bool:
    """Whether ``activation`` is positively homogeneous: ``sigma(a z) = a sigma(z)`` for ``a > 0``."""
    return check_activation(activation) in HOMOGENEOUS

"""Initialisers that draw their random numbers as one flat vector: flax's defaults, value for value.

JAX's threefry generator numbers its counters by the flattened index, so a draw of shape ``(n,)`` reshaped to
``shape`` holds exactly the values of a draw of ``shape`` (:func:`variance_scaling` returns bitwise what
``jax.nn.initializers.variance_scaling`` returns, and the models' parameters are flax's defaults).  The reason
is compile time: XLA:CPU compiles a two-dimensional threefry draw whose last axis is not a multiple of the
vector width several times slower than the flat one (measured here, jax 0.10.2: shape ``(32, 10)`` 0.65 s,
``(320,)`` 0.15 s), and every classifier head with 10 outputs has such a kernel.  The saving is paid back on
every model construction and every jitted initialisation of a new shape (``quotient-sgd run``'s start, tests).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

_MODES = ("fan_in", "fan_out", "fan_avg", "fan_geo_avg")
_DISTRIBUTIONS = ("truncated_normal", "normal", "uniform")


def _size(shape, axis) -> int:
    return shape[axis] if isinstance(axis, int) else math.prod(shape[i] for i in axis)


def _fans(shape, in_axis, out_axis, batch_axis) -> tuple[float, float]:
    """``jax.nn.initializers``' effective input and output sizes of a linear or convolutional kernel."""
    if isinstance(in_axis, int) and in_axis == -2 and len(shape) <= 1:
        raise ValueError(f"variance_scaling needs a kernel of at least 2 dimensions with the default in_axis, "
                         f"got shape {tuple(shape)}")
    receptive = math.prod(shape) / _size(shape, in_axis) / _size(shape, out_axis) / _size(shape, batch_axis)
    return _size(shape, in_axis) * receptive, _size(shape, out_axis) * receptive


def variance_scaling(scale: float, mode: str, distribution: str, in_axis: int | Sequence[int] = -2,
                     out_axis: int | Sequence[int] = -1, batch_axis: Sequence[int] = ()):
    """``jax.nn.initializers.variance_scaling(scale, mode, distribution, ...)`` for real floating dtypes, drawn
    flat (the same values; see the module docstring).  Complex dtypes use JAX's own initialiser."""
    if mode not in _MODES:
        raise ValueError(f"mode = {mode!r}: expected one of {_MODES}")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution = {distribution!r}: expected one of {_DISTRIBUTIONS}")
    reference = jax.nn.initializers.variance_scaling(scale, mode, distribution, in_axis, out_axis, batch_axis)

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(n) for n in shape)
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            return reference(key, shape, dtype)
        fan_in, fan_out = _fans(shape, in_axis, out_axis, batch_axis)
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2,
                       "fan_geo_avg": (fan_in * fan_out) ** 0.5}[mode]
        variance = jnp.array(scale / denominator, dtype=dtype)
        flat = (math.prod(shape),)
        if distribution == "truncated_normal":  # the constant: std of a standard normal truncated to (-2, 2)
            stddev = jnp.sqrt(variance) / jnp.array(0.87962566103423978, dtype)
            return jax.random.truncated_normal(key, -2, 2, flat, dtype).reshape(shape) * stddev
        if distribution == "normal":
            return jax.random.normal(key, flat, dtype).reshape(shape) * jnp.sqrt(variance)
        return jax.random.uniform(key, flat, dtype, -1).reshape(shape) * jnp.sqrt(3 * variance)

    return init


def lecun_normal():
    """flax's default kernel initialiser (``nnx.Linear``, ``nnx.Conv``), drawn flat."""
    return variance_scaling(1.0, "fan_in", "truncated_normal")


def embed_init():
    """flax's default ``nnx.Embed`` initialiser (``variance_scaling(1, "fan_in", "normal", out_axis=0)``), drawn
    flat."""
    return variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def normal(stddev: float = 1e-2):
    """``jax.nn.initializers.normal(stddev)``, drawn flat."""
    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(n) for n in shape)
        return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape) * jnp.array(stddev, dtype)

    return init

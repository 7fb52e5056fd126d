"""Sums over parameter-sized arrays written as matrix-vector products (private).

On XLA:CPU a ``reduce`` over a long axis is split into windows of 32 (a tree reduction, for accuracy) and runs
as a generic reduction kernel; a product with a vector of ones runs as a GEMV, which is vectorised.  Measured on
the benchmark MLP (64-256-256-10, ``benchmarks/trajectory.py``), CPU time of one thread, alternating with the
previous code: the step with every default observable took 1.64 ms with ``tree_dot``'s sums written as GEMVs
against 1.85-1.87 ms (a plain step 0.74 ms); the per-unit sums as GEMVs saved another 0.15 ms.  The value is
the same up to the order of the additions (both accumulate in the array's dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Arrays up to this size are summed by ``jnp.sum`` (one small kernel; a GEMV would be two).
_SMALL = 256


def matmul_highest(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision: a float32 product at JAX's default precision may round its operands to TF32
    (recent NVIDIA GPUs) or bfloat16 (TPU), 10 or 7 bits of mantissa, which a sum must not do (a ``jnp.sum`` does
    not); XLA:CPU computes it the same either way."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def sum_all(x: jax.Array) -> jax.Array:
    """``jnp.sum(x)``."""
    if x.ndim < 2 or x.size <= _SMALL:
        return jnp.sum(x)
    m = jnp.reshape(x, (x.shape[0], -1))
    return jnp.sum(matmul_highest(m, jnp.ones((m.shape[1],), m.dtype)))


def sum_except(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.sum(x, axis=every axis but axis)``, shape ``(x.shape[axis],)``."""
    axis = axis % x.ndim
    if x.ndim == 1:
        return x
    if x.size <= _SMALL:
        return jnp.sum(x, axis=tuple(i for i in range(x.ndim) if i != axis))
    if axis == x.ndim - 1:
        m = jnp.reshape(x, (-1, x.shape[-1]))
        return matmul_highest(jnp.ones((m.shape[0],), m.dtype), m)
    if axis == 0:
        m = jnp.reshape(x, (x.shape[0], -1))
        return matmul_highest(m, jnp.ones((m.shape[1],), m.dtype))
    # a middle axis: sum the leading axes by a GEMV, then the trailing ones
    lead = jnp.reshape(x, (-1,) + x.shape[axis:])
    m = jnp.reshape(lead, (lead.shape[0], -1))
    rest = matmul_highest(jnp.ones((m.shape[0],), m.dtype), m)
    return sum_except(jnp.reshape(rest, x.shape[axis:]), 0)


def vdot(x: jax.Array, y: jax.Array) -> jax.Array:
    """``jnp.sum(x * y)``."""
    return sum_all(x * y)

"""The mean-field two-layer network and its permutation quotient, the empirical particle measure (THEORY section 1).

``f(x) = (1/n) sum_j w_out,j sigma(w_in,j . x + b_j)``.  The network is a function of the empirical measure
``mu_n = (1/n) sum_j delta_{theta_j}`` of its particles ``theta_j = (w_in,j, b_j, w_out,j)``: the orbit of the
permutation group ``S_n``, i.e. the quotient, *is* ``mu_n``.  Functions of ``mu_n`` (its moments, kernel
distances between two particle sets) are therefore exact quotient observables.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..symmetry import Permutation, Product, Rescale
from ._activations import check_activation, get_activation, is_homogeneous
from ._checks import check_flag, check_input, check_param_dtype, check_rngs, check_sizes
from ._init import normal


class MeanField(nnx.Module):
    """``f(x) = (1/width) sum_j w_out,j sigma(w_in,j . x + b_j)`` (mean-field scaling).

    Args:
        din, width, dout: input dimension, number of particles ``n``, output dimension.
        activation: as for :class:`~quotient_sgd.models.MLP` (default ``"relu"``).
        param_dtype: parameter dtype (inputs are cast to it; with bfloat16 / float16 the mean over the particles
            is summed and divided in float32 and the output rounded once to the dtype).
        rngs: ``nnx.Rngs``.  Particles are i.i.d.: ``w_in ~ N(0, 1/din)``, ``b = 0``, ``w_out ~ N(0, 1)``, so
            ``mu_n`` approximates a fixed measure as ``width -> infinity`` and ``f`` stays O(1).

    Parameter paths (the particle axis is axis 0 of each): ``("w_in",)`` ``(width, din)``, ``("b",)``
    ``(width,)``, ``("w_out",)`` ``(width, dout)``.
    """

    def __init__(self, din: int, width: int, dout: int, *, activation: str = "relu", param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.activation = check_activation(activation)
        din, width, dout = check_sizes("MeanField", din=din, width=width, dout=dout)
        param_dtype = check_param_dtype("MeanField", param_dtype)
        check_rngs("MeanField", rngs)
        self.width = width
        self.w_in = nnx.Param(normal(1.0)(rngs.params(), (width, din), param_dtype) / math.sqrt(din))
        self.b = nnx.Param(jnp.zeros((width,), param_dtype))
        self.w_out = nnx.Param(normal(1.0)(rngs.params(), (width, dout), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_input("MeanField", x, self.w_in[...].T)
        bias = jnp.reshape(self.b[...], (1,) * (x.ndim - 1) + (-1,))
        h = get_activation(self.activation)(x @ self.w_in[...].T + bias)
        # the mean over particles is summed and divided in float32 at least, then rounded once to the parameters'
        # dtype: in float16 the width itself overflowed beyond 65504 (MeanField(4, 100000, 2, param_dtype="float16")
        # gave outputs of exactly 0, a division by inf) and so could the sum of width terms; in bfloat16 a width
        # of 257 was read as 256.  float32 / float64 results are unchanged.
        acc = jnp.dtype(jnp.float32) if jnp.finfo(h.dtype).bits < 32 else h.dtype
        s = jnp.matmul(h, self.w_out[...], preferred_element_type=acc)
        return (s / jnp.asarray(self.width, acc)).astype(h.dtype)

    def symmetries(self) -> Product:
        """``"permutation/particles"``: ``S_n`` on axis 0 of ``w_in``, ``b``, ``w_out`` (the sum over particles is
        order-free), and, for relu / leaky_relu / identity, ``"rescale/particles"``: ``(w_in,j, b_j) -> a_j (w_in,j,
        b_j)``, ``w_out,j -> w_out,j / a_j`` (positive homogeneity).  The two overlap; :class:`Product` composes
        them as words.  Not declared (so not in the vertical space, canonical points or invariants): for tanh (odd)
        the sign flip ``theta_j -> -theta_j`` of each particle, and for the identity activation the ``GL(width)``
        acting on the particle axis (``f`` depends on ``w_in^T w_out`` and ``b^T w_out`` only)."""
        units = ((("w_in",), 0), (("b",), 0), (("w_out",), 0))
        comps = []
        if is_homogeneous(self.activation):
            comps.append(Rescale(incoming=units[:2], outgoing=units[2:], name="rescale/particles"))
        comps.append(Permutation(members=units, name="permutation/particles"))
        return Product(comps, name="MeanField")


def particles(params, *, balanced: bool = False) -> jax.Array:
    """The particle array ``(width, din + 1 + dout)``, row ``j`` = ``(w_in,j, b_j, w_out,j)``.

    Args:
        params: a :class:`MeanField` model, or its parameters (``nnx.State`` / dict with ``w_in``, ``b``,
            ``w_out``).
        balanced: rescale every particle to the balanced point of its rescale orbit,
            ``|(w_in,j, b_j)| = |w_out,j|`` (the canonical representative of THEORY section 1; particles with a
            zero half are left as they are).  Only meaningful for a positively homogeneous activation; then
            functions of the balanced particles are invariant under rescale as well as permutation.

    Leaves of different dtypes (a float64 bias with float32 weights) are joined in their common floating dtype.
    ``ValueError`` naming ``params`` when they are not a mean-field network's (another model's parameters, or arrays
    of other shapes).
    """
    balanced = check_flag("particles", "balanced", balanced)
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    try:
        w_in, b, w_out = (jnp.asarray(params[k][...]) for k in ("w_in", "b", "w_out"))
    except (KeyError, TypeError, IndexError):  # (a bare KeyError 'w_in' for the parameters of another model)
        w_in = None
    if w_in is None or w_in.ndim != 2 or b.shape != w_in.shape[:1] or w_out.ndim != 2 or w_out.shape[0] != b.shape[0]:
        got = (f"w_in {w_in.shape}, b {b.shape}, w_out {w_out.shape}" if w_in is not None
               else f"an object of type {type(params).__name__} without them")
        raise ValueError(f"particles: params must be a MeanField model or its parameters, w_in (width, din), b "
                         f"(width,) and w_out (width, dout); got {got}")
    dtype = _common_float(w_in, b, w_out)  # (a float64 bias with float32 weights failed under strict promotion)
    w_in, b, w_out = w_in.astype(dtype), b.astype(dtype), w_out.astype(dtype)
    pin = jnp.concatenate([w_in, b[:, None]], axis=1)
    if balanced:
        # from the squared norms, a = (|out|^2 / |in|^2)^(1/4): the norms' sqrt'(0) is infinite, and a particle with
        # a zero half (kept as it is, a = 1) made jax.grad of the balanced particles NaN.  Computed in float32 at
        # least and rounded once: in float16 a squared norm above 65504 (an entry of 256, a point of the rescale
        # orbit) was infinite, and the particle (300, 0; 0.01) came out (0, 0; inf) instead of (1.73, 0; 1.73)
        wide = _common_float(pin, low=False)
        pw, ow = pin.astype(wide), w_out.astype(wide)
        sin = jnp.sum(jnp.square(pw), axis=1)
        sout = jnp.sum(jnp.square(ow), axis=1)
        ok = (sin > 0) & (sout > 0)
        a = jnp.where(ok, jnp.sqrt(jnp.sqrt(jnp.where(ok, sout, 1) / jnp.where(ok, sin, 1))), 1)[:, None]
        pin, w_out = (pw * a).astype(dtype), (ow / a).astype(dtype)
    return jnp.concatenate([pin, w_out], axis=1)


def particle_moments(p: jax.Array) -> dict[str, jax.Array]:
    """First and second moments of the empirical measure ``mu_n = (1/n) sum_j delta_{p_j}``.

    Returns ``{"mean": (k,), "second_moment": (k, k)}`` with ``mean = (1/n) sum_j p_j`` and
    ``second_moment = (1/n) sum_j p_j p_j^T``; both are invariant under permutations of the rows of ``p``.
    Integer particles are read as the default float, bfloat16 / float16 ones are computed in float32 (the dtype of
    the result), as the model sums its particles: in float16 a count above 65504 was infinite, so the moments of
    70000 particles were NaN, and the bfloat16 sums rounded at every particle.  ``ValueError`` unless ``p`` is
    ``(n, k)`` with ``n >= 1``.
    """
    p = _particle_set("particle_moments", "p", p)
    if p.ndim != 2 or not p.shape[0]:
        # a 1-D p gave scalar moments, a 3-D one a bare matmul error, an empty one a NaN mean
        raise ValueError(f"particle_moments: p must be a particle set (n, k) with n >= 1 particles, got shape "
                         f"{p.shape}")
    p = p.astype(_common_float(p, low=False))
    n = jnp.asarray(p.shape[0], p.dtype)
    return {"mean": jnp.sum(p, axis=0) / n, "second_moment": (p.T @ p) / n}


def _particle_set(fn: str, name: str, x) -> jax.Array:
    """``x`` as an array of real numbers (``TypeError`` naming ``fn`` and ``name`` otherwise)."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)  # (a Tracer is a jax.Array)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == bool):
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; particle sets must be real numbers (floating or "
                        f"integer)")
    return x


def _common_float(*arrays, low: bool = True):
    """The common floating dtype of ``arrays`` (``jnp.promote_types``, which strict promotion refuses between two
    float widths); integers / bools read as the default float; bfloat16 / float16 kept when ``low``, else
    float32."""
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.dtype(jnp.result_type(*(x.dtype for x in arrays)))
    if not jnp.issubdtype(dtype, jnp.floating):  # integers / bools
        dtype = jnp.dtype(jnp.asarray(0.0).dtype)
    if not low and jnp.finfo(dtype).bits < 32:
        dtype = jnp.dtype(jnp.float32)
    return dtype


def mmd(p: jax.Array, q: jax.Array, *, bandwidth: float = 1.0, squared: bool = False) -> jax.Array:
    """Maximum mean discrepancy between the empirical measures of particle sets ``p`` ``(n, k)``, ``q`` ``(m, k)``.

    Gaussian kernel ``k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2))``;
    ``MMD^2 = mean k(p, p) + mean k(q, q) - 2 mean k(p, q)`` (the biased V-statistic: the exact squared RKHS
    distance between the two empirical measures, so ``MMD(p, p) = 0``, ``MMD > 0`` for different measures since
    the Gaussian kernel is characteristic, and it is invariant under permutations of either set's particles).

    Returns ``MMD`` (``sqrt`` of ``max(MMD^2, 0)``), or ``MMD^2`` with ``squared=True`` (smooth everywhere; use
    it to differentiate).

    ``p`` and ``q`` may differ in dtype (a float32 and a float64 set, array-likes, integers): both are computed in
    their common floating dtype (``jnp.promote_types``; integers read as the default float, bfloat16 / float16 in
    float32, whose rounding would swamp the cancelling sum), which is the dtype of the result.

    Resolution: the three kernel means are of order 1 and cancel, so ``MMD^2`` carries an absolute rounding error
    of a few ``eps`` of that dtype, and an ``MMD`` below about ``sqrt(eps)`` is not resolved ("> 0 for different
    measures" holds in exact arithmetic only).  Measured in float32 (bandwidth 1, ``p`` standard normal ``(10, 3)``
    and ``(100, 8)``, ``q = p`` plus noise of size ``d``): at ``d = 1e-2`` 5e-4 / 6e-5 relative error, at
    ``d = 1e-3`` (MMD 5e-4 / 3e-4) 30% / 2%, at ``d = 1e-4`` exactly 0 for an MMD of 5e-5 / 3e-5.  Compare nearby
    particle sets in float64 (the same sets against an 80-bit computation: 2e-10 relative at ``d = 1e-3``, 7e-8
    at ``d = 1e-4``).

    Raises ``ValueError`` naming the argument for particle sets that are not matrices with the same number of
    columns, a known ``bandwidth`` that is not a finite number > 0 (0 gave NaN: ``0 / 0`` on the diagonal), and a
    ``squared`` that is not a bool; ``TypeError`` naming it for a complex (or non-numeric) particle set.
    """
    squared = check_flag("mmd", "squared", squared)
    p, q = _particle_set("mmd", "p", p), _particle_set("mmd", "q", q)
    dtype = _common_float(p, q, low=False)
    p, q = p.astype(dtype), q.astype(dtype)
    if jnp.ndim(p) != 2 or jnp.ndim(q) != 2 or jnp.shape(p)[1] != jnp.shape(q)[1]:
        raise ValueError(f"mmd: p and q must be particle sets (n, k) and (m, k) with the same k, got shapes "
                         f"{jnp.shape(p)} and {jnp.shape(q)}")
    if not p.shape[0] or not q.shape[0]:  # the mean over no particle is 0 / 0: the MMD was NaN
        raise ValueError(f"mmd: p and q must hold at least one particle each (an empty set has no empirical "
                         f"measure), got shapes {p.shape} and {q.shape}")
    if not isinstance(bandwidth, jax.core.Tracer):
        try:
            value = float(bandwidth)
        except (TypeError, ValueError):
            value = float("nan")
        if isinstance(bandwidth, bool) or not 0 < value < float("inf"):
            raise ValueError(f"mmd: bandwidth must be a finite number > 0 (the Gaussian kernel's length scale), got "
                             f"{bandwidth!r}")
    h2 = 2 * jnp.square(jnp.asarray(bandwidth, p.dtype))

    def kmean(a, c):
        d2 = jnp.sum(jnp.square(a[:, None, :] - c[None, :, :]), axis=-1)
        return jnp.mean(jnp.exp(-d2 / h2))

    m2 = kmean(p, p) + kmean(q, q) - 2 * kmean(p, q)
    return m2 if squared else jnp.sqrt(jnp.maximum(m2, 0))

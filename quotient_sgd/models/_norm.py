"""Normalisation layers whose scale invariance is exact up to float rounding (THEORY section 1, "scale").

A normalisation ``n(z) = (z - mean z) / sqrt(var z + eps)`` is invariant under ``z -> c z`` only when
``eps = 0``.  The usual ``eps = 1e-5`` breaks the scale symmetry by a relative ``eps / (c^2 var z)``, visible at
float32 tolerance for factors ``c`` in ``e^-2 .. e^2``; so these layers default to ``eps = NORM_EPS = 1e-12``
*inside* the variance: a guard against ``0 / 0`` for a constant input (which then maps to ``0``), negligible
against any realistic variance.  The variance is computed in two passes, ``mean((z - mean z)^2)``, which is
itself scale-equivariant and free of the cancellation of ``mean(z^2) - mean(z)^2``.  Inputs of a dtype narrower
than float32 (bfloat16, float16) are normalised in float32 and the result rounded to their dtype once: in bfloat16
the mean, rounded to 8 bits, was off by up to ``2^-9 |mean|``, which ``z - mean`` carries into every output
(measured: a bfloat16 LayerNorm over 256 features of inputs with mean 1 and deviation 0.01 was off the exact
result by 0.195, in units of its unit-variance output, against 0.008 for the exact result rounded to bfloat16;
0.021 for zero-mean inputs), and in float16 ``NORM_EPS = 1e-12`` rounds to 0 (a constant input gave NaN).
With ``eps = 0`` (allowed: exact scale invariance) a zero variance normalises to ``0`` as well.

Inputs are cast to the parameters' dtype, as the models cast theirs (a float16 input to a float32 layer failed
under strict dtype promotion, an integer one in ``jnp.finfo``).

Layouts: features on the last axis.  ``LayerNorm`` normalises over the last axis (per position: over the
channels of a conv map, over ``d_model`` of a token); ``BatchNorm`` normalises every channel over all other
axes (batch and space) in training mode, and keeps running statistics as non-``Param`` NNX state
(``nnx.BatchStat``) for evaluation mode.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import errors, nnx

from ._checks import (
    as_real_input,
    check_eps,
    check_features,
    check_flag,
    check_param_dtype,
    check_sizes,
)

NORM_EPS = 1e-12
"""Default epsilon inside the variance of :class:`LayerNorm` / :class:`BatchNorm` (see the module docstring)."""


def _along_last(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape the per-feature vector ``v`` to broadcast against an ``ndim``-array (explicit rank promotion)."""
    return jnp.reshape(v, (1,) * (ndim - 1) + (v.shape[0],))


def _compute_dtype(dtype, eps: float):
    """The dtype a normalisation of ``dtype`` values is computed in: float32 for a dtype narrower than float32
    (bfloat16, float16: see the module docstring) or where a positive ``eps`` is below ``dtype``'s smallest normal
    number (``NORM_EPS = 1e-12`` rounds to 0 in float16, and a constant input gave ``0 * rsqrt(0) = NaN`` instead
    of 0); ``dtype`` itself otherwise."""
    if jnp.finfo(dtype).bits < 32 or 0 < eps < float(jnp.finfo(dtype).tiny):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _inv_std(var: jax.Array, eps: float) -> jax.Array:
    """``1 / sqrt(var + eps)``, and ``0`` where ``var + eps = 0`` (``eps = 0`` and a constant input): there the
    centred value is ``0`` too, and ``0 * rsqrt(0)`` was NaN; the constant input maps to ``0``, as with ``eps > 0``.
    The inner ``where`` keeps the derivative finite."""
    v = var + jnp.asarray(eps, var.dtype)
    ok = v > 0
    return jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, v, jnp.ones_like(v))), jnp.zeros_like(v))


def _normalise(z: jax.Array, axes: tuple[int, ...], eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``((z - mean) / sqrt(var + eps), mean, var)`` over ``axes``; the first in ``z``'s dtype, the statistics in
    the dtype they were computed in (:func:`_compute_dtype`)."""
    zz = z.astype(_compute_dtype(z.dtype, eps))
    mean = jnp.mean(zz, axis=axes, keepdims=True)
    zc = zz - mean
    var = jnp.mean(jnp.square(zc), axis=axes, keepdims=True)
    return (zc * _inv_std(var, eps)).astype(z.dtype), mean, var


class LayerNorm(nnx.Module):
    """``y = gamma * (z - mean z) / sqrt(var z + eps) + beta`` over the last axis.

    Params: ``scale`` (``gamma``, shape ``(C,)``, init 1) and ``bias`` (``beta``, ``(C,)``, init 0).
    Exactly invariant (to rounding) under ``z -> c z``, ``c > 0``: the weights producing ``z`` carry the scale
    symmetry of THEORY section 1 as one block.
    """

    def __init__(self, num_features: int, *, eps: float = NORM_EPS, param_dtype=jnp.float32):
        (num_features,) = check_sizes("LayerNorm", num_features=num_features)
        self.num_features = num_features
        self.eps = check_eps("LayerNorm", "eps", eps)
        param_dtype = check_param_dtype("LayerNorm", param_dtype)
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, z: jax.Array) -> jax.Array:
        z = as_real_input("LayerNorm", z, self.scale[...].dtype)
        check_features("LayerNorm", z, self.num_features)
        y, _, _ = _normalise(z, (z.ndim - 1,), self.eps)
        return y * _along_last(self.scale[...], z.ndim) + _along_last(self.bias[...], z.ndim)


class BatchNorm(nnx.Module):
    """Per-channel batch normalisation over all axes but the last.

    Training mode (``use_running_average=False``, the default; ``model.train()``): normalise with the batch
    statistics and update the running ones, ``r <- momentum r + (1 - momentum) batch`` (biased batch variance);
    an empty input (no element to average over) returns an empty output and leaves them as they are.
    Evaluation mode (``model.eval()``): normalise with the running statistics.
    Params ``scale``, ``bias`` as in :class:`LayerNorm`; state ``mean``, ``var`` are ``nnx.BatchStat`` (not
    ``nnx.Param``), so ``nnx.split(model, nnx.Param, ...)`` puts them in the non-parameter state.  They are held in
    ``param_dtype``, or in float32 for a narrower one (bfloat16, float16), where the running average would stall.

    In training mode the output is invariant under ``z[..., k] -> c_k z[..., k]`` for every channel ``k``
    separately (the per-channel scale symmetry).  In evaluation mode it is not, unless the running statistics
    are transformed alongside (they are state, not parameters): symmetries are declared for the training-mode
    function.

    The running statistics thread through ``nnx.split`` / ``nnx.merge`` also under ``jax.grad`` of a function that
    merges the model from state split outside it: the merged model takes new ``BatchStat`` Variables (NNX forbids
    mutating those of an outer trace) and ``nnx.split`` of it returns the updated statistics; the state passed in
    is left as it was.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = NORM_EPS,
        momentum: float = 0.9,
        use_running_average: bool = False,
        param_dtype=jnp.float32,
    ):
        (num_features,) = check_sizes("BatchNorm", num_features=num_features)
        try:
            ok = not isinstance(momentum, (bool, str, bytes)) and 0 <= float(momentum) <= 1  # (float('0.5') reads text)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"BatchNorm: momentum must be a number in [0, 1], got {momentum!r}")
        self.num_features = num_features
        self.eps = check_eps("BatchNorm", "eps", eps)
        self.momentum = float(momentum)
        self.use_running_average = check_flag("BatchNorm", "use_running_average", use_running_average)
        param_dtype = check_param_dtype("BatchNorm", param_dtype)
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        # float32 at least (as flax's own BatchNorm keeps them): a running average stored in bfloat16 stops moving
        # once (1 - momentum) |batch - running| is below half its spacing, and stalled 0.4-1.75 standard deviations
        # of the input below the batch mean (inputs of mean 1.37 / 5.3 / 20, deviation 0.05 / 0.2 / 0.5, 400 steps)
        stat_dtype = jnp.dtype(jnp.float32) if jnp.finfo(param_dtype).bits < 32 else param_dtype
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), stat_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), stat_dtype))

    def __call__(self, z: jax.Array) -> jax.Array:
        z = as_real_input("BatchNorm", z, self.scale[...].dtype)
        check_features("BatchNorm", z, self.num_features)
        nd = z.ndim
        if self.use_running_average:
            cd = _compute_dtype(z.dtype, self.eps)
            mean = _along_last(self.mean[...], nd).astype(cd)
            var = _along_last(self.var[...], nd).astype(cd)
            y = ((z.astype(cd) - mean) * _inv_std(var, self.eps)).astype(z.dtype)
        else:
            y, mean, var = _normalise(z, tuple(range(nd - 1)), self.eps)
            if not math.prod(z.shape[:-1]):
                # an empty batch has no statistics: its mean and variance are 0 / 0 = NaN, which the update wrote
                # into the running ones (and every evaluation-mode output after it was NaN); they are kept
                return y * _along_last(self.scale[...], nd) + _along_last(self.bias[...], nd)
            m = jnp.asarray(self.momentum, self.mean[...].dtype)
            new_mean = m * self.mean[...] + (1 - m) * jnp.reshape(mean, (-1,)).astype(m.dtype)
            new_var = m * self.var[...] + (1 - m) * jnp.reshape(var, (-1,)).astype(m.dtype)
            try:
                self.mean[...] = new_mean
                self.var[...] = new_var
            except errors.TraceContextError:
                # The statistics' Variables come from an outer trace: a model merged inside jax.grad from state
                # split outside it (``jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)(x)))``).  NNX forbids
                # mutating them there; this module belongs to the current trace, so it takes new Variables (the
                # caller's state is left as it was; ``nnx.split`` of this module returns the updated statistics).
                self.mean = nnx.BatchStat(new_mean)
                self.var = nnx.BatchStat(new_var)
        return y * _along_last(self.scale[...], nd) + _along_last(self.bias[...], nd)

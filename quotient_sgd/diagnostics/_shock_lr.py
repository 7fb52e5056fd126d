"""Shock-aware learning-rate control: an Optax wrapper that keeps the step's fold / shock numbers at a target.

The wrapper measures, from successive gradients and its own previous update, the curvature of the loss along the
step actually taken (THEORY section 4),

    kappa_k = <g_k - g_{k-1}, Delta_{k-1}> / |Delta_{k-1}|^2,

and the step's effective learning rate ``h = |u| / |g|`` of the inner optimiser's proposed update ``u`` (``= eta``
for plain gradient descent, so the numbers below are exactly THEORY's ``eta kappa``).  Predicted numbers of the
proposed step: fold ``F = h max(0, kappa)`` (the explicit step map folds at 1 and is unstable at 2: the edge of
stability) and shock ``S = h max(0, -kappa)`` (characteristics of the coarse-grained flow cross within the step
at 1, THEORY section 3).

**Policy.** The proposed update is multiplied by ``s``:

- ``policy="cap"`` (default): ``s = min(1, fold_target / F, shock_target / S)``: never lengthen the inner
  optimiser's step, shorten it just enough to keep ``F <= fold_target`` and ``S <= shock_target``.  With
  ``fold_target < 2`` this prevents edge-of-stability spikes and catapults; with ``fold_target`` in (1, 2) the
  iteration stays stable but oscillates (folds) along the sharpest direction.
- ``policy="track"``: ``s = fold_target / F`` (clipped to ``[min_scale, max_scale]``): hold the fold number at the
  target, lengthening the step in flat regions up to ``max_scale`` times the inner step (pass ``max_scale > 1``:
  at the default 1 it only shortens).  A ``fold_target`` schedule above 2 for a few steps *deliberately
  crosses* the stability edge (e.g. to trigger a catapult into a flatter region) and then returns below it.

``fold_target`` / ``shock_target`` may be numbers or schedules ``count -> value``.  Until a curvature has been
measured (the first step, and the steps after it while every update was exactly zero, e.g. a warm-up from a
learning rate of 0) ``s = init_scale``.  A step that follows an exactly zero update measures nothing (the
parameters did not move, ``Delta_{k-1} = 0``): it keeps the curvature known from the earlier steps, and its scale
follows that curvature as on any other step; the moving average skips it.  So does a step whose gradient, or
the one before it, is not finite (an overflow the inner optimiser skips, e.g. ``optax.apply_if_finite``): it
measures nothing, and a zero update of the inner optimiser stays zero.  ``curvature_decay`` in [0, 1) smooths
kappa by an exponential moving average over the measurements (useful with mini-batch gradient noise, which enters
kappa through the two different batches), started at the first measurement; 0 uses the latest estimate.  The
state has a fixed structure (safe inside ``lax.scan``, vmap and ``inject_hyperparams`` of the inner optimiser or
of this wrapper: ``optax.inject_hyperparams(shock_aware_lr)(inner, fold_target=1.8)``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..optim._spec import accepted_extra_args, with_extra_args
from ._series import real_kind

Target = Union[float, Callable[[jax.Array], jax.Array]]


class ShockAwareState(NamedTuple):
    count: jax.Array  # steps taken
    scale: jax.Array  # s applied at the last step
    curvature: jax.Array  # (smoothed) kappa along the last step
    fold_number: jax.Array  # predicted fold number of the step taken (s F)
    shock_number: jax.Array  # predicted shock number of the step taken (s S)
    prev_grads: Any
    prev_updates: Any
    inner_state: Any
    measurements: jax.Array  # curvatures measured so far (0: none known yet, the scale is init_scale)


def _dot(a, b, dtype):
    """Euclidean inner product of two trees, each leaf's product accumulated in ``dtype`` (a tree mixing float
    dtypes, e.g. bfloat16 and float32 leaves, has no implicit promotion under strict dtype promotion)."""
    return sum((jnp.sum(x.astype(dtype) * y.astype(dtype)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
               jnp.zeros((), dtype))


def _stat_dtype(params):
    """The dtype of the wrapper's scalars (scale, curvature, fold / shock numbers): the widest floating dtype of
    the parameters, at least float32 (float64 parameters get a float64 scale, not one rounded to float32)."""
    dts = [jnp.dtype(getattr(x, "dtype", None) or jnp.asarray(x).dtype) for x in jax.tree.leaves(params)]
    dts = [d for d in dts if jnp.issubdtype(d, jnp.floating)]
    return max(dts + [jnp.dtype(jnp.float32)], key=lambda d: d.itemsize)


def _value(name: str, t: Target, count, dtype):
    """The target ``t`` (a number or a schedule ``count -> value``) at ``count``, a scalar of ``dtype``.

    Raises:
        ValueError: a schedule whose value is not one number (its shape is known when traced): one of shape (1,)
            turned the scale, and every scalar parameter it multiplied, into shape (1,) (a shape change that
            ``lax.scan`` refuses), one of shape (2,) failed in a bare broadcasting TypeError."""
    v = jnp.asarray(t(count) if callable(t) else t)
    if v.shape != ():
        raise ValueError(f"shock_aware_lr: {name}={t!r} is not allowed: its value has shape "
                         f"{v.shape}; need a schedule count -> one number (shape ())")
    return v.astype(dtype)


def _limit(target, number):
    """``target / number``, the scale that brings ``number`` to ``target``; ``inf`` (no limit) where ``number`` is
    not above the fourth root of the smallest normal number of its dtype (``1.1e-10`` in float32, where
    ``target / number`` is far past any scale's bounds): there the derivative ``target / number^2`` would
    overflow, and ``jax.grad`` through an unselected scale was NaN (``0 * inf``)."""
    big = number > jnp.asarray(jnp.finfo(number.dtype).tiny, number.dtype) ** 0.25
    return jnp.where(big, target / jnp.where(big, number, 1.0), jnp.inf)


def _check_positive(name: str, value, schedule: bool = True) -> None:
    """A concrete number (Python, NumPy or JAX scalar) must be finite and > 0; schedules (where ``schedule``: the
    targets) and traced values (a target swept under ``vmap`` or injected by ``optax.inject_hyperparams``) cannot
    be checked inside a traced step and are used as they come (a non-positive target pins the scale at
    ``min_scale``).  NumPy / JAX scalars were let through: a ``fold_target`` of ``np.float32(0)`` pinned every step
    at ``min_scale``.  The scales take no schedule: one failed in an unnamed ``float()`` or ``>`` TypeError."""
    if (schedule and callable(value)) or isinstance(value, jax.core.Tracer):
        return
    try:
        x = None if callable(value) else np.asarray(value)
    except Exception:  # noqa: BLE001 - not array-like: reported below
        x = None
    if x is None or x.ndim != 0 or real_kind(x.dtype) not in "iuf":  # (a bfloat16 value was refused)
        also = " or a schedule count -> value" if schedule else " (a number: the scales take no schedule)"
        raise ValueError(f"shock_aware_lr: {name}={value!r} is not allowed; need a finite number > 0{also}")
    if not 0 < float(x) < float("inf"):
        raise ValueError(f"shock_aware_lr: {name}={value!r} is not allowed; need a finite number > 0")


def shock_aware_lr(inner: optax.GradientTransformation, *, fold_target: Target = 1.8,
                   shock_target: Target = 1.0, policy: str = "cap", init_scale: float = 1.0,
                   min_scale: float = 1e-3, max_scale: float = 1.0,
                   curvature_decay: float = 0.0) -> optax.GradientTransformation:
    """Wrap ``inner`` (any Optax optimiser producing the final update) with shock-aware step control.

    Args:
        inner: the optimiser whose updates are scaled (e.g. ``optax.sgd(0.1)``, ``optax.adamw(...)``); the
            update's extra keyword arguments (``value=`` of ``optax.contrib.reduce_on_plateau``, those
            :func:`~quotient_sgd.optim.train` passes) are passed on to it.
        fold_target: target / cap for the fold number ``h max(0, kappa)`` (number or schedule).
        shock_target: cap for the shock number ``h max(0, -kappa)``.
        policy: ``"cap"`` or ``"track"`` (module docstring).
        init_scale: scale of the first step (no curvature measured yet), in ``[min_scale, max_scale]`` (and
            at most 1 with ``"cap"``).
        min_scale, max_scale: bounds of the scale (``"cap"`` also never exceeds 1).
        curvature_decay: EMA factor for kappa.

    The live numbers are in the state: ``state.fold_number``, ``state.shock_number``, ``state.scale``,
    ``state.curvature`` (a :class:`ShockAwareState`; wrapped by :func:`~quotient_sgd.optim.quotient_trajectory`
    it is ``state.inner_state``, and ``optax.tree.get(state, "fold_number")`` then finds two values: the
    trajectory's observable ``eta kappa`` of the step it records, and this transform's, measured with the step
    length actually taken).  These scalars, and the arithmetic of the rule, are in the widest floating dtype of
    the parameters, at least float32 (float64 parameters give a float64 scale).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = shock_aware_lr(optax.sgd(1.5), fold_target=1.0)   # lr 1.5 on curvature 2: fold number 3
        >>> params = jnp.array([1.0]); state = tx.init(params)
        >>> for _ in range(2):
        ...     g = 2.0 * params
        ...     u, state = tx.update(g, state, params)
        ...     params = params + u
        >>> round(float(state.fold_number), 3), round(float(state.scale), 3)
        (1.0, 0.333)
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(f"shock_aware_lr: inner={inner!r} is not allowed; need an Optax GradientTransformation "
                        f"(e.g. optax.sgd(0.1)), got a {type(inner).__name__}")
    if not isinstance(policy, str) or policy not in ("cap", "track"):
        raise ValueError(f"shock_aware_lr: policy={policy!r} is not allowed; need 'cap' or 'track'")
    # under ``optax.inject_hyperparams`` inside jit / scan the numeric arguments arrive as tracers: they are
    # checked when concrete (a Python comparison of a tracer raised TracerBoolConversionError)
    if not isinstance(curvature_decay, jax.core.Tracer):
        try:
            d = np.asarray(curvature_decay)
            ok = d.ndim == 0 and real_kind(d.dtype) in "iuf" and 0.0 <= float(d) < 1.0
        except Exception:  # noqa: BLE001 - not array-like: reported below
            ok = False
        if not ok:
            raise ValueError(f"shock_aware_lr: curvature_decay must be a number in [0, 1), got {curvature_decay!r}")
    for name, value in (("fold_target", fold_target), ("shock_target", shock_target), ("init_scale", init_scale),
                        ("min_scale", min_scale), ("max_scale", max_scale)):
        _check_positive(name, value, schedule=name.endswith("_target"))
    if not any(isinstance(v, jax.core.Tracer) for v in (min_scale, max_scale)) and min_scale > max_scale:
        raise ValueError(f"shock_aware_lr: min_scale={min_scale} > max_scale={max_scale}")
    # "cap" never lengthens the inner optimiser's step: a min_scale above 1 has no scale to give (the clip to
    # [min_scale, min(max_scale, 1)] gave 1), and was reported as an init_scale outside the empty [2.0, 1.0]
    if policy == "cap" and not isinstance(min_scale, jax.core.Tracer) and float(min_scale) > 1:
        raise ValueError(f"shock_aware_lr: min_scale={min_scale!r} is not allowed with policy='cap'; need a number in "
                         f"(0, 1] (the cap only shortens the inner optimiser's step; policy='track' lengthens it up "
                         f"to max_scale)")
    # the first step's scale obeys the same bounds as every other step: [min_scale, max_scale], and "cap" never
    # lengthens the inner optimiser's step (an init_scale of 5 under "cap" took a 5x first step)
    if not any(isinstance(v, jax.core.Tracer) for v in (init_scale, min_scale, max_scale)):
        top = min(float(max_scale), 1.0) if policy == "cap" else float(max_scale)
        if not float(min_scale) <= float(init_scale) <= top:
            raise ValueError(f"shock_aware_lr: init_scale={init_scale!r} is not allowed; need a number in "
                             f"[min_scale, {'min(max_scale, 1)' if policy == 'cap' else 'max_scale'}] = "
                             f"[{float(min_scale)}, {top}] (policy={policy!r})")

    def init(params):
        # a buffer per leaf: train donates the state, and one buffer donated twice is refused
        dt = _stat_dtype(params)
        z = lambda: jnp.zeros((), dt)
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return ShockAwareState(jnp.zeros((), jnp.int32), jnp.ones((), dt), z(), z(), z(), zeros(), zeros(),
                               inner.init(params), jnp.zeros((), jnp.int32))

    # the extra arguments of the update (``value=`` of optax.contrib.reduce_on_plateau, ``value_fn`` / ``grad`` of
    # optax.lbfgs's line search, as quotient_sgd.optim.train passes them) go on to the inner optimiser: refused
    # ("unexpected keyword argument 'value'"), and dropped by optax.with_extra_args_support in train, an inner
    # chain holding reduce_on_plateau failed with "missing 1 required keyword-only argument: 'value'".  Not through
    # optax.with_extra_args_support, which drops them for an inner transformation not typed extra-args aware
    # (optax.MultiSteps, a hand-written GradientTransformation taking **extra_args): with_extra_args hands them on
    inner = with_extra_args(inner)

    def update(grads, state, params=None, **extra_args):
        u, inner_state = inner.update(grads, state.inner_state, params,
                                      **accepted_extra_args(inner.update, extra_args))
        dt = state.scale.dtype  # set by init from the parameters (_stat_dtype)
        dd = _dot(state.prev_updates, state.prev_updates, dt)
        moved = (state.count > 0) & (dd > 0)  # the last update moved the parameters
        diff = jax.tree.map(lambda a, b: a - b, grads, state.prev_grads)
        k_raw = (_dot(diff, state.prev_updates, dt) / jnp.where(moved, dd, 1.0)).astype(dt)
        # a new measurement: the parameters moved and the gradients on both sides of the move are finite.  A
        # non-finite gradient (an overflow the inner optimiser skips, e.g. optax.apply_if_finite, or a NaN batch)
        # gave kappa = -inf or NaN, a NaN scale times the inner optimiser's zero update, NaN parameters at that
        # step, and the curvature, kept or averaged (0 * NaN), stayed NaN for the rest of the run
        have = moved & jnp.isfinite(k_raw)
        k_new = jnp.where(have, k_raw, 0.0).astype(dt)
        ema = jnp.asarray(curvature_decay, dt)
        # the moving average starts at the first measurement and skips a step without one: after an exactly zero
        # update the curvature known from the earlier steps is kept and still sets the scale (the step after a
        # zero update took init_scale and averaged a curvature of 0 in, and a warm-up from lr 0 started the
        # average from 0: the next steps went through uncapped)
        known = state.measurements > 0
        kappa = jnp.where(have, jnp.where(known, ema * state.curvature + (1 - ema) * k_new, k_new),
                          state.curvature)
        known = known | have
        gg, uu = _dot(grads, grads, dt), _dot(u, u, dt)
        # (the square root and the quotients below are taken where they are finite, and so are their derivatives:
        # sqrt(0) of a zero update, and target / max(number, 1e-30) of a zero fold or shock number, whose
        # derivative target / 1e-60 overflows in float32, gave jax.grad of a run through this transform NaN
        # (0 * inf), though no scale the step took depended on them)
        pos = (gg > 0) & (uu > 0)
        h = jnp.where(pos, jnp.sqrt(jnp.where(pos, uu, 1.0) / jnp.where(pos, gg, 1.0)), 0.0).astype(dt)
        h = jnp.where(jnp.isfinite(h), h, 0.0)  # (a non-finite gradient or update: no length to measure)
        fold = h * jnp.maximum(kappa, 0.0)
        shock = h * jnp.maximum(-kappa, 0.0)
        ft = _value("fold_target", fold_target, state.count, dt)
        st = _value("shock_target", shock_target, state.count, dt)
        s_fold = _limit(ft, fold)
        s_shock = _limit(st, shock)
        lo, hi = jnp.asarray(min_scale, dt), jnp.asarray(max_scale, dt)
        if policy == "cap":
            s = jnp.minimum(jnp.minimum(1.0, s_fold), s_shock)
            s = jnp.clip(s, lo, jnp.minimum(hi, 1.0))
        else:
            s = jnp.where(fold > 0, s_fold, hi)
            s = jnp.minimum(s, s_shock)
            s = jnp.clip(s, lo, hi)
        s = jnp.where(known, s, jnp.asarray(init_scale, dt))
        updates = jax.tree.map(lambda x: (s.astype(x.dtype) * x), u)
        new = ShockAwareState(state.count + 1, s, kappa, s * fold, s * shock, grads, updates, inner_state,
                              state.measurements + have.astype(jnp.int32))
        return updates, new

    return optax.GradientTransformationExtraArgs(init, update)

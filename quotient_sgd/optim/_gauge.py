"""Optax transforms that act on the symmetry: horizontal projection of updates and gauge fixing."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._tree import widen
from ..observables import canonical_gradient
from ._spec import accepted_extra_args, check_period, check_wrapped, with_extra_args


class HorizontalState(NamedTuple):
    """The state of :func:`horizontal`: ``inner_state`` is the wrapped optimiser's.  It marks the update as
    horizontal, which :func:`~quotient_sgd.optim.quotient_trajectory` reads to predict the charge drift exactly."""

    inner_state: Any


def horizontal(tx: optax.GradientTransformation, group) -> optax.GradientTransformationExtraArgs:
    """Run ``tx`` and project its update onto the horizontal space at the current parameters (THEORY section 1):
    ``Delta_h = Delta - P_V Delta``.  Removes the gauge drift (the vertical part that weight decay, momentum
    and Adam add); to first order the function moves exactly as under ``tx``.  Its state is a
    :class:`HorizontalState` around ``tx``'s (``optax.inject_hyperparams`` values inside are found as before by
    :func:`~quotient_sgd.optim.set_hyperparams`).

    Example::

        tx = horizontal(optax.adamw(1e-3, weight_decay=0.1), group)
    """
    check_wrapped("horizontal", tx, group)
    inner = with_extra_args(tx)

    def init(params):
        return HorizontalState(inner.init(params))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("horizontal(tx, group) needs params: tx.update(grads, state, params)")
        extra = accepted_extra_args(inner.update, extra_args)
        u, inner_state = inner.update(updates, state.inner_state, params, **extra)
        # low-precision parameters are projected in float32 (widen) and the update keeps its dtype
        return _like(group.horizontal(widen(params), widen(u)), u), HorizontalState(inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


class GaugeFixState(NamedTuple):
    """``inner_state``: the wrapped optimiser's; ``count``: steps taken; ``element``: the canonical element ``k``
    applied at the last step when ``applied`` (``train`` moves non-parameter model state with it)."""

    inner_state: Any
    count: jax.Array
    element: Any = None
    applied: jax.Array | None = None


def gauge_fix(tx: optax.GradientTransformation, group, every: int = 1) -> optax.GradientTransformationExtraArgs:
    """Run ``tx`` on the canonical section: every ``every`` steps the parameters are moved to their canonical
    representative ``c(theta) = k . theta`` before the step (the function is unchanged), and the gradient is
    transported there exactly, ``grad L(k . theta) = J_{k^{-1}}^T grad L(theta)`` (a vector-Jacobian product of
    the linear action; no second pass through the network).  The returned update is
    ``c(theta) + Delta(c(theta)) - theta``, so ``theta + update`` is the step taken from the canonical point.

    Consequence (tested): SGD + ``gauge_fix`` from ``theta`` and from ``g . theta`` give identical iterates after
    the first step, since both start from ``c(theta) = c(g . theta)`` with the same transported gradient.  Put
    it inside :func:`quotient_trajectory`, which then observes the fixed dynamics (its step observables describe
    the step from ``c(theta)``, without the re-gauging jump).

    The optimiser's state follows the units: the unit permutations of the canonical element (the discrete part,
    isometries) are applied to every parameter-shaped leaf of ``tx``'s state (momentum, Adam's moments; also where
    ``optax.masked`` / ``optax.multi_transform`` hold ``optax.MaskedNode`` for the parameters they leave to
    others), to parameter-shaped vectors stacked along a leading axis (``optax.lbfgs``'s memory), to Adafactor's
    factored second moments (``optax.FactoredState``: their row and column statistics) and to SM3's per-axis
    accumulators, so a unit keeps its own velocity when the canonical sort reorders units between steps.  Hence
    SGD / momentum / Adam / Adafactor / SM3 / L-BFGS + ``gauge_fix`` compute the same function at every step
    whether or not the group includes the permutations (tested).  The continuous part of the element is
    not transported: it moves the parameters by ``O(step)`` between consecutive canonical points, and the state of
    an arbitrary optimiser has no known transformation law under it (a momentum transforms like a gradient, Adam's
    second moment does not).

    Non-parameter state that the group also acts on (a BatchNorm model's running statistics follow its
    channels) never reaches the optimiser: the state records the element ``k`` it applied (``element``,
    ``applied``), and :func:`train` given ``model_state`` moves that state with it through its
    ``act_on_model_state`` argument (``functools.partial(model.act_on_batch_stats, group)`` for a BatchNorm
    CNN), so the evaluation-mode function is unchanged by the re-gauging too (tested).  A hand-written loop
    does the same with :func:`gauge_fix_elements`.

    Args:
        tx: the optimiser (its state, e.g. momentum, lives at the canonical points).
        group: the symmetry group; its action must be linear or affine in the parameters.
        every: canonicalise every ``every`` steps (steps in between run ``tx`` unchanged).
    """
    every = check_period("gauge_fix", "every", every)
    check_wrapped("gauge_fix", tx, group)
    inner = with_extra_args(tx)

    def init(params):
        # a placeholder of the canonical element's structure (never applied: applied is False until a fix)
        shapes = jax.eval_shape(group.canonical_element, widen(params))
        element = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        return GaugeFixState(inner.init(params), jnp.zeros((), jnp.int32), element, jnp.zeros((), jnp.bool_))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("gauge_fix(tx, group) needs params: tx.update(grads, state, params)")

        def fixed(_):
            # bfloat16 / float16 parameters are canonicalised in float32 (widen: the group's QR / SVD / eigh have
            # no low-precision kernels on CPU); the inner optimiser sees, and the update keeps, their dtype
            pw = widen(params)
            k = group.canonical_element(pw)
            pc = group.act(k, pw)
            gc = canonical_gradient(group, pw, widen(updates), element=k)
            extra = dict(extra_args)
            if "grad" in extra:  # optax's name for the gradient at params (optax.lbfgs): that at pc is gc
                g = extra["grad"]
                extra["grad"] = _like(gc if g is updates else canonical_gradient(group, pw, widen(g), element=k), g)
            u, s = inner.update(_like(gc, updates), _permute_state(group, k, state.inner_state, params),
                                _like(pc, params), **accepted_extra_args(inner.update, extra))
            step = jax.tree.map(lambda a, b, c: (a + b) - c, pc, widen(u), pw)
            return _like(step, u), s, k, jnp.ones((), jnp.bool_)

        def plain(_):
            u, s = inner.update(updates, state.inner_state, params, **accepted_extra_args(inner.update, extra_args))
            return u, s, state.element, jnp.zeros((), jnp.bool_)

        if every == 1:
            u, s, k, applied = fixed(None)
        else:
            u, s, k, applied = jax.lax.cond(state.count % every == 0, fixed, plain, None)
        return u, GaugeFixState(s, state.count + 1, k, applied)

    return optax.GradientTransformationExtraArgs(init, update)


def _like(tree, ref):
    """``tree`` cast leaf by leaf to the dtypes of ``ref`` (a no-op where they agree)."""
    return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, ref)


def _unit_permutations(group, k):
    """The discrete part of the element ``k`` (the unit permutations, in order); ``None`` when it has none."""
    from ..symmetry import Word

    if isinstance(k, Word):
        keep = [(i, e) for i, e in zip(k.indices, k.elements) if not group.components[i].continuous]
        return Word(tuple(i for i, _ in keep), tuple(e for _, e in keep)) if keep else None
    return None if group.continuous else k


def _permute_state(group, k, state, params):
    """``state`` with the unit permutations of ``k`` applied to every subtree shaped like ``params``, also one where
    ``optax.MaskedNode`` stands for the parameters a transform does not cover (``optax.masked``,
    ``optax.multi_transform``: its momentum or moments of the others)."""
    perm = _unit_permutations(group, k)
    if perm is None:
        return state
    struct = jax.tree.structure(params)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(params)]
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731

    def full(x):
        return jax.tree.structure(x) == struct and [jnp.shape(y) for y in jax.tree.leaves(x)] == shapes

    def partial(x):
        # x has params' structure down to its MaskedNodes (each in place of a parameter or a subtree of them)
        if not any(masked(y) for y in jax.tree.leaves(x, is_leaf=masked)):
            return False
        try:
            ok = jax.tree.map(lambda y, p: masked(y) or (jax.tree_util.treedef_is_leaf(jax.tree.structure(p))
                                                           and jnp.shape(y) == jnp.shape(p)), x, params, is_leaf=masked)
        except (ValueError, TypeError):
            return False
        return all(jax.tree.leaves(ok)) and not all(masked(y) for y in jax.tree.leaves(x, is_leaf=masked))

    def act(x):
        if full(x):
            return group.act(perm, x)
        # a permutation acts leaf by leaf: zeros in the masked places, then the MaskedNodes back
        filled = jax.tree.map(lambda y, p: jax.tree.map(jnp.zeros_like, p) if masked(y) else y, x, params,
                              is_leaf=masked)
        moved = group.act(perm, jax.tree.unflatten(struct, jax.tree.leaves(filled)))
        return jax.tree.map(lambda y, m: y if masked(y) else m, x, moved, is_leaf=masked)

    like = lambda x: full(x) or partial(x)  # noqa: E731
    factored = lambda x: isinstance(x, optax.FactoredState)  # noqa: E731
    sm3 = lambda x: isinstance(x, optax.ScaleBySM3State)  # noqa: E731

    def stacked(x):
        # parameter-shaped vectors stacked along a leading axis (optax.lbfgs's memory of the last steps)
        if jax.tree.structure(x) != struct or not shapes:
            return False
        got = [jnp.shape(y) for y in jax.tree.leaves(x)]
        return all(len(g) == len(s) + 1 and g[1:] == s and g[0] == got[0][0] for g, s in zip(got, shapes))

    def one(x):
        if factored(x):
            return _permute_factored(group, perm, x, params)
        if sm3(x):
            return _permute_sm3(group, perm, x, params)
        if stacked(x):
            return jax.vmap(lambda y: group.act(perm, y))(x)
        return act(x) if like(x) else x

    return jax.tree.map(one, state, is_leaf=lambda x: factored(x) or sm3(x) or stacked(x) or like(x))


def _permute_sm3(group, perm, st, params):
    """SM3's ``optax.ScaleBySM3State`` with the unit permutations ``perm`` applied: ``nu`` is shaped like the
    parameters; ``mu`` holds, per parameter, one accumulator per axis (a vector along it), each broadcast to the
    parameter's shape, moved as the parameter and read off along that axis."""
    leaves, treedef = jax.tree.flatten(params)
    try:
        mus = treedef.flatten_up_to(st.mu)
        nus = treedef.flatten_up_to(st.nu)
    except (ValueError, TypeError):
        return st
    shapes = [tuple(jnp.shape(p)) for p in leaves]
    if any(not isinstance(m, (list, tuple)) or len(m) != len(sh) for m, sh in zip(mus, shapes)):
        return st

    def moved(parts):
        return jax.tree.leaves(group.act(perm, jax.tree.unflatten(treedef, parts)))

    def along(x, i, sh):  # the vector x along axis i, broadcast to sh
        return jnp.broadcast_to(jnp.reshape(x, [1] * i + [sh[i]] + [1] * (len(sh) - i - 1)), sh)

    new_mus = [list(m) for m in mus]
    for i in range(max((len(sh) for sh in shapes), default=0)):
        has = [len(sh) > i for sh in shapes]
        full = moved([along(m[i], i, sh) if h else jnp.zeros(sh, n.dtype)
                      for m, sh, h, n in zip(mus, shapes, has, nus)])
        for j, (f, sh, h) in enumerate(zip(full, shapes, has)):
            if h:
                new_mus[j][i] = f[tuple(slice(None) if a == i else 0 for a in range(len(sh)))]
    new_mus = [type(m)(nm) for m, nm in zip(mus, new_mus)]
    return st._replace(mu=jax.tree.unflatten(treedef, new_mus), nu=jax.tree.unflatten(treedef, moved(nus)))


def _permute_factored(group, perm, st, params):
    """Adafactor's ``optax.FactoredState`` with the unit permutations ``perm`` applied: a factored leaf keeps its
    second moment as a row statistic (axis ``d0`` of the parameter averaged out) and a column statistic (``d1``
    averaged out), the two largest axes (optax's rule); each is broadcast back along its missing axis, moved as the
    parameter, and read off along it (a permutation acts axis by axis, so it stays constant there); an unfactored
    leaf's ``v`` is moved as the parameter.  A state that is not laid out so (``optax.masked``) is left as it is."""
    leaves, treedef = jax.tree.flatten(params)
    try:
        rows, cols, vs = (treedef.flatten_up_to(t) for t in (st.v_row, st.v_col, st.v))
    except (ValueError, TypeError):
        return st
    shapes = [tuple(jnp.shape(p)) for p in leaves]
    dims = [tuple(int(d) for d in np.argsort(sh)[-2:]) if len(sh) >= 2 and tuple(jnp.shape(v)) != sh else None
            for sh, v in zip(shapes, vs)]

    def moved(parts):
        return jax.tree.leaves(group.act(perm, jax.tree.unflatten(treedef, parts)))

    def spread(x, axis, sh):
        return jnp.broadcast_to(jnp.expand_dims(x, axis), sh)

    rows_full = moved([spread(r, d[1], sh) if d else jnp.zeros(sh, r.dtype) for r, d, sh in zip(rows, dims, shapes)])
    cols_full = moved([spread(c, d[0], sh) if d else jnp.zeros(sh, c.dtype) for c, d, sh in zip(cols, dims, shapes)])
    v_full = moved([jnp.zeros(sh, v.dtype) if d else v for v, d, sh in zip(vs, dims, shapes)])
    rows = [jnp.take(m, 0, axis=d[1]) if d else r for m, r, d in zip(rows_full, rows, dims)]
    cols = [jnp.take(m, 0, axis=d[0]) if d else c for m, c, d in zip(cols_full, cols, dims)]
    vs = [v if d else m for m, v, d in zip(v_full, vs, dims)]
    return st._replace(v_row=jax.tree.unflatten(treedef, rows), v_col=jax.tree.unflatten(treedef, cols),
                       v=jax.tree.unflatten(treedef, vs))


def _gauge_fix_states(opt_state) -> list[GaugeFixState]:
    """Every :class:`GaugeFixState` in ``opt_state``, outermost first (the order their elements acted)."""
    is_g = lambda x: isinstance(x, GaugeFixState)  # noqa: E731
    found = []
    for x in jax.tree.leaves(opt_state, is_leaf=is_g):
        if is_g(x):
            found.append(x)
            found.extend(_gauge_fix_states(x.inner_state))
    return found


def gauge_fix_elements(opt_state, prev_opt_state=None):
    """``[(element, applied), ...]`` of every :func:`gauge_fix` in ``opt_state`` after an update, outermost
    first: the canonical element each applied to the parameters at that step (``applied`` a boolean scalar; the
    element is a placeholder when False).  Non-parameter state the group acts on follows the parameters by
    these elements, in this order (what :func:`train` does with ``act_on_model_state``).

    ``prev_opt_state``: the state before that update.  A :func:`gauge_fix` inside a wrapper that can leave its state
    as it was (``optax.MultiSteps`` while it accumulates, ``optax.apply_if_finite`` on a skipped step) did not run
    at such a step, but its state still holds the last step's element and flag; given the previous state, ``applied``
    is also False where its step count did not advance.  Without it such a step read as re-gauged again: under
    ``optax.MultiSteps(gauge_fix(...), 3)`` a model state followed 4 re-gaugings in 6 steps where the parameters
    had 2."""
    now = _gauge_fix_states(opt_state)
    out = [(g.element, g.applied) for g in now]
    if prev_opt_state is None:
        return out
    before = _gauge_fix_states(prev_opt_state)
    if len(before) != len(now):
        raise ValueError(f"gauge_fix_elements: prev_opt_state holds {len(before)} gauge_fix states and opt_state "
                         f"{len(now)}; pass the state before the update that produced opt_state")
    return [(e, jnp.logical_and(a, g.count != b.count)) for (e, a), g, b in zip(out, now, before)]

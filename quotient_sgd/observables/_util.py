"""Small pytree and group helpers shared by the observables (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _tree
from .._reduce import sum_all, sum_except, vdot


def tree_dot(a, b) -> jax.Array:
    """``<a, b>`` summed over all leaves (leaves of several dtypes: in their common one by JAX's standard promotion,
    whatever ``jax_numpy_dtype_promotion`` is; under ``"strict"`` the sum of a float32 and a bfloat16 or float64
    leaf's terms failed with a bare ``TypePromotionError``)."""
    leaves = [vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    if len({x.dtype for x in leaves}) > 1:
        with jax.numpy_dtype_promotion("standard"):
            dt = jnp.result_type(*leaves)
        leaves = [x.astype(dt) for x in leaves]
    return sum(leaves[1:], leaves[0])


def check_hyper(owner: str, name: str, value) -> None:
    """``TypeError`` / ``ValueError`` naming ``owner``'s argument ``name`` unless ``value`` is one real number (a
    Python or NumPy number, or a scalar integer / float array, possibly traced), and, when a Python or NumPy value,
    finite and ``>= 0`` (a learning rate, momentum or weight decay, as :class:`~quotient_sgd.optim.SGDSpec` holds
    them; a JAX array's value is not read, so that a call behaves alike eagerly and under ``jit``).  A string or
    ``None`` failed in JAX's conversion naming neither ("could not convert string to float"), a vector was broadcast
    into a vector of temperatures or an unrelated shape error, and a bool, a negative or NaN rate were taken as they
    came, silently."""
    import numbers

    import numpy as np

    allowed = "a finite real number >= 0 (a scalar)"
    dtype = getattr(value, "dtype", None)
    if isinstance(value, (bool, np.bool_)) or not (
            isinstance(value, numbers.Real) or (dtype is not None and (
                jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)))):
        raise TypeError(f"{owner}: {name}={value!r} is not allowed; need {allowed}")
    if jnp.shape(value) != ():
        raise ValueError(f"{owner}: {name} must be a scalar, got an array of shape {jnp.shape(value)} (for several "
                         f"values, jax.vmap over them)")
    if isinstance(value, (numbers.Real, np.ndarray, np.generic)) and not 0 <= float(value) < float("inf"):
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; need {allowed}")


def check_group(owner: str, group) -> None:
    """``TypeError`` naming ``owner`` unless ``group`` is a symmetry group (``model.symmetries()``).  The
    observables take ``(group, params, ...)`` where the Hessian ones take ``(loss_fn, group, params)``: a loss
    function passed first failed in a bare "'function' object has no attribute 'canonical_element'"."""
    if not all(callable(getattr(group, a, None)) for a in ("canonical_element", "vertical", "invariants")):
        raise TypeError(f"{owner}(group, params, ...): group must be a symmetry group (model.symmetries()), got "
                        f"{type(group).__name__}" + (" (a function: the Hessian observables take loss_fn first, "
                                                     "these take the group first)" if callable(group) else ""))


def check_like(owner: str, ref_name: str, ref, **trees) -> None:
    """``ValueError`` naming the argument unless each of ``trees`` has the leaves of ``ref``: at the same paths
    (the pytree node types may differ, a ``dict`` for an ``nnx.State``), of the same shapes.  The sums over leaves
    zip them and the per-unit sums look leaves up by path: a tree missing a leaf was summed over the leaves the two
    shared, and a leaf of shape ``(1, n)`` against one of ``(n,)`` broadcast, silently (a curvature of 1.032 for
    1.058 with the last leaf of the step left out); a list of the leaves failed with a bare ``KeyError``."""
    want = {k: jnp.shape(x) for k, x in _tree.flatten(ref)[0].items()}
    for name, tree in trees.items():
        got = {k: jnp.shape(x) for k, x in _tree.flatten(tree)[0].items()}
        if got == want:
            continue
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        shapes = [f"{k}: {got[k]} for {want[k]}" for k in want if k in got and got[k] != want[k]]
        what = "; ".join(x for x in (f"no leaf at {missing}" if missing else "",
                                     f"leaves {ref_name} does not have at {extra}" if extra else "",
                                     f"other shapes at {shapes}" if shapes else "") if x)
        raise ValueError(f"{owner}: {name} must be a pytree like {ref_name} (a leaf of the same shape at each of its "
                         f"paths); {name} has {what}")


def tree_sqnorm(a) -> jax.Array:
    return tree_dot(a, a)


def tree_norm(a) -> jax.Array:
    return jnp.sqrt(tree_sqnorm(a))


def tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y, a, b)


def tree_sub(a, b):
    return jax.tree.map(lambda x, y: x - y, a, b)


def tree_scale(c, a):
    return jax.tree.map(lambda x: jnp.asarray(c, x.dtype) * x, a)


def tree_axpy(c, x, y):
    """``c x + y``."""
    return jax.tree.map(lambda u, v: jnp.asarray(c, u.dtype) * u + v, x, y)


def tree_random_normal(key, like):
    """Standard normal entries shaped like ``like``: one draw of the total size per dtype, split over the leaves
    (each ``jax.random.normal`` call is a separate threefry kernel to compile: one per dtype, not per leaf)."""
    leaves, treedef = jax.tree.flatten(like)
    dtypes = sorted({jnp.dtype(x.dtype).name for x in leaves})
    out = [None] * len(leaves)
    for d, k in zip(dtypes, jax.random.split(key, len(dtypes))):
        idx = [i for i, x in enumerate(leaves) if jnp.dtype(x.dtype).name == d]
        sizes = [leaves[i].size for i in idx]
        flat = jax.random.normal(k, (sum(sizes),), d)
        start = 0
        for i, n in zip(idx, sizes):
            out[i] = flat[start:start + n].reshape(leaves[i].shape)
            start += n
    return jax.tree.unflatten(treedef, out)


def components(group) -> tuple[Any, ...]:
    """The components of a :class:`~quotient_sgd.symmetry.Product`, or ``(group,)`` for a single action."""
    comps = getattr(group, "components", None)
    return tuple(comps) if comps is not None else (group,)


def per_component(group, value) -> dict[str, Any]:
    """Normalise a group method's output to ``{component name: value}`` (a Product already returns a dict)."""
    if getattr(group, "components", None) is not None:
        return dict(value)
    return {group.name: value}


def charge_linear(group) -> dict[str, bool]:
    """``{component name: whether its charge is linear (translation) rather than quadratic}``."""
    if hasattr(group, "charge_is_linear"):
        return dict(group.charge_is_linear())
    lin = getattr(group, "charge_linear", False)
    if isinstance(lin, dict):
        return dict(lin)
    return {group.name: bool(lin)}


def charges_dict(group, params) -> dict[str, jax.Array]:
    return per_component(group, group.charges(params))


def charge_change(group, params, new_params) -> dict[str, Any]:
    """``Q(new_params) - Q(params)`` for every charge (``{component name: array}``, as :func:`charges_dict`), from the
    difference ``delta = new_params - params`` rather than as a difference of the two charges.

    Every charge is a quadratic form or a linear one (THEORY section 2), so exactly ``Q(theta + delta) - Q(theta) =
    <grad Q(theta), delta> + Q(delta)`` (one Jacobian-vector product of the charges) and ``S(theta + delta) - S(theta)
    = S(delta)``.  Its rounding is that of ``|theta| |delta|``, not of ``|theta|^2``: the difference of the charges
    cancelled, and a float32 step's drift, ``eta^2 Q(g)`` for SGD, far below ``eps Q``, came out as rounding (a
    64-32-10 MLP at ``eta = 0.01``: 15% of the drift off the exact change of its stored float32 parameters, 620% at
    ``eta = 0.001``; now 1e-5).  ``delta`` is formed as stored: ``new_params - params`` of two floats of one dtype
    within a factor 2 of each other is exact."""
    delta = jax.tree.map(lambda a, b: a - b, new_params, params)
    # (a leaf that is not floating point, which no action moves, takes the float0 tangent jvp requires)
    tangent = jax.tree.map(lambda d: d if jnp.issubdtype(jnp.result_type(d), jnp.inexact)
                           else np.zeros(jnp.shape(d), jax.dtypes.float0), delta)
    _, first = jax.jvp(lambda p: charges_dict(group, p), (params,), (tangent,))
    second = charges_dict(group, delta)
    linear = charge_linear(group)
    return {k: v if linear.get(k, False) else jax.tree.map(jnp.add, first[k], v) for k, v in second.items()}


def unit_sum(trees, members, fn) -> jax.Array:
    """Per-unit sum over ``members = ((path, axis_or_None), ...)`` of ``fn(leaf...)`` reduced over all other
    axes; ``axis=None`` means one unit for the whole block (shape ``(1,)``).  ``trees``: a tuple of parameter-like
    trees, ``fn`` taking one leaf of each (``(params,)`` for one); a tree that is not a tuple is taken as the one
    tree.  (Parameters that are themselves a tuple, ``(W1, b1, W2, b2)`` with paths ``(0,)``, ``(1,)``, ..., go in
    a tuple of one: taken as they came, their leaves were read as separate trees, a ``KeyError: (0,)``.)"""
    flat = [_tree.flatten(t)[0] for t in trees] if isinstance(trees, tuple) else [_tree.flatten(trees)[0]]
    parts = []
    for path, axis in members:
        xs = [f[tuple(path)] for f in flat]
        v = fn(*xs)
        parts.append(jnp.reshape(sum_all(v), (1,)) if axis is None else sum_except(v, axis))
    # a unit whose members have several dtypes (a float32 kernel beside a float64 bias) is summed in their common
    # one, whatever jax_numpy_dtype_promotion is: under "strict" the sum failed with a bare TypePromotionError
    # (effective_lr, angular_update and quotient_trajectory's defaults, where tree_dot already took such trees)
    if len({x.dtype for x in parts}) > 1:
        with jax.numpy_dtype_promotion("standard"):
            dt = jnp.result_type(*parts)
        parts = [x.astype(dt) for x in parts]
    total = parts[0]
    for x in parts[1:]:
        total = total + x
    return total


def rescale_members(comp):
    """``(incoming, outgoing)`` member lists when ``comp`` is a rescale action, else ``None``."""
    if hasattr(comp, "incoming") and hasattr(comp, "outgoing"):
        return tuple(comp.incoming), tuple(comp.outgoing)
    return None


def scale_members(comp):
    """The member list when ``comp`` is a scale (normalisation) action, else ``None``."""
    if type(comp).__name__ == "Scale" and hasattr(comp, "members"):
        return tuple(comp.members)
    return None

"""The generic vertical projection, for checking closed forms and for actions without one."""

from __future__ import annotations

import functools

import jax

from .. import _tree
from ._base import Group, generic_vcoeffs, unify_floats, vector_in_given_dtypes
from ._product import Product


def vertical_generic(group: Group, params, v):
    """``P_V v = J (J^T J)^+ J^T v`` with the Gram matrix of *all* continuous components of ``group`` solved
    jointly by a dense solve, ignoring every closed form.  Slower than ``group.vertical``; the reference it must match.
    ``v`` is read as ``group.vertical`` reads it: a pytree like ``params`` (``ValueError`` naming a missing or
    misshapen leaf), of any real dtypes (projected in the parameters' dtypes, returned in its own; bfloat16 /
    float16 computed in float32).
    """
    comps = group.components if isinstance(group, Product) else (group,)
    comps = tuple(c for c in comps if c.continuous)
    flat, treedef = group._flat(params)
    vflat, given = group._vector_in_params_dtypes(flat, v, "vertical_generic")
    like = {p: x.dtype for p, x in vflat.items()}
    out = _vertical_generic_flat(comps, *unify_floats(_tree.widen((flat, vflat))))
    out = {p: x.astype(like[p]) for p, x in out.items()}
    return _tree.unflatten(vector_in_given_dtypes(out, given), treedef)


@functools.partial(jax.jit, static_argnums=(0,))
def _vertical_generic_flat(comps, flat, vflat):
    """The flat-view computation of :func:`vertical_generic` as one compiled program, cached per tuple of
    components and shapes (run eagerly, the forward-mode Gram matrix was hundreds of dispatched operations,
    seconds per call); inlined under an outer ``jit`` / ``vmap`` / ``grad``."""
    out = {p: x * 0 for p, x in vflat.items()}
    if comps:
        xis = generic_vcoeffs(comps, flat, vflat)
        for c, xi in zip(comps, xis):
            for p, d in c._tmap(flat, xi).items():
                out[p] = out[p] + d
    return out

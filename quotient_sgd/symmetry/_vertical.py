"""The generic vertical projection, for checking closed forms and for actions without one."""

from __future__ import annotations

import functools

import jax

from .. import _tree
from ._base import Group, generic_vcoeffs
from ._product import Product


def vertical_generic(group: Group, params, v):
    """``P_V v = J (J^T J)^+ J^T v`` with the Gram matrix of *all* continuous components of ``group`` solved
    jointly by a dense solve, ignoring every closed form.  Slower than ``group.vertical``; the reference it must match.
    """
    comps = group.components if isinstance(group, Product) else (group,)
    comps = tuple(c for c in comps if c.continuous)
    flat, treedef = group._flat(params)
    vflat, _ = _tree.flatten(v)
    return _tree.unflatten(_vertical_generic_flat(comps, flat, vflat), treedef)


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

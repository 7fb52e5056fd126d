"""The generic vertical projection, for checking closed forms and for actions without one."""

from __future__ import annotations

from .. import _tree
from ._base import Group, generic_vcoeffs
from ._product import Product


def vertical_generic(group: Group, params, v):
    """``P_V v = J (J^T J)^+ J^T v`` with the Gram matrix of *all* continuous components of ``group`` solved
    jointly by lineax, ignoring every closed form.  Slower than ``group.vertical``; the reference it must match.
    """
    comps = group.components if isinstance(group, Product) else (group,)
    comps = tuple(c for c in comps if c.continuous)
    flat, treedef = group._flat(params)
    vflat, _ = _tree.flatten(v)
    out = {p: x * 0 for p, x in vflat.items()}
    if comps:
        xis = generic_vcoeffs(comps, flat, vflat)
        for c, xi in zip(comps, xis):
            for p, d in c._tmap(flat, xi).items():
                out[p] = out[p] + d
    return _tree.unflatten(out, treedef)

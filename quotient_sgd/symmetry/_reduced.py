"""Overlapping rescale components (an MLP's or CNN's chain of hidden layers) through their squared weights.

A cluster of :class:`~quotient_sgd.symmetry.Rescale` components acts on each array ``W`` by factors
``exp(sum_m s_m xi_m)`` along the arrays' unit axes (``s = +1`` incoming, ``-1`` outgoing).  Every quantity the
canonical representative and the vertical projection need is a sum of ``W**2`` weighted by such factors, so it
depends on ``W`` only through ``S = sum of W**2 over the axes no component acts on``: an ``n_1 x n_2`` matrix for
a weight between two hidden layers, a vector for a bias or an end layer.

- the squared in / out norms of unit ``j`` of component ``m`` after the action by log-factors ``xi``:
  ``exp(2 s_m xi_m[j]) (S contracted with exp(2 s_l xi_l) on every other member axis l)[j]``;
- the Gram matrix of the orbit tangents: ``(J^T J xi)_m = sum over arrays of s_m (S contracted with
  sum_l s_l xi_l)``, the log-factor sum formed entry by entry, then one reduction of ``S`` times it per member.

So the block-coordinate sweeps of the canonical element and the conjugate-gradient iterations of the vertical
projection cost matrix-vector products with ``S`` instead of passes of the group action over every parameter
(a 64-256-256-10 MLP: each sweep reads 66k entries of ``S`` instead of acting on, squaring and reducing 85k
parameters twice).  The results are the same functions of the parameters (the same sweeps and the same CG
iterations, in another summation order), and derivatives flow through ``S``.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from ._base import cg_vcoeffs
from ._rescale import Rescale
from ._translation import Translation

#: ``((path, ((component index, axis, sign), ...)), ...)``: per array, the components acting on it.
Plan = tuple


def rescale_plan(comps, flat) -> Plan | None:
    """The arrays of a cluster of plain :class:`Rescale` components and who acts on which axis; ``None`` when the
    reduced form does not apply (another kind of component, or two actions on one axis of an array, or one
    component on two axes of one array), and the generic code runs instead."""
    if not comps or any(type(c) is not Rescale for c in comps):
        return None
    members: dict = {}
    for ci, c in enumerate(comps):
        for sign, group in ((1, c.incoming), (-1, c.outgoing)):
            for p, a in group:
                members.setdefault(p, []).append((ci, a % flat[p].ndim, sign))
    for ms in members.values():
        if len({a for _, a, _ in ms}) != len(ms) or len({ci for ci, _, _ in ms}) != len(ms):
            return None
    return tuple((p, tuple(ms)) for p, ms in members.items())


def squared_stats(plan: Plan, flat) -> tuple[jax.Array, ...]:
    """Per array of the plan, ``W**2`` summed over the axes no component acts on, its remaining axes in the
    order of the plan's members."""
    out = []
    for p, ms in plan:
        x = flat[p]
        letters = string.ascii_letters[: x.ndim]
        keep = "".join(letters[a] for _, a, _ in ms)
        out.append(jnp.einsum(f"{letters}->{keep}", jnp.square(x)))
    return tuple(out)


def _contract(S, vecs, keep: int):
    """``S`` contracted with ``vecs[l]`` on each of its axes ``l != keep`` (``None``: summed), axis ``keep`` kept."""
    letters = string.ascii_letters[: S.ndim]
    operands, specs = [S], [letters]
    for l, v in enumerate(vecs):
        if l != keep and v is not None:
            operands.append(v)
            specs.append(letters[l])
    return jnp.einsum(",".join(specs) + "->" + letters[keep], *operands)


def unit_norms_sq(plan: Plan, stats, xis, ci: int):
    """``(|in_j|^2, |out_j|^2)`` of component ``ci`` after the action of the log-factors ``xis`` (one per
    component; ``None`` for the identity)."""
    sin = sout = None
    for (p, ms), S in zip(plan, stats):
        pos = [k for k, (c, _, _) in enumerate(ms) if c == ci]
        if not pos:
            continue
        k = pos[0]
        w = [None if xis[c] is None else jnp.exp(2 * s * xis[c]) for c, _, s in ms]
        r = _contract(S, w, k)
        if w[k] is not None:
            r = r * w[k]
        if ms[k][2] > 0:
            sin = r if sin is None else sin + r
        else:
            sout = r if sout is None else sout + r
    return sin, sout


def balance_delta(sin, sout):
    """:meth:`Rescale._canonical_element` from the squared norms: the log-factor balancing each unit (0 for a unit
    with a zero side)."""
    ok = (sin > 0) & (sout > 0)
    return jnp.where(ok, 0.25 * (jnp.log(jnp.where(ok, sout, 1)) - jnp.log(jnp.where(ok, sin, 1))), 0)


def gram_operator(plan: Plan, stats, n_comps: int):
    """``(xis -> J^T J xis, diag(J^T J))`` for the joint tangent map of the cluster (tuples over components).

    The diagonal is returned without derivatives (``stop_gradient``): :func:`~._base.cg_vcoeffs` uses it only for
    the Jacobi preconditioner and the right-hand side's scale, which steer the iterations but cancel from the
    solution."""
    axis_sums = []
    for (p, ms), S in zip(plan, stats):
        axis_sums.append(tuple(_contract(S, [None] * len(ms), k) for k in range(len(ms))))

    diag = [None] * n_comps
    for (p, ms), sums in zip(plan, axis_sums):
        for (ci, _, _), d in zip(ms, sums):
            diag[ci] = d if diag[ci] is None else diag[ci] + d

    def jtj(xis):
        # Per array, the tangent's log-factor sum_l s_l xi_l is formed entry by entry before it meets S (as J
        # then J^T do on the weights): summing the members' contributions after the contraction instead (the
        # diagonal term sums_k xi_k plus one product with S per other member) cancels catastrophically along
        # the Gram matrix's small-eigenvalue directions, where s_k xi_k + s_l xi_l ~ 0.  Far from balance
        # (log-factors +-6) CG on that operator returned projections up to 1e-6 |v| off in float64, against
        # 1e-9 for the tangent maps.
        out = [None] * n_comps
        for (p, ms), S in zip(plan, stats):
            t = None
            for l, (cl, _, sl) in enumerate(ms):
                shape = [1] * S.ndim
                shape[l] = S.shape[l]
                term = sl * jnp.reshape(xis[cl], shape)
                t = term if t is None else t + term
            st = S * t
            for k, (ci, _, sk) in enumerate(ms):
                r = sk * jnp.sum(st, axis=tuple(a for a in range(S.ndim) if a != k))
                out[ci] = r if out[ci] is None else out[ci] + r
        return tuple(out)

    return jtj, tuple(jax.lax.stop_gradient(d) for d in diag)


def split_cluster(comps, flat):
    """``(rescale indices, translation indices, plan over the rescales)`` for a cluster of plain :class:`Rescale`
    components and softmax :class:`Translation` s (an MLP classifier's hidden chain and its logit shift), or
    ``None`` (the generic code runs).

    A translation shifts the rows ``W[i, :]`` of its kernel by ``a_i``; the rescales may act on those rows (axis
    0) but not on the classes nor on the translation's bias.  Row scalings then commute with row centring, so the
    cluster splits exactly: the translation's canonical point is the class-centred kernel and bias whatever the
    rescales do, and the rescales balance the centred kernel (:func:`centred`)."""
    resc = tuple(i for i, c in enumerate(comps) if type(c) is Rescale)
    trans = tuple(i for i, c in enumerate(comps) if type(c) is Translation)
    if not resc or len(resc) + len(trans) != len(comps):
        return None
    plan = rescale_plan(tuple(comps[i] for i in resc), flat)
    if plan is None:
        return None
    members = dict(plan)
    seen: set = set()
    for i in trans:
        t = comps[i]
        own = (t.kernel,) + ((t.bias,) if t.bias is not None else ())
        if seen & set(own) or len(set(own)) != len(own) or (t.bias is not None and t.bias in members):
            return None
        if any(a != 0 for _, a, _ in members.get(t.kernel, ())):
            return None
        seen |= set(own)
    return resc, trans, plan


def centred(comps, trans, flat):
    """``flat`` with every translation's kernel rows centred (the point the rescales of the cluster see once the
    translations are canonical; the bias is untouched by the rescales and left as it is)."""
    out = dict(flat)
    for i in trans:
        k = comps[i].kernel
        out[k] = flat[k] - jnp.mean(flat[k], axis=1, keepdims=True)
    return out


def row_factor(plan, xr, path, acting=None):
    """``sum_m s_m xr_m`` over the rescales acting on the rows of ``path`` (only those whose position in ``xr`` is in
    ``acting``, when given); ``None`` where none acts.  For log-factors ``xr``: the log of the rows' factor."""
    out = None
    for p, ms in plan:
        if p == path:
            for ci, _, s in ms:
                if acting is None or ci in acting:
                    out = s * xr[ci] if out is None else out + s * xr[ci]
    return out


def translation_elements(comps, resc, trans, plan, flat, xr):
    """The translations' canonical elements once the rescales hold ``xr``: ``a = -(row means of the kernel at the
    point the translation acts on)``, ``c = -mean(bias)``.  A word acts in the cluster's order, so a translation
    sees the rows scaled by the rescales before it only; row means scale with the rows, so the final point (the
    class-centred, balanced one) is the same either way."""
    out = {}
    for i in trans:
        t = comps[i]
        g = t._canonical_element(flat)
        f = row_factor(plan, xr, t.kernel, acting={k for k, r in enumerate(resc) if r < i})
        if f is not None:
            g = dict(g, a=g["a"] * jnp.exp(f))
        out[i] = g
    return out


def vcoeffs(comps, flat, v, split):
    """Vertical coefficients of the cluster (as :func:`~._base.cg_vcoeffs` returns them) from the reduced Gram
    matrix.  With translations ``T``: the vertical space is ``T`` plus the rescale tangents with ``T`` projected
    out, and those are the rescale tangents at the :func:`centred` point, orthogonal to ``T``; so the rescale
    coefficients solve the reduced system at the centred point, and the translations take the row means of
    ``v`` less the rows' share of the rescale tangents (``-s m_i xi_i``, ``m`` the kernel's row means)."""
    resc, trans, plan = split
    fc = centred(comps, trans, flat) if trans else flat
    rcomps = tuple(comps[i] for i in resc)
    xr = cg_vcoeffs(rcomps, fc, v, gram=gram_operator(plan, squared_stats(plan, fc), len(rcomps)))
    out = dict(zip(resc, xr))
    for i in trans:
        t = comps[i]
        g = t._vcoeffs(flat, {p: v.get(p, jnp.zeros_like(flat[p])) for p in t.paths()})
        f = row_factor(plan, xr, t.kernel)
        if f is not None:
            g = dict(g, a=g["a"] - f * jnp.mean(flat[t.kernel], axis=1))
        out[i] = g
    return tuple(out[i] for i in range(len(comps)))

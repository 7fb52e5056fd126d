"""Positive rescaling of hidden units (THEORY section 1, "rescale")."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import Path
from ._base import LogFactorGroup, SymmetryError, along, as_axis, as_path, unit_dot, unit_sqnorm


def _norm_members(members, what: str, name: str) -> tuple[tuple[Path, int], ...]:
    out = []
    for m in members:
        try:
            path, axis = m
            path = as_path(path)
            axis = as_axis(axis)
        except (TypeError, ValueError):
            raise SymmetryError(f"{name!r}: each {what} member must be (path, integer axis), got {m!r}") from None
        out.append((path, axis))
    return tuple(out)


class Rescale(LogFactorGroup):
    """Per-unit positive rescaling: ``w_in,j -> a_j w_in,j``, ``b_in,j -> a_j b_in,j``, ``w_out,j -> w_out,j / a_j``.

    A symmetry between two layers joined by a positively homogeneous activation (ReLU, leaky ReLU, identity).
    The group is ``(R_{>0})^n``; elements are stored as log-factors ``s`` (``a = exp(s)``), so the group law is
    addition.  Orbit tangents: ``v_j = (in_j, -out_j)``; they have disjoint supports for distinct units, so the
    Gram matrix is diagonal, ``|in_j|^2 + |out_j|^2``, and the projection is closed-form.

    Charges (THEORY section 2): ``Q_j = 1/2 (|in_j|^2 - |out_j|^2)`` (``in`` includes the bias).
    Invariants: ``m_j = |in_j| |out_j|``.  Canonical representative: the balanced point ``|in_j| = |out_j|``,
    which is also the minimum-norm point of the orbit (Du et al., 2018).  A unit with exactly one side zero
    (zero incoming weights and bias but outgoing weights, or the reverse) has no balanced point: its orbit is
    not closed and the minimum-norm point is the limit with the other side at zero as well.  The canonical
    element keeps a finite factor there, so in an overlapping chain (an MLP's consecutive layers) the canonical
    point and the invariants of the neighbouring layer are not orbit-constant at such a point.

    Args:
        incoming: ``((path, axis), ...)``: arrays multiplied by ``a`` along their unit ``axis``.
        outgoing: ``((path, axis), ...)``: arrays divided by ``a`` along their unit ``axis``.
        name: a unique name for this component, e.g. ``"rescale/layers.0"``.
    """

    incoming: tuple[tuple[Path, int], ...] = eqx.field(static=True)
    outgoing: tuple[tuple[Path, int], ...] = eqx.field(static=True)

    canonical_kind: ClassVar[str] = "min_norm"

    def __init__(self, incoming, outgoing, name: str = "rescale"):
        self.name = name
        self.incoming = _norm_members(incoming, "incoming", name)
        self.outgoing = _norm_members(outgoing, "outgoing", name)
        if not self.incoming or not self.outgoing:
            raise SymmetryError(f"Rescale {name!r} needs at least one incoming and one outgoing member")

    def paths(self):
        return tuple(p for p, _ in self.incoming + self.outgoing)

    def _check(self, flat):
        super()._check(flat)
        self._check_axes(flat, self.incoming + self.outgoing)
        sizes = {flat[p].shape[a] for p, a in self.incoming + self.outgoing}
        if len(sizes) != 1:
            raise SymmetryError(
                f"Rescale {self.name!r}: members disagree on the number of units: "
                f"{[(p, a, flat[p].shape) for p, a in self.incoming + self.outgoing]}"
            )

    def _n(self, flat):
        p, a = self.incoming[0]
        return flat[p].shape[a]

    def _dtype(self, flat):
        return flat[self.incoming[0][0]].dtype

    def _in_out_sq(self, flat):
        sin = sum(unit_sqnorm(flat[p], a) for p, a in self.incoming)
        sout = sum(unit_sqnorm(flat[p], a) for p, a in self.outgoing)
        return sin, sout

    # group structure: log-factors
    def _sample(self, key, flat, scale):
        return jax.random.uniform(
            key, (self._n(flat),), self._dtype(flat), minval=-2.0 * scale, maxval=2.0 * scale
        )

    def _identity(self, flat):
        return jnp.zeros((self._n(flat),), self._dtype(flat))

    def _act(self, g, flat):
        out = dict(flat)
        a = jnp.exp(g)
        for p, ax in self.incoming:
            out[p] = out[p] * along(a, out[p], ax)
        for p, ax in self.outgoing:
            out[p] = out[p] / along(a, out[p], ax)
        return out

    def _tmap(self, flat, xi):
        out = {}
        for p, ax in self.incoming:
            out[p] = flat[p] * along(xi, flat[p], ax)
        for p, ax in self.outgoing:
            d = -flat[p] * along(xi, flat[p], ax)
            out[p] = out[p] + d if p in out else d
        return out

    def _tmap_T(self, flat, v):
        c = sum(unit_dot(v[p], flat[p], a) for p, a in self.incoming)
        return c - sum(unit_dot(v[p], flat[p], a) for p, a in self.outgoing)

    def _gram_diag(self, flat):
        sin, sout = self._in_out_sq(flat)
        return sin + sout

    def _vcoeffs(self, flat, v):
        if set(p for p, _ in self.incoming) & set(p for p, _ in self.outgoing):
            return super()._vcoeffs(flat, v)  # self-overlapping declaration: no diagonal Gram matrix
        sin, sout = self._in_out_sq(flat)
        gram = sin + sout
        c = self._tmap_T(flat, v)
        return jnp.where(gram > 0, c / jnp.where(gram > 0, gram, 1), 0)

    def _canonical_element(self, flat):
        sin, sout = self._in_out_sq(flat)
        ok = (sin > 0) & (sout > 0)
        # a_j = (|out_j| / |in_j|)^(1/2)  =>  log a_j = (log|out|^2 - log|in|^2) / 4
        return jnp.where(ok, 0.25 * (jnp.log(jnp.where(ok, sout, 1)) - jnp.log(jnp.where(ok, sin, 1))), 0)

    def _invariants(self, flat):
        sin, sout = self._in_out_sq(flat)
        # sqrt'(0) is infinite: a unit with a zero side (a zero-initialised output layer) made jax.grad of the
        # invariants NaN.  There m_j = |in_j| |out_j| is constant along the other side (derivative 0, exact) and a
        # cone along the zero side, whose smallest subgradient, 0, is taken.
        prod = sin * sout
        pos = prod > 0
        return jnp.where(pos, jnp.sqrt(jnp.where(pos, prod, 1)), 0)

    def _perm_axis(self, perm, flat):
        # the invariants are per unit; a permutation of exactly these units (every member on its unit axis)
        return 0 if set(self.incoming + self.outgoing) <= set(getattr(perm, "members", ())) else None

    def _charges(self, flat):
        sin, sout = self._in_out_sq(flat)
        return 0.5 * (sin - sout)

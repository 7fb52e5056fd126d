"""Scale invariance of weights that feed a normalisation (THEORY section 1, "scale")."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import Path
from ._base import LogFactorGroup, SymmetryError, along, as_axis, as_path, unit_dot, unit_sqnorm


class Scale(LogFactorGroup):
    """``w -> c w`` for the weights feeding a normalisation (LayerNorm, RMSNorm, BatchNorm).

    ``members = ((path, axis), ...)``.  With ``axis=None`` for every member the whole block (all members
    together) shares one factor ``c > 0`` (LayerNorm over the block's outputs); with an integer axis every index
    along it has its own factor (BatchNorm-style per-channel normalisation) and all members must agree on the
    number of channels.  Elements are log-factors.

    Orbit tangent: ``w`` itself (per block), so ``u_h = u - <u,w> w / |w|^2`` (THEORY section 1).
    Charge: ``Q = 1/2 |w|^2``.  Invariant: the direction ``w / |w|``.  Canonical representative: ``|w| = 1``.
    """

    members: tuple[tuple[Path, int | None], ...] = eqx.field(static=True)

    def __init__(self, members, name: str = "scale"):
        self.name = name
        ms = []
        for m in members:
            try:
                path, axis = m
                ms.append((as_path(path), None if axis is None else as_axis(axis)))
            except (TypeError, ValueError):
                raise SymmetryError(f"Scale {name!r}: members must be (path, integer axis or None), got "
                                    f"{m!r}") from None
        if not ms:
            raise SymmetryError(f"Scale {name!r} needs at least one member")
        kinds = {a is None for _, a in ms}
        if len(kinds) != 1:
            raise SymmetryError(f"Scale {name!r}: mix of per-block (None) and per-channel axes: {ms}")
        self.members = tuple(ms)

    @property
    def per_channel(self) -> bool:
        return self.members[0][1] is not None

    def paths(self):
        return tuple(p for p, _ in self.members)

    def _check(self, flat):
        super()._check(flat)
        self._check_axes(flat, self.members)
        paths = [p for p, _ in self.members]
        twice = [p for p in dict.fromkeys(paths) if paths.count(p) > 1]
        if twice:
            # act multiplied such an array once per listing (c^2, or c_i c_j along two axes) while the tangent, the
            # norms and the canonical element read it once or per listing inconsistently: a block listed twice
            # canonicalised to a point whose canonical point was the starting point again (1.19 off idempotence)
            raise SymmetryError(f"Scale {self.name!r}: member {twice[0]!r} is listed {paths.count(twice[0])} times; "
                                f"each array the factor multiplies must be listed once")
        if self.per_channel:
            sizes = {flat[p].shape[a] for p, a in self.members}
            if len(sizes) != 1:
                raise SymmetryError(f"Scale {self.name!r}: members disagree on the number of channels")

    def _shape(self, flat):
        if self.per_channel:
            p, a = self.members[0]
            return (flat[p].shape[a],)
        return ()

    def _dtype(self, flat):
        return flat[self.members[0][0]].dtype

    def _factor(self, s, x, axis):
        return along(s, x, axis) if axis is not None else s.astype(x.dtype)

    def _sq(self, flat):
        if self.per_channel:
            return sum(unit_sqnorm(flat[p], a) for p, a in self.members)
        return sum(jnp.sum(jnp.square(flat[p])) for p, _ in self.members)

    def _dot(self, flat, v):
        if self.per_channel:
            return sum(unit_dot(v[p], flat[p], a) for p, a in self.members)
        return sum(jnp.sum(v[p] * flat[p]) for p, _ in self.members)

    def _sample(self, key, flat, scale):
        return jax.random.uniform(key, self._shape(flat), self._dtype(flat), -2.0 * scale, 2.0 * scale)

    def _identity(self, flat):
        return jnp.zeros(self._shape(flat), self._dtype(flat))

    def _act(self, g, flat):
        out = dict(flat)
        c = jnp.exp(g)
        for p, a in self.members:
            out[p] = out[p] * self._factor(c, out[p], a)
        return out

    def _tmap(self, flat, xi):
        return {p: flat[p] * self._factor(xi, flat[p], a) for p, a in self.members}

    def _tmap_T(self, flat, v):
        return self._dot(flat, v)

    def _gram_diag(self, flat):
        return self._sq(flat)

    def _vcoeffs(self, flat, v):
        sq = self._sq(flat)
        return jnp.where(sq > 0, self._dot(flat, v) / jnp.where(sq > 0, sq, 1), 0)

    def _canonical_element(self, flat):
        sq = self._sq(flat)
        return jnp.where(sq > 0, -0.5 * jnp.log(jnp.where(sq > 0, sq, 1)), 0)

    def _invariants(self, flat):
        return {"/".join(map(str, p)): x for p, x in self._act(self._canonical_element(flat), flat).items()
                if p in self.paths()}

    def _charges(self, flat):
        return 0.5 * self._sq(flat)

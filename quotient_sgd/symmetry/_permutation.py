"""Permutations of hidden units (THEORY section 1, "permutation")."""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._tree import Path
from ._base import Group, SymmetryError, as_axis, as_path, unit_dot, unit_sqnorm


def _items(arrays):
    """``(array, unit_axis, across)`` for each of ``[(array, unit_axis), ...]`` or ``[(array, unit_axis, across),
    ...]``; ``across``: the permutation also reorders another axis of that array (a recurrent matrix, permuted
    along its rows and its columns), so that a unit's slice comes in a different order from another starting
    order, and its statistics are taken over the slice's sorted entries."""
    return [(item[0], item[1], bool(item[2]) if len(item) > 2 else False) for item in arrays]


def _sorted_slices(x: jax.Array, a: int) -> jax.Array:
    """``(n, m)``: each unit's slice of ``x`` along axis ``a``, flattened and sorted (the same values, in the same
    order, whatever order the slice's entries came in)."""
    return jnp.sort(jnp.reshape(jnp.moveaxis(x, a, 0), (x.shape[a], -1)), axis=1)


def unit_key(arrays) -> jax.Array:
    """Per-unit sort key of ``[(array, unit_axis), ...]``: ``sum |slice|^2 + 1e-3 * tanh(sum of slice entries)``
    (the second term separates units of equal norm).  An array given as ``(array, unit_axis, True)`` (permuted
    along another axis too) is summed over its slices' sorted entries, so that its sums have the same bits from
    any starting order."""
    sq = s = 0
    for x, a, across in _items(arrays):
        if across:
            sl = _sorted_slices(x, a)
            sq = sq + jnp.sum(jnp.sort(jnp.square(sl), axis=1), axis=1)
            s = s + jnp.sum(sl, axis=1)
        else:
            sq = sq + unit_sqnorm(x, a)
            s = s + unit_dot(x, jnp.ones_like(x), a)
    return sq + 1e-3 * jnp.tanh(s) * jnp.maximum(jnp.mean(sq), jnp.finfo(sq.dtype).tiny)


def unit_order(arrays, key: jax.Array | None = None) -> jax.Array:
    """The permutation sorting the units of ``[(array, unit_axis), ...]`` by :func:`unit_key`, ties broken by a
    fixed projection of each unit's slices (``sum_i r_i slice_i``, ``r_i = cos(0.7548776662466927 (i + 1))``):
    units of equal norm and sum whose entries differ (one's weights a reordering of the other's) then sort the
    same way from any starting order.  Only identical units still tie, and exchanging them changes nothing.
    An array permuted along another axis too (``(array, unit_axis, True)``) is projected in its slices' sorted
    order: its position-wise projection moved with that other axis, and tied units sorted differently from
    different starting orders.  ``key``: the units' :func:`unit_key` when the caller has it already."""
    tie = 0.0
    for x, a, across in _items(arrays):
        a = a % x.ndim
        if across:
            sl = _sorted_slices(x, a)
            r = np.cos(0.7548776662466927 * np.arange(1, sl.shape[1] + 1))
            tie = tie + sl @ jnp.asarray(r, x.dtype)
            continue
        shape = tuple(1 if i == a else n for i, n in enumerate(x.shape))
        # a constant of the program (computed here, not by the compiled code at every call)
        r = np.cos(0.7548776662466927 * np.arange(1, math.prod(shape) + 1)).reshape(shape)
        tie = tie + unit_dot(x, jnp.asarray(r, x.dtype), a)
    return jnp.lexsort((tie, unit_key(arrays) if key is None else key))


class Permutation(Group):
    """``S_n`` reordering the units along ``axis`` of every member array simultaneously.

    Element: an index array ``sigma`` (``int32``, shape ``(n,)``); ``(sigma . theta)[..., i, ...] =
    theta[..., sigma[i], ...]``.  Discrete: no tangents, no charges, the vertical space is ``{0}``.
    Canonical representative: units sorted by the key ``sum_members |slice_i|^2`` (ties broken by the sum of
    the slice's entries, then by a fixed projection of the slices: :func:`unit_order`).  Sorting moves entries
    without arithmetic, so ``canonicalize(P . theta)`` equals ``canonicalize(theta)`` bit for bit.  Invariants:
    the sorted keys.
    """

    members: tuple[tuple[Path, int], ...] = eqx.field(static=True)

    continuous: ClassVar[bool] = False

    abelian: ClassVar[bool] = False

    def __init__(self, members, name: str = "permutation"):
        self.name = name
        ms = []
        for m in members:
            try:
                path, axis = m
                ms.append((as_path(path), as_axis(axis)))
            except (TypeError, ValueError):
                raise SymmetryError(f"Permutation {name!r}: members must be (path, integer axis), got "
                                    f"{m!r}") from None
        if not ms:
            raise SymmetryError(f"Permutation {name!r} needs at least one member")
        self.members = tuple(ms)

    def paths(self):
        return tuple(p for p, _ in self.members)

    def _check(self, flat):
        super()._check(flat)
        self._check_axes(flat, self.members)
        # The same axis of an array listed twice (e.g. a tied weight listed once per role, or axis 1 and -1 of a
        # matrix) was reordered twice by act: the action of sigma was that of sigma o sigma, which is not a group
        # action (act(g, act(h, .)) != act(compose(g, h), .)), and a transposition moved nothing.  A recurrent
        # matrix is listed on two different axes, which stays allowed.
        seen: dict = {}
        for p, a in self.members:
            axis = a % flat[p].ndim
            if (p, axis) in seen:
                raise SymmetryError(
                    f"Permutation {self.name!r}: member {p!r} is listed twice on axis {axis} (as axis {seen[p, axis]} "
                    f"and axis {a}); each array axis indexed by the units must be listed once (listed twice it would "
                    f"be reordered twice, by the square of the element); an array indexed by the units along two "
                    f"axes (a recurrent matrix) is listed once per axis")
            seen[p, axis] = a
        if len({flat[p].shape[a] for p, a in self.members}) != 1:
            raise SymmetryError(f"Permutation {self.name!r}: members disagree on the number of units")

    def _n(self, flat):
        p, a = self.members[0]
        return flat[p].shape[a]

    def _sample(self, key, flat, scale):
        return jax.random.permutation(key, self._n(flat)).astype(jnp.int32)

    def _identity(self, flat):
        return jnp.arange(self._n(flat), dtype=jnp.int32)

    def _check_element(self, g, flat, where: str = "") -> None:
        # a float index array passed the shape and value checks and failed inside jnp.take ("indices must have an
        # integer type", naming neither the action nor the argument); the dtype is known under a trace too
        dtype = getattr(g, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"act: {where}the element for permutation {self.name!r} has dtype {dtype}, not an "
                             f"integer index array; sample the element, or compose / invert elements of this group")
        super()._check_element(g, flat, where)

    def _check_element_values(self, g, where: str = "") -> None:
        g = np.asarray(g)
        if not np.all(np.sort(g, axis=-1) == np.arange(g.shape[-1])):
            shown = np.array2string(g, threshold=20)
            raise ValueError(f"act: {where}the element for permutation {self.name!r} is not a permutation of "
                             f"0..{g.shape[-1] - 1} (it repeats or skips units: {shown}); sample the element, or "
                             f"compose / invert elements of this group")

    def _act(self, g, flat):
        out = dict(flat)
        for p, a in self.members:
            out[p] = jnp.take(out[p], g, axis=a)
        return out

    def _inverse(self, g):
        return jnp.argsort(g).astype(jnp.int32)

    def _cotransport(self, g, cot):
        # a permutation is orthogonal: rho(g)^{-T} = rho(g)
        return self._act(g, cot)

    def _compose(self, g, h):
        return jnp.take(h, g).astype(jnp.int32)

    def sort_key(self, flat):
        """Per-unit sort key: ``sum_members |slice|^2 + 1e-3 * tanh(sum of slice entries)``."""
        return unit_key(self._arrays(flat))

    def _canonical_element(self, flat):
        return unit_order(self._arrays(flat)).astype(jnp.int32)

    def _arrays(self, flat):
        """``[(array, unit_axis, across)]`` for :func:`unit_key` / :func:`unit_order`; ``across`` for an array that
        is a member along several axes (a recurrent matrix)."""
        paths = [p for p, _ in self.members]
        return [(flat[p], a, paths.count(p) > 1) for p, a in self.members]

    def _invariants(self, flat):
        return jnp.sort(self.sort_key(flat))

    def _unordered_invariants(self, flat):
        # the sort keys in the units' order: their norm, sum, ... are those of the sorted keys (no sort kernel)
        return self.sort_key(flat)

    def _charges(self, flat):
        return {}

    def _algebra_zeros(self, flat):
        return ()

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

    A parameter may be both incoming and outgoing (a recurrent matrix ``h_{t+1} = relu(h_t W + x U)``, whose units
    rescale as ``W -> diag(1/a) W diag(a)``, ``U -> U diag(a)``, ``V -> diag(1/a) V``).  Its entries then move by
    ``a_j / a_i``, so one unit's factor changes the other units' norms: the vertical projection is the generic
    solve, and the canonical element is the minimum-norm point of the orbit found by Newton's method
    (:func:`balance_newton`, matrix balancing), with the invariants ``m_j`` evaluated there.

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

    def _self_overlapping(self) -> bool:
        """Whether a parameter is a member twice (incoming and outgoing: a recurrent matrix), so that units'
        factors meet in its entries and the per-unit closed forms do not apply."""
        ps = [p for p, _ in self.incoming + self.outgoing]
        return len(set(ps)) != len(ps)

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
            # (accumulated: an array incoming along two axes, or listed twice, moves by the sum of its members'
            # log-factors; written once per member, the last member's term alone was the tangent, 0.70 off the
            # derivative of act for a kernel listed twice, and vertical missed the orbit's own tangents)
            d = flat[p] * along(xi, flat[p], ax)
            out[p] = out[p] + d if p in out else d
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
        if self._self_overlapping():
            return super()._vcoeffs(flat, v)  # self-overlapping declaration: no diagonal Gram matrix
        sin, sout = self._in_out_sq(flat)
        gram = sin + sout
        c = self._tmap_T(flat, v)
        return jnp.where(gram > 0, c / jnp.where(gram > 0, gram, 1), 0)

    def _closed_form_element(self, flat):
        sin, sout = self._in_out_sq(flat)
        ok = (sin > 0) & (sout > 0)
        # a_j = (|out_j| / |in_j|)^(1/2)  =>  log a_j = (log|out|^2 - log|in|^2) / 4
        return jnp.where(ok, 0.25 * (jnp.log(jnp.where(ok, sout, 1)) - jnp.log(jnp.where(ok, sin, 1))), 0)

    def _canonical_element(self, flat):
        if self._self_overlapping():
            return balance_newton(self, flat)
        return self._closed_form_element(flat)

    def _invariants(self, flat):
        if self._self_overlapping():  # (the per-unit norms move with the other units' factors: read at the
            flat = self._act(self._canonical_element(flat), flat)  # canonical point)
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


#: Most Newton steps of :func:`balance_newton`.
BALANCE_ITERS = 50


def _sides(rescale: Rescale, flat):
    """Per unit, the squared weights its factor multiplies (``pos``) and divides (``neg``), entries that it both
    multiplies and divides (the diagonal of a recurrent matrix) in neither."""
    n = rescale._n(flat)
    paths = tuple(dict.fromkeys(rescale.paths()))
    ones = {p: jnp.ones_like(flat[p]) for p in paths}

    def one(e):
        coef = rescale._tmap(ones, e)  # each entry's exponent of a_j
        pos = sum(jnp.sum(jnp.where(coef[p] > 0, jnp.square(flat[p]), 0)) for p in paths)
        neg = sum(jnp.sum(jnp.where(coef[p] < 0, jnp.square(flat[p]), 0)) for p in paths)
        return pos, neg

    return jax.lax.map(one, jnp.eye(n, dtype=rescale._dtype(flat)))


def balance_newton(rescale: Rescale, flat):
    """The canonical element (log-factors) of a self-overlapping :class:`Rescale`: the minimum of the orbit's squared
    norm ``f(xi) = |exp(xi) . theta|^2``, a sum of exponentials of linear functions of ``xi`` (convex), by Newton's
    method (Jacobi-scaled pseudo-inverse of the Hessian, backtracking line search, at most :data:`BALANCE_ITERS`
    steps), started from the per-unit closed form.  At the minimum every unit is balanced, ``|in_j| = |out_j|``,
    which for a recurrent matrix is matrix balancing (Osborne, 1960).

    A unit whose factor only multiplies or only divides nonzero weights (no balanced point: see the class
    docstring) keeps the factor 1.  Derivatives by the implicit function theorem at the minimum
    (``jax.lax.custom_root``), not through the iterations."""
    paths = tuple(dict.fromkeys(rescale.paths()))
    pos, neg = _sides(rescale, jax.lax.stop_gradient(flat))
    free = (pos > 0) & (neg > 0)
    pair = free[:, None] & free[None, :]

    def sqnorm(xi):
        f = rescale._act(jnp.where(free, xi, 0), flat)
        return sum(jnp.sum(jnp.square(f[p])) for p in paths)

    def residual(xi):  # zero at the minimum (free units) and at 0 (the others)
        return jnp.where(free, jax.grad(sqnorm)(xi), xi)

    x0 = rescale._closed_form_element(flat)
    ts = jnp.asarray([1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 0.0], x0.dtype)
    tol = 64 * jnp.finfo(x0.dtype).eps

    eye = jnp.eye(x0.shape[0], dtype=x0.dtype)

    def body(carry):
        xi, it, _ = carry
        # at the moved point m = exp(xi) . theta the norm's gradient is 2 J^T m and its Hessian 4 J^T J (J: the
        # tangent map at m; every entry moves by the exponential of a linear function of xi)
        m = rescale._act(jnp.where(free, xi, 0), flat)
        grad = jnp.where(free, 2 * rescale._tmap_T(m, m), 0)
        hess = jnp.where(pair, 4 * jax.vmap(lambda e: rescale._tmap_T(m, rescale._tmap(m, e)))(eye), 0)
        dg = jnp.sqrt(jnp.maximum(jnp.diagonal(hess), jnp.finfo(hess.dtype).tiny))
        w, U = jnp.linalg.eigh(hess / dg[:, None] / dg[None, :])
        winv = jnp.where(w > jnp.finfo(w.dtype).eps * w.shape[0] * jnp.max(w), 1 / jnp.where(w > 0, w, 1), 0)
        step = jnp.where(free, -(U @ (winv * (U.T @ (grad / dg)))) / dg, 0)
        norms = jax.vmap(lambda t: sqnorm(xi + t * step))(ts)
        # near the minimum the decrease is below the resolution of the norm: take the full step there
        t = jnp.where(jnp.max(jnp.abs(step), initial=0) < 0.25, ts[0],
                      ts[jnp.argmin(jnp.where(jnp.isnan(norms), jnp.inf, norms))])
        return xi + t * step, it + 1, jnp.max(jnp.abs(t * step), initial=0)

    def cond(carry):
        _, it, size = carry
        return (it < BALANCE_ITERS) & (size > tol)

    def solve(_, x):
        return jax.lax.while_loop(cond, body, (x, jnp.asarray(0), jnp.asarray(jnp.inf, x.dtype)))[0]

    def tangent_solve(lin, y):
        return jnp.linalg.lstsq(jax.jacfwd(lin)(jnp.zeros_like(y)), y)[0]

    xi = jax.lax.custom_root(residual, jax.lax.stop_gradient(jnp.where(free, x0, 0)), solve, tangent_solve)
    return jnp.where(free, xi, 0)

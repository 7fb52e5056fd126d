"""General-linear symmetries: attention QK and VO per head, and deep linear stacks (THEORY section 1)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._tree import Path
from ._base import Group, SymmetryError


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _random_orthogonal(key, batch, d, dtype):
    q, r = jnp.linalg.qr(jax.random.normal(key, batch + (d, d), dtype))
    return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


class GL(Group):
    """``GL(d)`` acting on a pair of matrices through their shared inner dimension ``d`` (per head).

    Write ``L = [W_left; b_left]`` (shape ``(..., D+1, d)``; the bias row is absent when there is no bias) and

    - ``kind="qk"``: ``R~ = [W_right; b_right]`` (``(..., D'+1, d)``);  ``W_Q -> W_Q A``, ``W_K -> W_K A^{-T}``;
    - ``kind="vo"``: ``R~ = W_right^T`` where ``W_right`` is ``(..., d, D')``;  ``W_V -> W_V B``,
      ``W_O -> B^{-1} W_O`` (the right bias is not touched).  Without head axes this is the deep-linear
      symmetry ``W_1 -> W_1 A``, ``W_2 -> A^{-1} W_2``.

    In both cases ``L -> L A`` and ``R~ -> R~ A^{-T}``; the network sees only ``M = L R~^T`` (the attention
    bilinear form ``W_Q W_K^T``, or the value-output map ``W_V W_O``).  Leading axes (heads) are batch axes:
    each head has its own ``A``.

    Tangents: ``xi in gl(d)`` gives ``(L xi, -R~ xi^T)``; ``J^T (u_L, u_R) = L^T u_L - u_R^T R~``; the normal
    equations are the Sylvester system ``(L^T L) X + X (R~^T R~) = L^T u_L - u_R^T R~`` (THEORY section 1),
    solved through eigendecompositions of the two Gram matrices.
    Charge: ``L^T L - R~^T R~`` (a ``d x d`` matrix per head).  Invariant: ``M``.
    Canonical representative: with ``M = U S V^T`` (thin SVD, ``d`` columns), ``L = U S^{1/2}``,
    ``R~ = V S^{1/2}``, signs fixed so that the largest-magnitude entry of each column of ``U`` is positive:
    the balanced (minimum-norm) point of the orbit, made unique.
    """

    left: tuple[Path, Path | None] = eqx.field(static=True)
    right: tuple[Path, Path | None] = eqx.field(static=True)
    kind: str = eqx.field(static=True)

    abelian: ClassVar[bool] = False

    def __init__(self, left, right, kind: str = "vo", name: str = "gl"):
        if kind not in ("qk", "vo"):
            raise SymmetryError(f"GL {name!r}: kind must be 'qk' or 'vo', got {kind!r}")
        self.name = name
        self.kind = kind
        self.left = (tuple(left[0]), None if left[1] is None else tuple(left[1]))
        self.right = (tuple(right[0]), None if right[1] is None else tuple(right[1]))
        if kind == "vo" and self.right[1] is not None:
            raise SymmetryError(f"GL {name!r}: kind 'vo' does not act on the right bias; pass (W_path, None)")

    def paths(self):
        return tuple(p for p in self.left + self.right if p is not None)

    def _check(self, flat):
        super()._check(flat)
        d = flat[self.left[0]].shape[-1]
        dr = flat[self.right[0]].shape[-1] if self.kind == "qk" else flat[self.right[0]].shape[-2]
        if d != dr or flat[self.left[0]].shape[:-2] != flat[self.right[0]].shape[:-2]:
            raise SymmetryError(
                f"GL {self.name!r} ({self.kind}): shapes do not share the inner dimension / head axes: "
                f"{flat[self.left[0]].shape} and {flat[self.right[0]].shape}"
            )

    def _batch(self, flat):
        return flat[self.left[0]].shape[:-2]

    def _d(self, flat):
        return flat[self.left[0]].shape[-1]

    # stacked views
    def _L(self, flat):
        W, b = self.left
        x = flat[W]
        return x if b is None else jnp.concatenate([x, flat[b][..., None, :]], axis=-2)

    def _R(self, flat):
        W, b = self.right
        if self.kind == "vo":
            return _mT(flat[W])
        x = flat[W]
        return x if b is None else jnp.concatenate([x, flat[b][..., None, :]], axis=-2)

    def _unstack(self, flat, L, R):
        out = {}
        W, b = self.left
        if b is None:
            out[W] = L
        else:
            out[W], out[b] = L[..., :-1, :], L[..., -1, :]
        W, b = self.right
        if self.kind == "vo":
            out[W] = _mT(R)
        elif b is None:
            out[W] = R
        else:
            out[W], out[b] = R[..., :-1, :], R[..., -1, :]
        return out

    # group structure: matrices A with L -> L A, R -> R A^{-T}
    def _sample(self, key, flat, scale):
        batch, d, dt = self._batch(flat), self._d(flat), flat[self.left[0]].dtype
        k1, k2 = jax.random.split(key)
        s = jnp.exp(jnp.linspace(-1.5 * scale, 1.5 * scale, d, dtype=dt))
        U, V = _random_orthogonal(k1, batch, d, dt), _random_orthogonal(k2, batch, d, dt)
        return (U * jnp.reshape(s, (1,) * len(batch) + (1, d))) @ _mT(V)

    def _identity(self, flat):
        return jnp.broadcast_to(jnp.eye(self._d(flat), dtype=flat[self.left[0]].dtype),
                                self._batch(flat) + (self._d(flat),) * 2)

    def _act(self, g, flat):
        out = dict(flat)
        L, R = self._L(flat), self._R(flat)
        out.update(self._unstack(flat, L @ g, _mT(jnp.linalg.solve(g, _mT(R)))))
        return out

    def _inverse(self, g):
        return jnp.linalg.inv(g)

    def _compose(self, g, h):
        # g.(h.theta): L -> L A_h A_g
        return h @ g

    def _exp(self, xi):
        return jsl.expm(xi) if xi.ndim == 2 else jax.vmap(self._exp)(xi)

    def _algebra_zeros(self, flat):
        return jnp.zeros(self._batch(flat) + (self._d(flat),) * 2, flat[self.left[0]].dtype)

    def _tmap(self, flat, xi):
        return self._unstack(flat, self._L(flat) @ xi, -self._R(flat) @ _mT(xi))

    def _tmap_T(self, flat, v):
        vL, vR = self._L(v), self._R(v)
        return _mT(self._L(flat)) @ vL - _mT(vR) @ self._R(flat)

    def _vcoeffs(self, flat, v):
        return sylvester_vcoeffs((self,), flat, v)[0]

    def _canonical_element(self, flat):
        L, R = self._L(flat), self._R(flat)
        Q1, R1 = jnp.linalg.qr(L)
        Q2, R2 = jnp.linalg.qr(R)
        u, s, vt = jnp.linalg.svd(R1 @ _mT(R2))
        U = Q1 @ u
        idx = jnp.argmax(jnp.abs(U), axis=-2)
        sign = jnp.sign(jnp.take_along_axis(U, idx[..., None, :], axis=-2))[..., 0, :]
        sign = jnp.where(sign == 0, 1, sign).astype(L.dtype)
        # L' = Q1 u diag(sqrt s) diag(sign) = L A  with  A = R1^{-1} u diag(sqrt(s) sign)
        target = u * (jnp.sqrt(s) * sign)[..., None, :]
        return jnp.linalg.solve(R1, target)

    def _invariants(self, flat):
        return self._L(flat) @ _mT(self._R(flat))

    def _perm_axis(self, perm, flat):
        # M = L R~^T keeps the leading (head) axes: a permutation of the heads (axis 0 of every member) permutes
        # M along axis 0.  Without head axes, axis 0 is a matrix axis and no such axis exists.
        members = set(getattr(perm, "members", ()))
        if self._batch(flat) and all((p, 0) in members for p in self.paths()):
            return 0
        return None

    def _charges(self, flat):
        L, R = self._L(flat), self._R(flat)
        return _mT(L) @ L - _mT(R) @ R


def sylvester_vcoeffs(gls, flat, v) -> list[jax.Array]:
    """The vertical coefficients of several GL actions (no shared parameters), with batched SVDs.

    For each action the normal equations are the Sylvester system ``(L^T L) X + X (R~^T R~) = J^T v``.  It is
    solved in the singular bases of the factors themselves, ``L = U_1 S_1 W_1^T``, ``R~ = U_2 S_2 W_2^T``: with
    ``X = W_1 Y W_2^T``, ``a = U_1^T v_L W_2`` and ``b = U_2^T v_R W_1``,
    ``Y_ij = (s1_i a_ij - s2_j b_ji) / (s1_i^2 + s2_j^2)`` (pseudo-inverse on the degenerate directions).
    This is the eigenbasis solution of THEORY section 1 (the eigenvectors of ``L^T L`` are ``W_1``), but taking
    the bases from the SVDs of ``L`` and ``R~`` rather than from eigendecompositions of the Gram matrices, and
    the right-hand side from ``v`` rather than from ``J^T v``, keeps the error at ``eps cond(L)`` instead of
    ``eps cond(L)^2``: after a GL element of condition number ``e^6`` the float32 projection was ``1e-3`` of ``|v|``
    off with the Gram matrices, ``3e-6`` with the factors.  Matrices of one shape (every head of every action)
    go through one ``svd`` call: on CPU each small decomposition is dominated by per-call overhead."""
    def tall(x):
        # at least d rows (zero rows change neither the Gram matrix nor the solution): the SVD then has all d
        # right singular vectors, also for a wide factor (a deep linear layer narrower than its inner width)
        short = x.shape[-1] - x.shape[-2]
        return x if short <= 0 else jnp.concatenate([x, jnp.zeros(x.shape[:-2] + (short, x.shape[-1]), x.dtype)], -2)

    mats: list[jax.Array] = []
    for g in gls:
        mats += [tall(g._L(flat)), tall(g._R(flat))]
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault((m.shape[-2:], m.dtype), []).append(i)
    svds: list = [None] * len(mats)
    for (shape, _), idx in by_shape.items():
        stacked = jnp.concatenate([mats[i].reshape((-1,) + shape) for i in idx], axis=0)
        U, s, Wt = jnp.linalg.svd(stacked, full_matrices=False)
        start = 0
        for i in idx:
            n = mats[i].reshape((-1,) + shape).shape[0]
            batch = mats[i].shape[:-2]
            svds[i] = tuple(x[start:start + n].reshape(batch + x.shape[1:]) for x in (U, s, Wt))
            start += n
    out = []
    for k, g in enumerate(gls):
        (U1, s1, W1t), (U2, s2, W2t) = svds[2 * k], svds[2 * k + 1]
        W1, W2 = _mT(W1t), _mT(W2t)
        a = _mT(U1) @ tall(g._L(v)) @ W2
        b = _mT(U2) @ tall(g._R(v)) @ W1
        num = s1[..., :, None] * a - s2[..., None, :] * _mT(b)
        denom = jnp.square(s1)[..., :, None] + jnp.square(s2)[..., None, :]
        eps = jnp.finfo(denom.dtype).eps * jnp.max(denom, axis=(-2, -1), keepdims=True)
        Y = jnp.where(denom > eps, num / jnp.where(denom > eps, denom, 1), 0)
        out.append(W1 @ Y @ W2t)
    return out

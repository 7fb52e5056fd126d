"""General-linear symmetries: attention QK and VO per head, and deep linear stacks (THEORY section 1)."""

from __future__ import annotations

import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from .._tree import Path
from ._base import REFINE_STEPS, Group, SymmetryError, as_path, common_float, inverse_where


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _random_orthogonal(key, batch, d, dtype):
    q, r = jnp.linalg.qr(jax.random.normal(key, batch + (d, d), dtype))
    return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _reference(m: int, d: int, dtype) -> jax.Array:
    """A fixed generic ``(m, d)`` matrix (the same for every call of these sizes): the reference against which
    :func:`spectral_gauge` orients a subspace's basis."""
    return jnp.asarray(np.random.default_rng(m * 7919 + d).standard_normal((m, d)), dtype)


def _same_cluster(s: jax.Array) -> jax.Array:
    """``(..., d, d)``: whether singular values ``i`` and ``j`` (descending, ``(..., d)``) are in one cluster of
    equal values (no adjacent gap between them above ``sqrt(eps)`` of the largest)."""
    tol = jnp.sqrt(jnp.finfo(s.dtype).eps) * s[..., :1]
    breaks = (s[..., :-1] - s[..., 1:]) > tol
    ids = jnp.concatenate([jnp.zeros(s.shape[:-1] + (1,), jnp.int32), jnp.cumsum(breaks, axis=-1, dtype=jnp.int32)],
                          axis=-1)
    return ids[..., :, None] == ids[..., None, :]


def gauged_powers(M: jax.Array, n: int, powers: tuple[float, ...], Q1: jax.Array | None = None):
    """``U S^a Q`` for each ``a`` in ``powers``, from the thin SVD ``M = U S V^T`` (``M`` ``(..., r, c)``; its ``n``
    largest singular triplets) and the gauge ``Q`` of :func:`spectral_gauge` taken at ``Q1 U`` (``Q1``: orthonormal
    columns, when ``M`` is a factor's coordinates; ``U`` itself when ``None``).

    Differentiated in closed form, not through ``svd``: the SVD's derivative divides by ``s_i - s_j``, and where
    singular values repeat its singular vectors turn by arbitrary (rounding-sized gaps: ``1e15``) rotations inside
    the cluster, which the gauge cancels only analytically (jax.grad of a canonical point was garbage or NaN there).
    Here pairs in one cluster take no rotation, and the cluster's block of ``S^a`` moves by ``a s^(a-1)`` times the
    symmetric part of ``U^T dM V`` (the derivative of the cluster's spectral function); pairs in different clusters
    follow the SVD's formula.  Exact where the cluster's values are equal, and at distinct values (clusters of one)."""
    return _gauged_powers(n, tuple(powers), Q1 is not None, M, Q1 if Q1 is not None else jnp.zeros((), M.dtype))


def _gp_primal(n, powers, with_q1, M, Q1):
    Uf, sf, Vtf = jnp.linalg.svd(M, full_matrices=False)
    U, s, V = Uf[..., :, :n], sf[..., :n], _mT(Vtf)[..., :, :n]
    G = Q1 @ U if with_q1 else U
    Q = spectral_gauge(G, s)
    return tuple((U * (s ** a)[..., None, :]) @ Q for a in powers), (U, s, V, Q, G, Uf, sf, _mT(Vtf))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _gauged_powers(n, powers, with_q1, M, Q1):
    return _gp_primal(n, powers, with_q1, M, Q1)[0]


@_gauged_powers.defjvp
def _gauged_powers_jvp(n, powers, with_q1, primals, tangents):
    M, Q1 = primals
    dM, dQ1 = tangents
    outs, (U, s, V, Q, G, Uf, sf, Vf) = _gp_primal(n, powers, with_q1, M, Q1)  # (one SVD: the full factors too)
    Z = _mT(Uf) @ dM @ Vf  # (..., k, k)
    k = sf.shape[-1]
    near = jnp.zeros(sf.shape + (k,), bool).at[..., :n, :n].set(_same_cluster(s))
    near = near | jnp.broadcast_to(jnp.eye(k, dtype=bool), near.shape)
    si, sj = sf[..., :, None], sf[..., None, :]
    num = Z * sj + _mT(Z) * si
    den = (sj - si) * (sj + si)
    keep = ~near & (den != 0)
    K = jnp.where(keep, num / jnp.where(keep, den, 1), jnp.zeros((), M.dtype))[..., :, :n]
    dU = Uf @ K
    if M.shape[-2] > k:  # the part of dM V outside the range of U
        dMV = dM @ V
        dU = dU + (dMV - Uf @ (_mT(Uf) @ dMV)) / s[..., None, :]
    Zn = Z[..., :n, :n]
    sym = 0.5 * (Zn + _mT(Zn))
    same = _same_cluster(s)
    mid = 0.5 * (s[..., :, None] + s[..., None, :])
    dG = (dQ1 @ U + Q1 @ dU) if with_q1 else dU
    dQ = jax.jvp(lambda g: spectral_gauge(g, s), (G,), (dG,))[1]
    douts = []
    for a, out in zip(powers, outs):
        D = jnp.where(same, sym * a * mid ** (a - 1), jnp.zeros((), M.dtype))
        Sa = (s ** a)[..., None, :]
        douts.append(((dU * Sa) + U @ D) @ Q + (U * Sa) @ dQ)
    return outs, tuple(douts)


def spectral_gauge(U: jax.Array, s: jax.Array) -> jax.Array:
    """The orthogonal matrix ``Q`` (``(..., d, d)``) that fixes the remaining freedom of a thin SVD's left singular
    vectors ``U`` (``(..., m, d)``, orthonormal columns, singular values ``s`` ``(..., d)`` in descending order):
    ``U Q`` is the same for every SVD of the same matrix.

    ``Q`` is block-diagonal over clusters of equal singular values (adjacent values closer than ``sqrt(eps)`` of
    the largest; rounding separates equal values by ``~eps cond``).  A lone singular value's vector is determined
    up to sign: its ``Q`` entry is the sign that makes the vector's largest-magnitude entry positive.  A cluster of
    ``k`` equal values determines only its subspace (any ``U_B O``, ``O`` in ``O(k)``, is an SVD): ``Q_B`` is the
    orthogonal factor of the QR decomposition (positive ``R`` diagonal) of ``U_B^T E_B``, ``E`` a fixed generic
    matrix (:func:`_reference`), so ``U_B Q_B = U_B U_B^T E_B R^{-1}`` depends on the subspace alone."""
    m, d = U.shape[-2], U.shape[-1]
    same = _same_cluster(s)
    lone = jnp.sum(same, axis=-1) == 1
    idx = jnp.argmax(jnp.abs(U), axis=-2)
    sign = jnp.sign(jnp.take_along_axis(U, idx[..., None, :], axis=-2))[..., 0, :]
    sign = jnp.where(sign == 0, 1, sign).astype(U.dtype)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=bool), same.shape)
    signs = jnp.where(eye, jnp.broadcast_to(sign[..., None, :], same.shape), jnp.zeros((), U.dtype))

    def clustered():
        Y = jnp.where(same, _mT(U) @ _reference(m, d, U.dtype), jnp.zeros((), U.dtype))
        Y = jnp.where(lone[..., :, None] & eye, signs, Y)
        Q, R = jnp.linalg.qr(Y)
        rs = jnp.sign(jnp.diagonal(R, axis1=-2, axis2=-1))
        return Q * jnp.where(rs == 0, 1, rs).astype(U.dtype)[..., None, :]

    # (distinct values, the usual case: the signs alone, without the QR)
    return jax.lax.cond(jnp.all(lone), lambda: signs, clustered)


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
    solved in the eigenbases of the two Gram matrices (from the SVDs of the factors: :func:`sylvester_vcoeffs`).
    Charge: ``L^T L - R~^T R~`` (a ``d x d`` matrix per head).  Invariant: ``M``.
    Canonical representative: with ``M = U S V^T`` (thin SVD, ``d`` columns), ``L = U S^{1/2}``,
    ``R~ = V S^{1/2}``, signs fixed so that the largest-magnitude entry of each column of ``U`` is positive, and
    where singular values repeat (an orthonormal or identity-initialised head), whose singular vectors an SVD
    returns in any basis of their subspace, that basis fixed by :func:`spectral_gauge`: the balanced
    (minimum-norm) point of the orbit, made unique.  A head whose ``M`` has rank ``< d`` (a zero
    or rank-deficient factor) has no such point on its orbit; canonicalisation leaves it as it is.

    Accuracy far from balance: the canonical point is a function of ``M``, and ``M = L R~^T`` formed from factors
    moved by an element of condition number ``kappa`` carries a relative error of about ``eps kappa``, which the
    canonical point inherits.  Measured on 2 heads of ``d = 3`` (8 -> 8 attention), float32 against float64 at the
    same float32 point, 3 random elements each: ``kappa = e^9`` (8e3) 1.7e-4 to 3.4e-4 of the canonical point's
    norm, ``e^12`` (1.6e5) 3e-3 to 6e-3, ``e^13.8`` (1e6) 2e-2 to 2.6e-2 (``eps kappa``: 5e-4, 1e-2, 6e-2); in
    float64 the canonical points of ``a`` and ``g . a`` agree to 5e-13 at ``e^9`` and 1.6e-10 at ``e^15``.  Past
    ``kappa ~ 1 / eps`` nothing of the orbit is left: canonicalise such points in float64.
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
        try:
            if isinstance(left, str) or isinstance(right, str) or len(left) != 2 or len(right) != 2:
                raise TypeError
            self.left = (as_path(left[0]), None if left[1] is None else as_path(left[1]))
            self.right = (as_path(right[0]), None if right[1] is None else as_path(right[1]))
        except (TypeError, IndexError):
            raise SymmetryError(f"GL {name!r}: left and right must be (W_path, bias_path_or_None), got "
                                f"left={left!r}, right={right!r}") from None
        if kind == "vo" and self.right[1] is not None:
            raise SymmetryError(f"GL {name!r}: kind 'vo' does not act on the right bias; pass (W_path, None)")
        # a path on both sides (or twice on one) was written twice by act, the second write discarding the first:
        # W -> W A^-T alone for left = right = (W, None), not the declared action
        named = [p for p in self.left + self.right if p is not None]
        shared = sorted({p for p in named if named.count(p) > 1}, key=str)
        if shared:
            raise SymmetryError(f"GL {name!r}: parameter path {shared[0]!r} is named more than once in left={left!r}, "
                                f"right={right!r}; the two factors (and their biases) must be different parameters")

    def paths(self):
        return tuple(p for p in self.left + self.right if p is not None)

    def _check(self, flat):
        super()._check(flat)
        for W, b in (self.left, self.right):
            if flat[W].ndim < 2:
                raise SymmetryError(f"GL {self.name!r} ({self.kind}): {W!r} must be a matrix (with leading head "
                                    f"axes), got shape {flat[W].shape}")
            if b is not None and flat[b].shape != flat[W].shape[:-2] + flat[W].shape[-1:]:
                raise SymmetryError(f"GL {self.name!r} ({self.kind}): bias {b!r} must have shape "
                                    f"{flat[W].shape[:-2] + flat[W].shape[-1:]} to go with {W!r} of shape "
                                    f"{flat[W].shape}, got {flat[b].shape}")
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
        # U diag(s) V^T with Haar-random U, V.  log s spans an interval of width exactly 3 scale (condition number
        # exp(3 scale)) placed at a random offset c ~ U(-1.5 scale, 1.5 scale) per head, the other d - 2 values
        # uniform inside it: log |det| = sum log s differs from key to key.  (linspace(-1.5 scale, 1.5 scale) alone
        # gave the same singular values for every key, whose product is 1: no sampled element dilated.)
        batch, d, dt = self._batch(flat), self._d(flat), flat[self.left[0]].dtype
        k1, k2 = jax.random.split(key)
        U, V = _random_orthogonal(k1, batch, d, dt), _random_orthogonal(k2, batch, d, dt)
        log_s = jax.random.uniform(jax.random.fold_in(key, 2), batch + (1,), dt, -1.5, 1.5) * scale
        if d > 1:
            inner = jax.random.uniform(jax.random.fold_in(key, 3), batch + (d - 2,), dt, -1.0, 1.0)
            ends = jnp.broadcast_to(jnp.asarray([-1.0, 1.0], dt), batch + (2,))
            log_s = log_s + 1.5 * scale * jnp.concatenate([ends, inner], axis=-1)
        return (U * jnp.exp(log_s)[..., None, :]) @ _mT(V)

    def _identity(self, flat):
        return jnp.broadcast_to(jnp.eye(self._d(flat), dtype=flat[self.left[0]].dtype),
                                self._batch(flat) + (self._d(flat),) * 2)

    def _act(self, g, flat):
        out = dict(flat)
        L, R = self._L(flat), self._R(flat)
        g = g.astype(L.dtype)  # (an element of another float width: sampled at float64 parameters)
        out.update(self._unstack(flat, L @ g, _mT(jnp.linalg.solve(g, _mT(R)))))
        return out

    def _check_element_values(self, g, where: str = "") -> None:
        # a singular matrix is no element of GL(d): act solved with it and returned inf / NaN for the right factor
        # (W_K or W_O) silently; a matrix whose LU factorisation meets an exactly zero pivot is refused here
        super()._check_element_values(g, where)
        if not jnp.issubdtype(jnp.result_type(g), jnp.floating):
            return
        a = np.asarray(g).astype(np.float64)  # (numpy: a concrete element closed over by a jitted function)
        heads = a.reshape((-1,) + a.shape[-2:])
        for h, m in enumerate(heads):
            if not np.all(np.isfinite(m)):
                continue
            try:
                np.linalg.inv(m)
            except np.linalg.LinAlgError:
                at = f" at head {tuple(int(i) for i in np.unravel_index(h, a.shape[:-2]))}" if a.ndim > 2 else ""
                raise ValueError(f"act: {where}the element for GL {self.name!r} is a singular matrix{at}; a GL "
                                 f"element must be invertible: sample it, or compose / invert elements of this "
                                 f"group") from None

    def _inverse(self, g):
        # a bfloat16 / float16 element (one cast to low-precision parameters' dtype, which act and compose take) is
        # inverted in float32 and returned in its dtype: XLA:CPU has no such LU kernel, and inverse raised its bare
        # "NotImplementedError: Unsupported dtype bfloat16"
        g = jnp.asarray(g)
        if jnp.issubdtype(g.dtype, jnp.floating) and jnp.finfo(g.dtype).bits < 32:
            return jnp.linalg.inv(g.astype(jnp.float32)).astype(g.dtype)
        return jnp.linalg.inv(g)

    def _cotransport(self, g, cot):
        # rho(A): L -> L A, R -> R A^{-T}; so rho(A)^{-T}: L -> L A^{-T}, R -> R A (one inverse, no solve with it)
        out = dict(cot)
        g = g.astype(self._L(cot).dtype)
        out.update(self._unstack(cot, self._L(cot) @ _mT(jnp.linalg.inv(g)), self._R(cot) @ g))
        return out

    def _compose(self, g, h):
        # g.(h.theta): L -> L A_h A_g (elements of two float widths: in their common dtype)
        g, h = common_float(g, h)
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
        d, m, k = L.shape[-1], L.shape[-2], R.shape[-2]
        if d > min(m, k):  # M = L R^T has rank <= min(m, k) < d: no orbit has a balanced point
            raise SymmetryError(
                f"canonicalize: GL {self.name!r} acts on an inner dimension d={d} wider than its factors' other "
                f"sides ({m} and {k} rows); a canonical section is implemented for d <= min of them (then the "
                f"product L R^T determines the orbit). Use the invariants (the product) instead.")

        def balance(L, R):
            Q1, R1 = jnp.linalg.qr(L)
            Q2, R2 = jnp.linalg.qr(R)
            # with R1 R2^T = u S v^T: L' = Q1 u diag(sqrt s) Q = L A  with  A = R1^{-1} u diag(sqrt s) Q, balanced for
            # any orthogonal Q (L'^T L' = R'^T R' = Q^T S Q); Q fixes the signs, and the basis where singular values
            # repeat
            (target,) = gauged_powers(R1 @ _mT(R2), d, (0.5,), Q1)
            return jnp.linalg.solve(R1, target)

        # A head whose M has rank < d (a zero or rank-deficient factor, e.g. a zero-initialised W_O) has no balanced
        # point on its orbit (the minimum norm is approached only in the orbit's closure): A is then singular or
        # not finite, and g . theta would be NaN.  Such a head keeps the identity (finite, same function, but not
        # constant on its orbit).
        def usable_at(L, R, A):
            moved = jnp.concatenate([L @ A, _mT(jnp.linalg.solve(A, _mT(R)))], axis=-2)
            return jnp.all(jnp.isfinite(moved), axis=(-2, -1))[..., None, None]

        def identity_like(A):
            return jnp.broadcast_to(jnp.eye(d, dtype=A.dtype), A.shape)

        @jax.custom_jvp
        def element(L, R):
            A = balance(L, R)
            return jnp.where(usable_at(L, R, A), A, identity_like(A))

        @element.defjvp
        def element_jvp(primals, tangents):
            # The identity's branch carries no derivative, but differentiating the discarded balancing of such a
            # head (a zero singular value under sqrt, a singular solve) gave 0 times infinity: jax.grad of a
            # canonicalisation was NaN for every parameter of the action.  Differentiated, the balancing is
            # evaluated again with such heads' factors replaced by well-conditioned ones (distinct singular
            # values); undifferentiated (training's observables) it runs once.
            L, R = primals
            usable = usable_at(L, R, balance(L, R))
            safe_l = jnp.eye(m, d, dtype=L.dtype) * jnp.arange(1, d + 1, dtype=L.dtype)[None, :]
            safe_r = jnp.eye(k, d, dtype=R.dtype) * (d + 1)
            A, dA = jax.jvp(balance, (jnp.where(usable, L, safe_l), jnp.where(usable, R, safe_r)), tangents)
            return jnp.where(usable, A, identity_like(A)), jnp.where(usable, dA, jnp.zeros_like(dA))

        return element(L, R)

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


def sylvester_vcoeffs(gls, flat, v, *, refine: int = REFINE_STEPS) -> list[jax.Array]:
    """The vertical coefficients of several GL actions (no shared parameters), with one batched SVD.

    For each action, the Sylvester normal equations ``(L^T L) X + X (R~^T R~) = J^T v`` are solved in the
    eigenbases of the two Gram matrices, ``X = U [(U^T C V) / (lam_i + mu_j)] V^T`` (pseudo-inverse on the
    degenerate directions).  The eigenbases and eigenvalues come from the singular value decompositions of the
    factors themselves, ``L = P diag(s) U^T`` with ``lam = s^2``, not from ``eigh`` of the Gram matrices: forming
    ``L^T L`` squares the condition number, so at an unbalanced head (a GL element of condition number ``e^7.5``)
    its float32 ``eigh`` returned a negative eigenvalue where the true one was ``1e-5`` and the dropped direction
    left the projection 7% of ``|v|`` off, refinement or not.  The SVD resolves ``s`` to ``eps s_max``, so a
    direction is dropped only where ``sqrt(lam_i + mu_j)``, a singular value of the tangent map ``J``, is below
    ``eps n`` of the largest (``n``: the factors' row count), as a least-squares solve would.  The factors of all
    actions with the same ``d`` (rows padded with zeros, which change neither ``s`` nor ``U``) go through one
    ``svd`` call: on CPU each small decomposition is dominated by per-call overhead.  Normal equations still
    amplify the rounding of the right-hand side, so ``refine`` steps of iterative refinement follow: the residual
    ``r = v - J X`` is formed in parameter space and ``X += solve(J^T r)`` in the same bases (a few small products;
    the error contracts by ``~eps cond(J)`` per step; XLA merges the repeated SVD of the same factors).  Derivatives
    follow the pseudo-inverse of the Sylvester operator (:func:`_sylvester_solve`), not the SVD."""
    facs = [(g._L(flat), g._R(flat)) for g in gls]
    by_shape: dict[tuple, list[int]] = {}
    for i, (L, _) in enumerate(facs):
        by_shape.setdefault((L.shape[-1], L.dtype), []).append(i)
    out: list = [None] * len(gls)
    for idx in by_shape.values():
        Ls, Rs = tuple(facs[i][0] for i in idx), tuple(facs[i][1] for i in idx)
        Xs = _sylvester_solve(Ls, Rs, tuple(gls[i]._tmap_T(flat, v) for i in idx))
        for _ in range(refine):
            rhs = []
            for i, X in zip(idx, Xs):
                r = {p: v[p] - x for p, x in gls[i]._tmap(flat, X).items()}
                rhs.append(gls[i]._tmap_T(flat, r))
            Xs = tuple(X + dX for X, dX in zip(Xs, _sylvester_solve(Ls, Rs, tuple(rhs))))
        for i, X in zip(idx, Xs):
            out[i] = X
    return out


def _sylvester_solvers(Ls, Rs):
    """Per action (factors ``L``, ``R~`` of one inner width ``d``), the pseudo-inverse of the Sylvester operator
    ``X -> (L^T L) X + X (R~^T R~)`` as a function of ``X`` (shape ``batch + (d, d)``), from one batched SVD of
    every factor (see :func:`sylvester_vcoeffs`)."""
    d = Ls[0].shape[-1]
    rows = max([d] + [x.shape[-2] for x in Ls + Rs])

    def stack(x):  # (..., m, d) -> (n, rows, d), zero rows appended
        x = x.reshape(-1, x.shape[-2], d)
        return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0)))

    parts = [stack(x) for L, R in zip(Ls, Rs) for x in (L, R)]
    sizes = [x.shape[0] for x in parts[::2]]
    _, s, Vt = jnp.linalg.svd(jnp.concatenate(parts, axis=0), full_matrices=False)
    w, Q = jnp.square(s), _mT(Vt)  # Gram eigenvalues (n, d) and eigenvectors (columns)
    solvers, start = [], 0
    for L, n in zip(Ls, sizes):
        lam, mu = w[start:start + n], w[start + n:start + 2 * n]
        U, V = Q[start:start + n], Q[start + n:start + 2 * n]
        start += 2 * n
        denom = lam[..., :, None] + mu[..., None, :]
        cut = jnp.square(jnp.finfo(denom.dtype).eps * rows) * jnp.max(denom, axis=(-2, -1), keepdims=True)
        inv = inverse_where(denom, denom > cut)

        def solve(C, U=U, V=V, inv=inv, n=n, batch=L.shape[:-2]):
            X = U @ ((_mT(U) @ C.reshape(n, d, d) @ V) * inv) @ _mT(V)
            return X.reshape(batch + (d, d))

        solvers.append(solve)
    return solvers


@jax.custom_jvp
def _sylvester_solve(Ls, Rs, Cs):
    """``T_i^+ C_i`` for the Sylvester operators ``T_i X = (L_i^T L_i) X + X (R~_i^T R~_i)`` of several GL actions
    of one inner width (:func:`_sylvester_solvers`).

    Differentiated by the constant-rank formula for the pseudo-inverse of the (self-adjoint, positive
    semi-definite) operator ``T``, ``d(T^+) = -T^+ dT T^+ + T^+ T^+ dT (I - T T^+) + (I - T^+ T) dT T^+ T^+`` with
    ``dT X = d(L^T L) X + X d(R~^T R~)``: ``T^+`` only, never the singular vectors, so it is finite where singular
    values coincide (a head whose factors have orthonormal columns, ``L^T L = I``); differentiating through the
    ``svd`` divides by singular-value gaps and returned NaN there."""
    return tuple(solve(C) for solve, C in zip(_sylvester_solvers(Ls, Rs), Cs))


@_sylvester_solve.defjvp
def _sylvester_solve_jvp(primals, tangents):
    (Ls, Rs, Cs), (dLs, dRs, dCs) = primals, tangents
    outs, douts = [], []
    for S, L, R, C, dL, dR, dC in zip(_sylvester_solvers(Ls, Rs), Ls, Rs, Cs, dLs, dRs, dCs):
        Gl, Gr = _mT(L) @ L, _mT(R) @ R
        dGl, dGr = _mT(dL) @ L + _mT(L) @ dL, _mT(dR) @ R + _mT(R) @ dR

        def T(X, Gl=Gl, Gr=Gr):
            return Gl @ X + X @ Gr

        def dT(X, dGl=dGl, dGr=dGr):
            return dGl @ X + X @ dGr

        X = S(C)
        Y = dT(S(X))
        dX = S(dC) - S(dT(X)) + S(S(dT(C - T(X)))) + Y - S(T(Y))
        outs.append(X)
        douts.append(dX)
    return tuple(outs), tuple(douts)

"""Extreme eigenvalues of the (projected) Hessian by Lanczos on Hessian-vector products (THEORY sections 3-4).

``P H P`` with ``P`` the Euclidean horizontal projection at the evaluation point: the Hessian restricted to the
directions that change the network function.  Lanczos (full or partial reorthogonalisation in a loop, or the
straight-line version, in :func:`lanczos_extremes`; or matfree's fully reorthogonalised tridiagonalisation)
started from a horizontal vector stays in the horizontal space, so the ``k`` zero eigenvalues that ``P H P`` has
on the vertical space do not pollute the bottom of the spectrum.  The Hessian-vector product is
``jax.linearize`` of the gradient, linearised once and applied ``num_matvecs`` times.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matfree import decomp, eig

from .._tree import widen
from .._reduce import matmul_highest as _mm  # full precision on accelerators (TF32 / bfloat16 otherwise)
from ._kinds import ORBIT_INVARIANT, RAW, REDUCED_DYNAMICS, observable
from ._util import check_like, tree_dot, tree_norm, tree_random_normal, tree_scale


class Extremes(NamedTuple):
    """Top-``k`` (descending) and bottom-``k`` (ascending) Ritz values with their Ritz vectors (pytrees like
    the parameters, with a leading axis ``k``)."""

    top: jax.Array
    bottom: jax.Array
    top_vectors: Any
    bottom_vectors: Any


#: A Lanczos step breaks down when the reorthogonalised residual is rounding noise: below ``_BREAKDOWN_EPS`` units
#: of the iteration dtype's ``eps`` times ``|A q|`` (the largest seen, a lower bound on ``|A|``).  The Krylov space is
#: then invariant to working precision (exhausted, or ``v0`` lies in an invariant subspace), and what is left of the
#: residual is the rounding of the product and of the Gram-Schmidt pass, not a new direction: measured (the residual
#: after the space is exhausted, in units of ``eps |A|``) 0.8-10 in float64 and 0.9-26 in float32 for rank-3
#: operators on n = 10-300 (the float32 ones stored in float32, whose rounding of the entries is itself a
#: perturbation of ~``eps |A|``), ~1e-7 once the whole space is spanned.  A residual above it is a new direction,
#: however small against the top: a spectrum whose bulk is small against its outliers (a Hessian's bulk at 1e-2 of a
#: top of 1e3, or at 1e-10 - 1e-11 of it in float64) leaves residuals of ``~ bulk / top``.  A fixed fraction stopped
#: there: float64 at 1e-10 (4.5e5 eps) took such a bulk's residuals for a breakdown and gave bottom eigenvalues 38-50%
#: (1e-10 bulk) and 130-340% (a bulk in [1e-11, 1e-10]) off the dense ones (n = 200, 40 steps, restarts or not);
#: float32 at 2e-5 (168 eps) did the same to a bulk at 1e-5 of the top (a bottom 44% off).  What the rounding of the
#: products seeds into such small residuals is a real direction of the operator: with ``restart=False`` a top
#: eigenvalue 2 of multiplicity two, beside a float64 bulk at 1e-10, was found twice (to 2e-15), as a restart would.
_BREAKDOWN_EPS = 16.0


def _breakdown_tol(dtype) -> float:
    """The breakdown threshold of a residual, relative to ``|A q|``: ``_BREAKDOWN_EPS`` units of ``dtype``'s eps."""
    return _BREAKDOWN_EPS * float(jnp.finfo(dtype).eps)


#: The breakdown threshold of an operator restricted to a domain (``lanczos_extremes(..., domain=P)``: ``P A P``,
#: the horizontal Hessian), relative to ``|P A q|``: the projection is exact only to its own solver's tolerance (the
#: conjugate-gradient split of a large rescale chain stops at 1e-12 in float64) and its rounding, so once the domain
#: is exhausted the residual is that error, not ``A``'s rounding.  At ``_BREAKDOWN_EPS`` eps (3.6e-15 in float64)
#: the iteration went on normalising it: a repeated zero of a horizontal Hessian came out as -1e-6 with a positive
#: eigenvalue lost, and a restart left the domain (tests/test_optim_probe4.py).  A bulk of a restricted operator
#: below this fraction of its top is therefore still taken for a breakdown (the operator on the whole space
#: resolves it).
_PROJECTED_BREAKDOWN = {"float32": 2e-6, "float64": 1e-10}


def _projected_breakdown_tol(dtype) -> float:
    return _PROJECTED_BREAKDOWN.get(jnp.dtype(dtype).name, 2e-5)


def _restart_tol(dtype) -> float:
    """Restart vectors (:func:`_lanczos_step`): what is left of a fresh vector after its orthogonalisation against
    the basis is a new direction when above this fraction of its norm, the square root of the restricted breakdown
    threshold (1.4e-3 / 1e-5 in float32 / float64; a Gaussian vector keeps ``~ sqrt(m / n)`` of it with ``m`` of
    ``n`` dimensions left; an exhausted domain leaves the rounding and, in float32, the basis' tilt off the domain,
    up to ~1e-3 before the second pass)."""
    return math.sqrt(_projected_breakdown_tol(dtype))


def _sqrt0(x):
    """``sqrt(x)`` for ``x >= 0`` whose derivative at ``x = 0`` is zero instead of NaN (the double ``where``).

    Norms of Lanczos vectors are ``_sqrt0(<w, w>)``: after a breakdown the vectors and residuals are exactly zero,
    where the derivative of ``jnp.linalg.norm`` is NaN, and ``jax.grad`` of an extreme eigenvalue (a sharpness
    penalty) with ``num_matvecs`` above the dimension was NaN in every entry."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, jnp.ones_like(x))), jnp.zeros_like(x))


# The Lanczos vectors are pytrees (the parameters' leaves, in their shapes or ravelled one by one), the basis ``Q``
# one ``(K, leaf size)`` matrix per leaf: no ravel of the whole vector around the operator, which on XLA:CPU is a
# concatenation kernel per ravel (three or four per step; the benchmark MLP's 20-step P H P Lanczos took 43.4 ms
# with them, 36.3-37.6 ms without).


def _lincomb(a, x, b=None, y=None, c=None, z=None):
    """``a x + b y + c z`` leaf by leaf (scalars ``a, b, c``; the terms given)."""
    def one(*leaves):
        out = a * leaves[0]
        if b is not None:
            out = out + b * leaves[1]
        if c is not None:
            out = out + c * leaves[2]
        return out
    trees = [t for t, w in ((x, a), (y, b), (z, c)) if w is not None]
    return jax.tree.map(one, *trees)


def _basis_zeros(num_rows, v):
    """An empty basis for vectors like ``v``: one ``(K, leaf size)`` matrix per leaf."""
    return jax.tree.map(lambda x: jnp.zeros((num_rows, x.size), x.dtype), v)


def _basis_set(qmat, j, q):
    """``Q`` with row ``j`` set to ``q``: a dynamic-update-slice of each leaf's matrix, in place in a loop.  (With
    the basis in the leaves' shapes, ``(K,) + shape``, XLA:CPU fused the row update into the reshape that each
    GEMV needs and copied the whole basis, three 20 x 256 x 256 copies per step on the benchmark MLP; and
    ``m.at[j].set`` is a scatter.)"""
    return jax.tree.map(lambda m, x: jax.lax.dynamic_update_index_in_dim(m, jnp.reshape(x, (-1,)), j, 0), qmat, q)


def _basis_coefficients(qmat, w):
    """``Q w``, shape ``(K,)``: one GEMV per leaf."""
    parts = [_mm(m, jnp.reshape(x, (-1,))) for m, x in zip(jax.tree.leaves(qmat), jax.tree.leaves(w))]
    return sum(parts[1:], parts[0])


def _basis_combination(qmat, c, like):
    """``Q^T c``, a vector shaped like ``like``."""
    return jax.tree.map(lambda m, x: jnp.reshape(_mm(c, m), x.shape), qmat, like)


def _orthogonalise(qmat, w):
    """``w - Q^T (Q w)``: one classical Gram-Schmidt pass against the rows of ``Q``.  (The rows past the step
    are zero and could be skipped: a basis in two or four blocks, each filled by its own loop and passing over
    the blocks built so far only, was not faster on the benchmark MLP: a GEMV of 10 rows of 65k took 71 us
    against 107 us for 20.)"""
    return jax.tree.map(jnp.subtract, w, _basis_combination(qmat, _basis_coefficients(qmat, w), w))


def _semiorthogonality(dtype, num_matvecs: int) -> float:
    """The level of orthogonality partial reorthogonalisation keeps (:func:`_omega_next`): ``sqrt(eps / K)`` for
    ``K = num_matvecs`` steps (Larsen's PROPACK default; Simon's semi-orthogonality is ``sqrt(eps)``), 7.7e-5 /
    3.3e-9 in float32 / float64 for ``K = 20``.  Below ``sqrt(eps)`` the tridiagonal matrix is, to working
    precision, the operator's projection on the Krylov space (Simon 1984): its Ritz values are those of full
    reorthogonalisation; the ``1 / sqrt(K)`` keeps the Ritz vectors ``Q^T s`` (sums of ``K`` rows) unit and
    orthogonal to ``~sqrt(eps)``."""
    return math.sqrt(float(jnp.finfo(dtype).eps) / num_matvecs)


def _omega_next(j, alphas, betas, omega_prev, omega_cur, alpha, beta_prev, beta, theta):
    """Simon's recurrence for the loss of orthogonality: estimates ``omega_{j+1, k}`` of ``<q_{j+1}, q_k>``,
    ``k <= j``, from those of ``q_j`` (``omega_cur``) and ``q_{j-1}`` (``omega_prev``) and the tridiagonal entries.
    With ``A q_i = beta_{i-1} q_{i-1} + alpha_i q_i + beta_i q_{i+1} + f_i`` (``f_i`` the rounding, ``|f_i| ~ eps
    |A|``), ``<q_{j+1}, A q_k> = <A q_{j+1}, q_k>`` gives ``beta_j omega_{j+1,k} = beta_k omega_{j,k+1} + (alpha_k -
    alpha_j) omega_{j,k} + beta_{k-1} omega_{j,k-1} - beta_{j-1} omega_{j-1,k} + <q_k, f_j> - <q_j, f_k>``; the
    rounding terms are bounded by ``theta`` (``~eps |A|``) with the sign that makes the estimate larger, and the
    local one, ``omega_{j+1,j}``, is ``theta / beta_j``.  Arrays of length ``K``: entries ``k < i`` of row ``i`` are
    estimates, entry ``i`` is one (set here), those past it unused; ``alphas``, ``betas`` hold ``alpha_k``,
    ``beta_k`` for ``k < j``."""
    idx = jnp.arange(omega_cur.shape[0])
    cur = jnp.where(idx == j, jnp.ones_like(omega_cur), omega_cur)
    prev = jnp.where(idx == j - 1, jnp.ones_like(omega_prev), omega_prev)
    zero = jnp.zeros((1,), cur.dtype)
    up = jnp.concatenate([cur[1:], zero])  # omega_{j, k+1}
    down = jnp.concatenate([zero, cur[:-1]])  # omega_{j, k-1}
    beta_down = jnp.concatenate([zero, betas[:-1]])  # beta_{k-1}
    x = betas * up + (alphas - alpha) * cur + beta_down * down - beta_prev * prev
    x = x + jnp.where(x < 0, -theta, theta)
    inv = 1 / jnp.where(beta > 0, beta, jnp.ones_like(beta))
    out = jnp.where(idx < j, x * inv, jnp.zeros_like(x))
    return jnp.where(idx == j, theta * inv, out)


def _omega_reset(j, omega, eps):
    """The estimates of a vector orthogonalised against the whole basis: ``eps`` for ``k <= j``."""
    idx = jnp.arange(omega.shape[0])
    return jnp.where(idx <= j, eps, jnp.zeros_like(omega))


def _lanczos_step(matvec: Callable, j, qmat, q, q_prev, beta_prev, done, fill, scale, restart=None, residual=None,
                  restricted: bool = False, omega=None):
    """One Lanczos step: the three-term recurrence ``w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, then one
    classical Gram-Schmidt pass against the rows of ``qmat`` (rows past ``j`` are zero; a pass over the rows
    built so far only was measured slower on XLA:CPU: the slice is a copy), at every step (``omega=None``: full
    reorthogonalisation) or where partial reorthogonalisation asks for it (``omega``).  The recurrence is the first
    orthogonalisation, so the full pass acts on a residual already orthogonal to the basis up to rounding
    ("twice is enough"): the basis stays orthogonal to working precision at half the memory traffic of two full
    passes (a 20-step raw-Hessian Lanczos on an 85k-parameter MLP: 25.5 -> 19.8 ms on one core).  Vectors are
    pytrees (one array or the parameters' leaves), ``qmat`` the basis, one ``(K, leaf size)`` matrix per leaf.

    ``omega``: ``(alphas, betas, omega_{j-1}, omega_j, again)``, Simon's partial reorthogonalisation.  The pass runs
    only when the estimated loss of orthogonality of the next vector (:func:`_omega_next`, with the rounding of a
    step taken as ``eps`` times ``scale`` or the measured ``|<q_{j-1}, w>|``, the larger) exceeds ``sqrt(eps / K)``
    (:func:`_semiorthogonality`), and then also at the next step (``again``: ``q_j`` is only semi-orthogonal, and
    the recurrence would hand its loss on to ``q_{j+2}``); the estimates of an orthogonalised vector are reset to
    ``eps``.  The plain recurrence loses orthogonality only once a Ritz value has converged: on the benchmark MLP's
    ``P H P`` (20 steps, float32) its basis was orthogonal to 1e-6 for 12 steps, to 2e-5 at 14, lost at 16-19 (0.5);
    the partial scheme ran 4 of the 20 passes there (for rows 13-14, 18-19), keeping ``|Q Q^T - I|`` at 3e-6, and the
    Ritz values of full reorthogonalisation to 1e-6 relative; the 20-step Lanczos took 36-41 against 43-53 ms (raw
    ``H``) and 43-52 against 52-62 ms (``P H P``) of one core's time, compiled and run in the same process (33-37 /
    43 ms with no pass at all; the compile time unchanged, 7.5-8.4 against 8.3-8.7 s).  The estimates bound the true
    inner products (measured 5-7x below the level on spectra whose top converges within 10 steps, float32 and
    float64). A breakdown (``beta_j`` below the breakdown threshold) always runs the pass first: the local estimate
    ``eps scale / beta_j`` exceeds the level once ``beta_j < sqrt(eps K) scale``, above either threshold.  A pass
    that shrinks the residual below ``1 / sqrt(2)`` of its norm (a near-breakdown) is repeated: against a
    semi-orthogonal basis one pass leaves ``~|Q Q^T - I|`` of what it removes, and the raw Hessian of a
    rank-deficient 15-parameter classifier with 15 steps (``beta_8 = 1.5e-13 |A|``) lost the basis' orthogonality
    entirely and read a fourfold zero eigenvalue as three zeros and 4e-6 (tests/test_optim_probe4.py). Returns
    ``omega`` updated as a seventh element, ``(omega_j, omega_{j+1}, again)``.

    After a breakdown (``done``) the step is inert: ``q`` is zero, ``beta = 0`` and ``alpha = fill``.  With ``fill``
    the first diagonal entry ``alpha_0`` (a Rayleigh quotient of the leading block, so inside its spectrum), the
    padded tridiagonal matrix has the leading block's eigenvalues plus copies of ``fill``, which are never more
    extreme: the extremes are those of the Krylov space actually built.

    The breakdown test compares the residual with ``scale``, the largest ``|A q_i|`` seen so far (``i <= j``; a
    lower bound on ``|A|``; pass zero at the first step), not with this step's ``|A q_j|`` alone: once ``q_j``
    lies (almost) in the operator's null space (a Hessian's symmetry and dead directions), ``|A q_j|`` is itself
    rounding noise, the residual left after the space is exhausted is not small against it, and the recurrence
    went on normalising noise (a rank-139 operator on ``n = 192`` with ``n`` steps: Ritz values ``~1e17``).

    ``restart``: ``(draw, settle)``: ``draw(j)`` a vector of the operator's domain (e.g. a projected Gaussian
    vector), ``settle`` the projection onto that domain (identity for the whole space).  At a breakdown
    the Krylov space of the start is invariant, but it holds one direction per distinct eigenvalue only: a
    repeated eigenvalue (a null space, a degenerate top) appears once.  With ``restart`` the step then continues
    from ``draw(j)`` orthogonalised against the basis, projected by ``settle`` and orthogonalised again
    (``beta_j = 0``: ``T`` becomes block diagonal, its
    eigenvalues those of each invariant block), so that ``num_matvecs`` at or above the dimension gives the whole
    spectrum with multiplicities; it stops when what is left of ``draw(j)`` is below ``_restart_tol`` of its norm
    (the domain exhausted).
    ``residual``: ``(q_j, q_{j-1}, beta_{j-1}) -> (alpha_j, P (A q_j - alpha_j q_j - beta_{j-1} q_{j-1}))`` with
    ``P`` the orthogonal projection onto the operator's domain, in place of ``matvec`` (which is then not called).
    Projecting the product alone, as ``P A`` does, leaves in the residual the rounding of ``q_j`` and ``q_{j-1}``
    off the domain, which the division by ``beta_j`` amplifies by ``alpha_j / beta_j`` at every step.
    ``restricted``: the operator acts on a domain given by a projection (the breakdown threshold is then
    ``_PROJECTED_BREAKDOWN``, else ``_BREAKDOWN_EPS`` eps); a Python bool, or a traced boolean scalar when one
    traced iteration serves operators of both kinds (the points of ``quotient_trajectory``'s Hessian, the raw one
    beside the projected ones).
    Returns ``(qmat, alpha_j, beta_j, q_{j+1}, done_{j+1}, scale)``."""
    # a dynamic-update-slice, in place in the loop (``m.at[j].set`` is a scatter, which XLA:CPU expanded into
    # copies of the basis at every step: 3 of the 256 x 256 leaf's 20 x 256 x 256 block)
    qmat = _basis_set(qmat, j, q)
    if residual is None:
        w = matvec(q)
        a = tree_dot(q, w)
        scale = jnp.maximum(scale, _sqrt0(tree_dot(w, w)))
        w = _lincomb(1, w, -a, q, -beta_prev, q_prev)
    else:
        a, w = residual(q, q_prev, beta_prev)
        # |P A q_j| = |w + alpha_j q_j + beta_{j-1} q_{j-1}|, three orthogonal terms (no pass over the vectors)
        scale = jnp.maximum(scale, _sqrt0(tree_dot(w, w) + a * a + beta_prev * beta_prev))
    alpha = jnp.where(done, fill, a)
    dtype = jax.tree.leaves(w)[0].dtype
    if omega is None:
        w = _orthogonalise(qmat, w)
        beta = _sqrt0(tree_dot(w, w))
    else:
        alphas, betas, omega_prev, omega_cur, again = omega
        eps = jnp.asarray(jnp.finfo(dtype).eps, dtype)
        beta = _sqrt0(tree_dot(w, w))
        # the rounding of a step: eps |A|, or what the operator's own rounding (leaves of a narrower dtype, a
        # product at reduced matmul precision, an inexact projection) leaves of <q_{j-1}, w>, which the
        # recurrence makes ~eps |A| for an exactly symmetric operator: measured, one dot product
        theta = jnp.maximum(eps * scale, jnp.abs(tree_dot(q_prev, w)))
        omega_next = _omega_next(j, alphas, betas, omega_prev, omega_cur, a, beta_prev, beta, theta)
        level = _semiorthogonality(dtype, omega_cur.shape[0])
        reorth = again | (jnp.max(jnp.abs(omega_next)) > level)

        def full(w):
            w = _orthogonalise(qmat, w)
            nw = _sqrt0(tree_dot(w, w))

            def second(w):
                w = _orthogonalise(qmat, w)
                return w, _sqrt0(tree_dot(w, w))

            # the basis is only semi-orthogonal: one pass leaves ~ |Q Q^T - I| of the components it removes, which
            # a residual that the pass shrank (a near-breakdown) cannot afford; a second pass then (Daniel, Gragg,
            # Kaufman and Stewart's criterion, |w| below 1/sqrt(2) of its norm before the pass)
            return jax.lax.cond(nw * nw < 0.5 * beta * beta, second, lambda w: (w, nw), w)

        w, beta = jax.lax.cond(reorth, full, lambda w: (w, beta), w)
        omega_next = jnp.where(reorth, _omega_reset(j, omega_next, eps), omega_next)
        again = reorth & ~again
    if isinstance(restricted, (bool, np.bool_)):
        tol = _projected_breakdown_tol(dtype) if restricted else _breakdown_tol(dtype)
    else:  # a traced flag: one iteration serving operators with and without a domain (lax.map over points)
        tol = jnp.where(restricted, _projected_breakdown_tol(dtype), _breakdown_tol(dtype)).astype(dtype)
    stop = done | (beta <= tol * scale)
    beta = jnp.where(stop, jnp.zeros_like(beta), beta)
    inv = jnp.where(stop, jnp.zeros_like(beta), 1 / jnp.where(stop, jnp.ones_like(beta), beta))
    q_next = _lincomb(inv, w)
    if restart is not None:
        draw, settle = restart

        def fresh(_):
            r0 = draw(j)
            r = _orthogonalise(qmat, r0)
            # back into the domain: in float32 the basis drifts off it (the horizontal space) by up to ~1e-3, and
            # what that tilt leaves of an exhausted domain's vector is not a new direction of it
            r = _orthogonalise(qmat, settle(r))  # twice is enough
            nr, n0 = _sqrt0(tree_dot(r, r)), _sqrt0(tree_dot(r0, r0))
            ok = nr > _restart_tol(dtype) * n0
            return _lincomb(jnp.where(ok, 1 / jnp.where(ok, nr, jnp.ones_like(nr)), jnp.zeros_like(nr)), r), ~ok

        # a real branch: the restart vector (a projection for the horizontal Hessian) only at a breakdown
        q_next, stop = jax.lax.cond(stop & ~done, fresh, lambda _: (q_next, stop), None)
    if omega is not None:
        # after a breakdown the next vector (a restart) is orthogonalised against the whole basis
        omega_next = jnp.where(beta > 0, omega_next, _omega_reset(j, omega_next, eps))
        return qmat, alpha, beta, q_next, stop, scale, (omega_cur, omega_next, again & (beta > 0))
    return qmat, alpha, beta, q_next, stop, scale


def _tridiagonal(alphas, betas):
    t = jnp.diag(alphas)
    if betas.shape[0]:
        t = t + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return t


def _scalar_dtype(v0):
    return jax.tree.leaves(v0)[0].dtype


def _cast(v, like):
    """``v`` with its leaves in ``like``'s leaves' dtypes (``like`` a pytree), or all in the dtype ``like``."""
    if isinstance(like, (np.dtype, type)):
        return jax.tree.map(lambda x: jnp.asarray(x).astype(like), v)
    return jax.tree.map(lambda x, y: jnp.asarray(x).astype(y.dtype), v, like)


def _iteration_dtype(leaves):
    """The dtype the Lanczos iteration runs in: the leaves' common one by JAX's standard promotion, whatever
    ``jax_numpy_dtype_promotion`` is (under ``"strict"``, leaves of several dtypes, float32 with bfloat16 or float64
    with float32, failed with a bare ``TypePromotionError``), and at least float32: ``eigh`` of the tridiagonal
    matrix has no bfloat16 / float16 kernel on XLA:CPU ("Unsupported dtype bfloat16"), and those dtypes' 8 / 11
    bits cannot keep a basis orthogonal.  The operator still sees each leaf in its own dtype."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(jnp.float32, *leaves)


def _normalised(v0):
    n = _sqrt0(tree_dot(v0, v0))
    return _lincomb(1 / n, v0)


def _check_reortho(reortho) -> bool:
    """``True`` for ``"partial"``, ``False`` for ``"full"``; ``ValueError`` naming ``reortho`` otherwise."""
    if reortho not in ("partial", "full"):
        raise ValueError(f"lanczos_extremes: reortho must be 'partial' or 'full', got {reortho!r}")
    return reortho == "partial"


def _omega_init(num_matvecs: int, dtype):
    """The partial reorthogonalisation's state before the first step: the estimates of ``q_{-1}`` and ``q_0``
    (none) and the flag of a forced pass."""
    return jnp.zeros(num_matvecs, dtype), jnp.zeros(num_matvecs, dtype), jnp.zeros((), bool)


def _lanczos_loop(matvec: Callable, v0, num_matvecs: int, restart=None, residual=None, restricted: bool = False,
                  reortho: str = "full"):
    """Lanczos with full (``reortho="full"``) or partial reorthogonalisation (:func:`_lanczos_step`) in a
    ``fori_loop``: ``(T, Q, active)`` with
    ``T`` the ``K x K`` tridiagonal matrix, ``Q`` the Krylov basis (one ``(K, leaf size)`` matrix per leaf of
    ``v0``, rows zero after a breakdown) and ``active`` the ``(K,)`` mask of the rows built before the
    breakdown.  ``v0``: one array or a pytree of arrays of one dtype.  The operator is traced once."""
    dt = _scalar_dtype(v0)

    partial = _check_reortho(reortho)

    def body(j, carry):
        qmat, q, q_prev, beta_prev, alphas, betas, done, active, scale, omega = carry
        active = active.at[j].set(~done)
        out = _lanczos_step(matvec, j, qmat, q, q_prev, beta_prev, done, alphas[0], scale, restart, residual,
                            restricted, (alphas, betas) + omega if partial else None)
        qmat, alpha, beta, q_next, done, scale = out[:6]
        omega = out[6] if partial else omega
        return qmat, q_next, q, beta, alphas.at[j].set(alpha), betas.at[j].set(beta), done, active, scale, omega

    init = (_basis_zeros(num_matvecs, v0), _normalised(v0),
            jax.tree.map(jnp.zeros_like, v0), jnp.zeros((), dt),
            jnp.zeros(num_matvecs, dt), jnp.zeros(num_matvecs, dt), jnp.zeros((), bool),
            jnp.zeros(num_matvecs, bool), jnp.zeros((), dt),
            _omega_init(num_matvecs, dt) if partial else ())  # (full passes carry no estimates)
    qmat, _, _, _, alphas, betas, _, active, _, _ = jax.lax.fori_loop(0, num_matvecs, body, init)
    return _tridiagonal(alphas, betas[:-1]), qmat, active


def _lanczos_unrolled(matvec: Callable, v0, num_matvecs: int, restart=None, residual=None,
                      restricted: bool = False, reortho: str = "full"):
    """The same as :func:`_lanczos_loop` as straight-line code (the operator is traced ``num_matvecs`` times)."""
    partial = _check_reortho(reortho)
    dt = _scalar_dtype(v0)
    qmat = _basis_zeros(num_matvecs, v0)
    q = _normalised(v0)
    q_prev, beta = jax.tree.map(jnp.zeros_like, v0), jnp.zeros((), dt)
    done, scale = jnp.zeros((), bool), jnp.zeros((), dt)
    alphas, betas, active = [], [], []
    omega = _omega_init(num_matvecs, dt)
    for j in range(num_matvecs):
        active.append(~done)
        history = None
        if partial:
            pad = jnp.zeros(num_matvecs - j, dt)
            history = (jnp.concatenate([jnp.stack(alphas), pad]) if alphas else pad,
                       jnp.concatenate([jnp.stack(betas), pad]) if betas else pad) + omega
        out = _lanczos_step(matvec, j, qmat, q, q_prev, beta, done, alphas[0] if alphas else jnp.zeros((), dt),
                            scale, restart, residual, restricted, history)
        qmat, alpha, beta, q_next, done, scale = out[:6]
        omega = out[6] if partial else omega
        q_prev, q = q, q_next
        alphas.append(alpha)
        betas.append(beta)
    betas = jnp.stack(betas[:-1]) if num_matvecs > 1 else jnp.zeros(0, dt)
    return _tridiagonal(jnp.stack(alphas), betas), qmat, jnp.stack(active)


def lanczos_extremes(
    matvec: Callable, v0, *, num_matvecs: int = 20, k: int = 1, method: str = "loop", restart=True,
    domain: Callable | None = None, project_residuals: bool = False, reortho: str = "full",
) -> Extremes:
    """Top-``k`` and bottom-``k`` eigenpairs of a symmetric linear operator by ``num_matvecs`` Lanczos steps.

    Args:
        matvec: ``v -> A v`` on pytrees like ``v0`` (symmetric).
        v0: starting vector (any nonzero pytree; its span must contain the wanted eigenvectors' directions).
        num_matvecs: Krylov depth (at most the operator's rank on the span of ``v0``).
        k: how many extremes to return at each end (``2 k <= num_matvecs`` for disjoint ends).  With ``"loop"`` /
            ``"unrolled"``, the entries past the dimension of the space the iteration can build (``k`` above the
            dimension of the operator's domain, e.g. of a small model's horizontal space) are NaN, with zero
            vectors: there are no further eigenvalues.
        method: ``"loop"`` (default): reorthogonalisation by ``reortho`` in a ``lax.fori_loop``, the operator traced and
            compiled once (what :func:`quotient_sgd.optim.quotient_trajectory` uses).  ``"unrolled"``: the same
            arithmetic as straight-line code; the operator is traced ``num_matvecs`` times, so compile time grows
            with it, for no faster run on XLA:CPU: 20 steps of ``sharpness_horizontal`` compiled in 3.1 / 4.0 /
            9.9 s with ``"loop"`` against 6.9 / 5.8 / 22.8 s unrolled for the benchmark MLP / CNN / Transformer
            (``benchmarks/trajectory.py``), and ran in 39 / 98 / 249 ms against 41 / 95 / 257 ms (measured when the
            iteration ran on one ravelled vector).  (Run times on
            XLA:CPU with 2 threads are bimodal for both: 18-26 ms in one mode, 80-140 ms in another where both
            cores spin, for an 85k-parameter MLP.)  ``"matfree"``: ``matfree.decomp.tridiag_sym(num_matvecs,
            reortho="full")`` with ``matfree.eig.eigh_partial`` (a loop; 24 ms there).  ``"loop"`` and
            ``"unrolled"`` detect a breakdown (the Krylov space exhausted: ``num_matvecs`` above the dimension of
            the space, e.g. a small model's horizontal space) and restart or stop there (``restart``);
            ``"matfree"`` does not (it raises for ``num_matvecs`` above the dimension and can return a spurious
            value at it): keep ``num_matvecs`` below the dimension with it.
        restart: what ``"loop"`` / ``"unrolled"`` do at a breakdown.  The Krylov space of one start vector holds
            one direction per distinct eigenvalue, so a repeated eigenvalue (a null space, a degenerate top pair)
            is seen once however often it occurs, and top-``k`` / bottom-``k`` with ``k > 1`` would skip its
            copies.  ``True`` (default): continue from a fresh Gaussian vector orthogonal to the basis built (the
            operator's domain is the whole space), so ``num_matvecs`` at or above the dimension gives the
            operator's extremes with their multiplicities; a function ``j -> pytree like v0`` gives that vector
            instead (:func:`hessian_extremes`: a projected one, the domain being the horizontal space); ``False``:
            stop there, the extremes of the Krylov space built.  Before a breakdown (``num_matvecs`` well below
            the dimension), single-vector Lanczos still sees each eigenvalue once: a degenerate pair shows as one
            value.
        domain: the orthogonal projection onto the operator's domain when that is a subspace (``v -> P v`` for
            ``P H P``: the horizontal space), pytree to pytree; restart vectors are projected by it (Gaussian ones
            with ``restart=True``), also after their orthogonalisation against the basis.  ``None``: the whole space.
        project_residuals: apply ``domain`` (required) to every Lanczos residual ``A q_j - alpha_j q_j - beta_{j-1}
            q_{j-1}``.  ``matvec`` may then be the unprojected ``v -> A v``: the iteration is that of ``P A P`` on
            the domain, at one projection per step (:func:`hessian_extremes` passes ``H`` and ``P`` so).  It also
            keeps the Lanczos vectors in the domain: with ``matvec = P A`` their rounding off it stays in the
            residual, and each step amplifies it by ``alpha_j / beta_j`` (float32 ``P H P`` of a 15-parameter
            linear classifier with a 10-dimensional horizontal space: the tenth vector came out vertical, a
            spurious zero Ritz value, where the projected residuals give the dense eigenvalues).  ``"matfree"``
            applies ``domain`` to the products instead.
        reortho: ``"loop"`` / ``"unrolled"``: ``"full"`` (default): a Gram-Schmidt pass at every step (the basis
            orthogonal to working precision).  ``"partial"``: Simon's partial reorthogonalisation, a pass against
            the whole basis only where the recurrence's estimate of the loss of orthogonality exceeds
            ``sqrt(eps / num_matvecs)``, and at the step after (the basis semi-orthogonal, ``|Q Q^T - I|`` below
            that level; the Ritz values those of full reorthogonalisation to rounding; 4 of 20 passes on the
            benchmark MLP's ``P H P``).  Measured on that MLP (20 steps, one process, idle machine): alone 24.0 /
            32.0 ms (raw ``H`` / ``P H P``) against 26.2 / 34.1 ms with full passes, ~8% faster; under
            ``jax.vmap`` over 4 parameter sets its branches become selects that compute every pass, 141 / 286
            against 122 / 242 ms, ~17% slower; and the unrolled iteration compiles a branch per step.  So the
            observables (:func:`hessian_extremes`, run under ``vmap`` in sweeps) keep full passes.  ``"matfree"``
            always reorthogonalises fully.

    Returns:
        :class:`Extremes`.
    """
    return _lanczos_extremes(matvec, v0, num_matvecs=num_matvecs, k=k, method=method, restart=restart,
                             domain=domain, project_residuals=project_residuals, reortho=reortho)


def _lanczos_extremes(matvec: Callable, v0, *, num_matvecs: int, k: int, method: str, restart, domain,
                      project_residuals: bool, reortho: str, restricted=None) -> Extremes:
    """:func:`lanczos_extremes`, with the breakdown threshold's kind given: ``restricted`` ``None`` (that of an
    operator restricted to ``domain`` when one is given, else that of the whole space), or a boolean, possibly a
    traced scalar: ``quotient_trajectory`` runs the raw Hessian in one ``lax.map`` with the projected ones, under
    an identity ``domain`` chosen by a branch, and there the raw one must keep the whole space's threshold (with
    the restricted one, 1e-10 of the top in float64, a bulk below it was taken for a breakdown: a bottom eigenvalue
    1e-9 came out as 1.05e-8 beside a top of 1e3, where the raw Hessian alone resolves it)."""
    if not callable(matvec):  # (it failed inside the iteration with a bare "'int' object is not callable")
        raise TypeError(f"lanczos_extremes: matvec must be a function v -> A v, got {matvec!r}")
    _check_counts(num_matvecs, k)
    leaves = jax.tree.leaves(v0)
    if not leaves:
        raise ValueError("lanczos_extremes: v0 has no arrays; pass a nonzero starting vector like the operator's "
                         "argument")
    if not any(isinstance(x, jax.core.Tracer) for x in leaves) and not any(np.any(np.asarray(x) != 0) for x in leaves):
        # its normalisation divided by zero: every eigenvalue and vector came out NaN, silently
        raise ValueError("lanczos_extremes: v0 is zero; the Krylov space of a zero vector is empty (start from a "
                         "nonzero vector, e.g. a Gaussian one)")
    if method != "matfree":
        _check_reortho(reortho)
    if domain is not None and not callable(domain):
        raise TypeError(f"lanczos_extremes: domain must be None or a projection v -> P v, got {domain!r}")
    if project_residuals and domain is None:
        raise ValueError("lanczos_extremes: project_residuals=True needs domain= (the projection v -> P v onto the "
                         "operator's domain)")
    if project_residuals and method == "matfree":
        product = matvec
        matvec = lambda v: domain(product(v))  # noqa: E731
    if method == "matfree":
        tridiag = decomp.tridiag_sym(num_matvecs, reortho="full", materialize=True, custom_vjp=False)
        v0 = jax.tree.map(jnp.asarray, v0)
        own = jax.tree.leaves(v0)
        dt = _iteration_dtype(own)
        if any(x.dtype != dt for x in own):
            # matfree ravels the vectors (one dtype) and runs eigh in their dtype: run it in the iteration dtype,
            # the operator on the leaves' own dtypes, the vectors returned in them
            op = matvec
            like = v0
            matvec = lambda v: _cast(op(_cast(v, like)), dt)  # noqa: E731
            vals, vecs = eig.eigh_partial(tridiag)(matvec, _cast(v0, dt))
            vecs = _cast(vecs, like)
        else:
            vals, vecs = eig.eigh_partial(tridiag)(matvec, v0)
    elif method in ("loop", "unrolled"):
        v0 = jax.tree.map(jnp.asarray, v0)
        lanczos = _lanczos_loop if method == "loop" else _lanczos_unrolled
        # The iteration runs in one dtype, the leaves' common one (as one ravelled vector would); the operator and
        # the projection see the leaves' own dtypes.  Without a projection the vectors are the leaves ravelled one
        # by one (a free reshape), with one the leaves in their own shapes: measured on the benchmark MLP (85k
        # parameters, 20 steps, two threads), 29.6-30.4 against 32.5-34.3 ms for the raw Hessian, but 45.6-46.6
        # against 36.3-37.6 ms for P H P, whose per-unit projection fused with the reshapes into slow loops.
        # (One ravelled vector, as before, cost a concatenation per ravel: 37.7 and 43.4 ms.)
        own, treedef = jax.tree.flatten(v0)
        dt = _iteration_dtype(own)
        if domain is None:
            def to_iter(v):
                return [jnp.reshape(jnp.asarray(x, dt), (-1,)) for x in jax.tree.leaves(v)]

            def to_own(f):
                return jax.tree.unflatten(treedef, [jnp.reshape(x, like.shape).astype(like.dtype)
                                                    for x, like in zip(f, own)])
        else:
            def to_iter(v):
                return _cast(v, dt)

            def to_own(f):
                return _cast(f, v0)

        settle = (lambda v: v) if domain is None else (lambda v: to_iter(domain(to_own(v))))
        if restart is True:
            base = jax.random.key(0)
            like = to_iter(v0)
            fresh = (lambda j: settle(tree_random_normal(jax.random.fold_in(base, j), like)), settle)
        elif restart is False or restart is None:
            fresh = None
        elif callable(restart):
            fresh = (lambda j: settle(to_iter(restart(j))), settle)
        else:
            raise TypeError(f"lanczos_extremes: restart must be True, False or a function j -> vector like v0, got "
                            f"{restart!r}")
        product = lambda v: to_iter(matvec(to_own(v)))  # noqa: E731
        residual = None
        if project_residuals:
            def residual(q, q_prev, beta_prev):
                # the unprojected product's residual, projected by settle: one projection per step, as with P H
                # (20 steps on the benchmark MLP, 85k parameters, one core: ~11% longer than with P H)
                w = product(q)
                a = tree_dot(q, w)
                return a, settle(_lincomb(1, w, -a, q, -beta_prev, q_prev))

        if restricted is None:
            restricted = domain is not None
        t, qmat, active = lanczos(product, to_iter(v0), num_matvecs, fresh, residual, restricted, reortho)
        vals, s = jnp.linalg.eigh(t)
        # Ritz pairs of the Krylov space built before a breakdown: eigenvectors of T supported on its leading
        # block (the padding block adds copies of alpha_0, never more extreme, but they tie in degenerate cases)
        built = jnp.sum(jnp.where(active[:, None], s * s, 0), axis=0) > 0.5
        order_top = jnp.argsort(jnp.where(built, -vals, jnp.inf))[:k]
        order_bottom = jnp.argsort(jnp.where(built, vals, jnp.inf))[:k]
        # k above the dimension of the space built (the operator's domain exhausted: k > rank of a small model's
        # horizontal space) has no further Ritz pairs; the padding's copies of alpha_0 were returned in their place
        # (top-7 of diag(0..4): [4, 3, 2, 1, 0, 2, 2], no longer descending): NaN values, zero vectors
        valid = jnp.arange(k) < jnp.sum(active)
        top = jnp.where(valid, vals[order_top], jnp.nan)
        bottom = jnp.where(valid, vals[order_bottom], jnp.nan)

        def ritz(order):
            # rows of S^T Q for the chosen columns of S, in each leaf's own dtype
            c = jnp.where(valid[None, :], s[:, order], 0)
            return jax.tree.unflatten(treedef, [jnp.reshape(_mm(c.T, m), (k,) + like.shape).astype(like.dtype)
                                                for m, like in zip(jax.tree.leaves(qmat), own)])

        return Extremes(top, bottom, ritz(order_top), ritz(order_bottom))
    else:
        raise ValueError(f"method must be 'loop', 'unrolled' or 'matfree', got {method!r}")
    top = vals[::-1][:k]
    bottom = vals[:k]
    top_vectors = jax.tree.map(lambda x: x[::-1][:k], vecs)
    bottom_vectors = jax.tree.map(lambda x: x[:k], vecs)
    return Extremes(top, bottom, top_vectors, bottom_vectors)


def _check_counts(num_matvecs, k) -> None:
    """``TypeError`` / ``ValueError`` naming ``num_matvecs`` or ``k`` unless both are integers with ``1 <= k <=
    num_matvecs`` (checked before anything is computed: the Hessian observables drew their start vector first)."""
    for name, value in (("num_matvecs", num_matvecs), ("k", k)):
        # a float or a bool passed the range check below and failed inside the iteration ("Shapes must be 1D
        # sequences of concrete values of integer type", "'float' object cannot be interpreted as an integer",
        # "iota does not accept dtype bool"), naming neither
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"lanczos_extremes: {name} must be an integer, got {value!r}")
    if not 1 <= k <= num_matvecs:
        raise ValueError(f"lanczos_extremes: need 1 <= k <= num_matvecs, got k={k}, num_matvecs={num_matvecs}")


def _restart_for(k: int, fresh: Callable):
    """The ``restart`` of a Lanczos run from a Gaussian start: ``fresh`` for ``k > 1``, none for ``k = 1``.  The
    extreme eigenvalues themselves lie in the Krylov space of any start with a component along their eigenspaces
    (a Gaussian start, with probability 1); a restart only adds multiplicities, which top-1 / bottom-1 do not
    read, and its branch (a projection, for ``P H P``) costs compile time: the quickstart run's training program
    compiled in 8.8 s with it against 7.8 s without, on one core."""
    # (a k that is not an integer is refused by lanczos_extremes, naming it; compared here first, a string or None
    # failed with a bare "'>' not supported between instances of 'str' and 'int'")
    return fresh if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k > 1 else False


def _is_group(x) -> bool:
    return all(callable(getattr(x, a, None)) for a in ("canonical_element", "horizontal", "tangents"))


def check_hessian_args(owner: str, loss_fn, group=None, *, with_group: bool = False, project=None,
                       fn: str = "loss_fn", returns: str = "scalar loss") -> None:
    """``TypeError`` naming ``owner``'s argument unless ``loss_fn`` is a function, ``group`` (``with_group``) a symmetry
    group and ``project`` ``None`` or a function: the Hessian observables take ``(loss_fn, group, params)``, the step
    observables ``(group, params, ...)``, and a group and a loss function swapped, or a number for either, failed
    with a bare "'function' object has no attribute 'horizontal'" or "Expected a callable value, got 3.0"."""
    args = f"({fn}, group, params, ...)" if with_group else f"({fn}, params, ...)"
    if with_group and not _is_group(group):
        swapped = f" (the arguments look swapped: {fn} comes first, then the group)" if _is_group(loss_fn) else ""
        raise TypeError(f"{owner}{args}: group must be a symmetry group (model.symmetries()), got "
                        f"{type(group).__name__}{swapped}")
    if not callable(loss_fn):
        raise TypeError(f"{owner}{args}: {fn} must be a function params -> {returns}, got {loss_fn!r}")
    if project is not None and not callable(project):
        raise TypeError(f"{owner}: project must be None or a projection v -> P v, got {project!r}")


def _check_key(owner: str, key) -> None:
    """``TypeError`` unless ``key`` is one PRNG key (typed, shape ``()``, or the raw ``uint32`` data of one): an
    integer seed failed in the Gaussian start with "JAX encountered invalid PRNG key data", a batch of keys with
    split's "accepts a single key", naming neither the function nor ``key``."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        ok = jnp.shape(key) == ()
    else:
        ok = dtype == jnp.uint32 and jnp.shape(key) == jax.random.key_data(jax.random.key(0)).shape
    if not ok:
        what = f"an array of shape {jnp.shape(key)} and dtype {dtype}" if dtype is not None else repr(key)
        raise TypeError(f"{owner}: key must be one PRNG key, e.g. jax.random.key(0) (it draws the Lanczos start "
                        f"vector), got {what}")


def hvp_operator(loss_fn: Callable, params, project: Callable | None = None) -> Callable:
    """``v -> P H P v`` with ``H`` the Hessian of ``loss_fn`` at ``params`` (``P`` = identity when ``project`` is
    None).  The gradient is linearised once (``jax.linearize``), so every application costs one tangent pass."""
    check_hessian_args("hvp_operator", loss_fn, project=project)
    _, lin = jax.linearize(jax.grad(loss_fn), params)
    if project is None:
        return lin
    return lambda v: project(lin(project(v)))


def hessian_extremes(
    loss_fn: Callable, params, project: Callable | None = None, *, key, num_matvecs: int = 20, k: int = 1,
    method: str = "loop",
) -> Extremes:
    """Extreme eigenpairs of ``P H P`` at ``params`` restricted to the range of ``P`` (:func:`lanczos_extremes`
    with ``method``, started from a projected Gaussian vector; for ``k > 1`` restarted from another after a
    breakdown, so that repeated eigenvalues keep their multiplicity once the Krylov space is exhausted)."""
    return _hessian_extremes(loss_fn, params, project, key=key, num_matvecs=num_matvecs, k=k, method=method)


def _vectors_like(ex: Extremes, params) -> Extremes:
    """``ex`` with its Ritz vectors in the dtypes of ``params``' leaves (computed from their float32 widening)."""
    leaves, treedef = jax.tree.flatten(params)
    dts = [jnp.result_type(x) for x in leaves]

    def cast(vecs):
        vl = jax.tree.leaves(vecs)
        if len(vl) != len(dts):
            return vecs
        return jax.tree.unflatten(jax.tree.structure(vecs), [v.astype(d) for v, d in zip(vl, dts)])

    return ex._replace(top_vectors=cast(ex.top_vectors), bottom_vectors=cast(ex.bottom_vectors))


def _hessian_extremes(loss_fn: Callable, params, project: Callable | None = None, *, key, num_matvecs: int = 20,
                      k: int = 1, method: str = "loop", restricted=None) -> Extremes:
    """:func:`hessian_extremes`, with the kind of breakdown threshold given (``restricted``, possibly a traced
    boolean: :func:`_lanczos_extremes`); ``None``: restricted exactly when ``project`` is given."""
    check_hessian_args("hessian_extremes", loss_fn, project=project)
    _check_key("hessian_extremes", key)
    _check_counts(num_matvecs, k)
    # a Python number among the parameters (which jax.grad takes) failed in the start vector's draw with
    # "'float' object has no attribute 'dtype'"; bfloat16 / float16 parameters are evaluated in float32, as
    # quotient_trajectory evaluates them (README: the observables run in float32); the Ritz vectors come back in
    # the parameters' dtypes
    given = jax.tree.map(jnp.asarray, params)
    params = widen(given)
    v0 = tree_random_normal(key, params)
    if project is not None:
        v0 = project(v0)
    v0 = tree_scale(1 / tree_norm(v0), v0)

    def fresh(j):  # after a breakdown: a fresh vector (lanczos_extremes projects it onto the domain)
        return tree_random_normal(jax.random.fold_in(key, j + 1), params)

    restart = _restart_for(k, fresh)

    if project is None:
        return _vectors_like(lanczos_extremes(hvp_operator(loss_fn, params), v0, num_matvecs=num_matvecs, k=k,
                                              method=method, restart=restart), given)
    # Every Lanczos vector is a combination of v0 and earlier outputs of the operator, all horizontal, and on
    # horizontal vectors P H P = P H: one projection per product instead of two, applied to the residual
    # H q_j - alpha_j q_j - beta_{j-1} q_{j-1} (project_residuals), which also removes the rounding of q_j, q_{j-1}
    # off the horizontal space that the recurrence would otherwise amplify step after step.
    _, lin = jax.linearize(jax.grad(loss_fn), params)
    return _vectors_like(_lanczos_extremes(lin, v0, num_matvecs=num_matvecs, k=k, method=method, restart=restart,
                                           domain=project, project_residuals=True, reortho="full",
                                           restricted=True if restricted is None else restricted), given)


def frozen_horizontal(group, params, *, max_elements: int = 2**24, max_build_flops: float = 2.0**30) -> Callable:
    """The horizontal projection at ``params`` as a reusable linear map ``v -> v - P_V v``.

    Built once from the orbit tangents ``T`` (``k x P``, :meth:`group.tangents`), so that every application
    ``v - B^T B v`` costs ``O(k P)`` instead of a fresh projection solve (Lanczos applies it twice per
    matrix-vector product).  The orthonormal basis ``B`` of their span comes from the rows of ``T`` scaled to unit
    norm; directions below ``eps`` times the largest are dropped (dependent generators, a unit whose weights
    vanish).  For abelian actions (rescalings, scalings, translations): two passes of Gram orthonormalisation
    (``B = Lambda^-1/2 U^T T`` from the eigendecomposition of ``T T^T``, the second pass on ``B`` repairing the
    orthogonality the first loses to the squared condition number).  With a non-abelian action (GL) the
    generators of one action can be far more ill-conditioned than that (a GL element of condition number
    ``e^6``), and ``B`` is taken from the SVD of ``T``.  One unscaled Gram pass, as before, made the float32
    projection 32% / 15% / 8% of ``|v|`` off for a rescale chain / attention head / deep linear chain at a point
    moved by a sampled element; now 3e-7 / 4e-6 / 4e-6.

    Building ``B`` costs ``O(k^2 P)`` (``~8 k^2 P`` flops for the two Gram passes): a 64-128-128-10 MLP
    (``k = 385``, ``P = 26k``) spent 0.3-2.4 s building it, against 0.3-0.6 ms per application of
    ``group.horizontal``.  The projection is ``group.horizontal`` (closed forms and CG solves, applied afresh each
    time) when ``8 k^2 P > max_build_flops`` or ``k P > max_elements`` (memory).  Where the Lanczos operator is
    traced once (:func:`projection_for` with ``"loop"``, the training loop's method) that is cheaper still at every
    size measured: 20 Lanczos steps at the quickstart MLP's horizontal and canonical points 1.9 against 3.9 ms, the
    benchmark CNN's 35 against 51-54 ms; the basis earns its keep in straight-line code, where each of the
    ``num_matvecs`` applications is traced anew (the quickstart MLP's two "unrolled" runs compiled in 4.5 s with
    it, 10.7 s without).

    Differentiable in ``params`` where the orbit's dimension is locally constant (``jax.grad`` of a sharpness
    computed with it, a sharpness penalty): the derivative is that of the orthogonal projector onto the tangents'
    span, taken from the tangents (the basis' eigh / SVD are not differentiated: their eigenvalues repeat).
    """
    from ..symmetry._base import inverse_where

    if not _is_group(group):  # (a bare "'function' object has no attribute 'tangents'")
        raise TypeError(f"frozen_horizontal(group, params): group must be a symmetry group (model.symmetries()), got "
                        f"{type(group).__name__}")
    for name, value in (("max_elements", max_elements), ("max_build_flops", max_build_flops)):
        # (a string failed in the budget comparison with a bare "'>' not supported between 'int' and 'str'")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"frozen_horizontal: {name} must be a number >= 0 (the budget above which "
                             f"group.horizontal is applied afresh instead), got {value!r}")
    flat0, unravel = _ravel(params)
    shapes = jax.eval_shape(group.tangents, params)
    leaves = jax.tree.leaves(shapes)
    k = leaves[0].shape[0] if leaves else 0
    if k == 0:
        return lambda v: v
    if k * flat0.shape[0] > max_elements or 8.0 * k * k * flat0.shape[0] > max_build_flops:
        return lambda v: group.horizontal(params, v)
    # the basis in float32 at least (tangents of the widened parameters): bfloat16 / float16 parameters failed in
    # eigh / SVD with XLA:CPU's bare "Unsupported dtype bfloat16", as group.horizontal computes them in float32
    tm = jax.vmap(lambda t: _ravel(t)[0])(group.tangents(widen(params)))
    # the basis is built from the tangents' values only: its eigh / SVD have no usable derivative (the second Gram
    # pass decomposes a matrix ~ I, whose equal eigenvalues made jax.grad through the projection NaN);
    # _horizontal_flat differentiates the projection itself, from the tangents
    norms = jnp.sqrt(jnp.sum(jnp.square(jax.lax.stop_gradient(tm)), axis=1, keepdims=True))
    # unit rows (their span and its derivative are the tangents'): the pseudo-inverse in _horizontal_flat's
    # derivative then sees the conditioning of the span, not the spread of the tangents' norms
    tm = tm / jnp.where(norms > 0, norms, jnp.ones_like(norms))
    basis = jax.lax.stop_gradient(tm)
    eps = jnp.finfo(basis.dtype).eps
    continuous = [c for c in getattr(group, "components", (group,)) if getattr(c, "continuous", True)]
    if all(getattr(c, "abelian", True) for c in continuous):
        for _ in range(2):
            w, u = jnp.linalg.eigh(_mm(basis, basis.T))
            keep = w > jnp.max(w) * jnp.asarray(eps * k, w.dtype)
            winv = inverse_where(w, keep)
            basis = _mm((u * jnp.sqrt(winv)[None, :]).T, basis)  # rows: orthonormal (zero rows: null directions)
    else:
        _, sv, vt = jnp.linalg.svd(basis, full_matrices=False)
        keep = sv > jnp.max(sv, initial=0) * jnp.asarray(eps * max(basis.shape), sv.dtype)
        basis = vt * keep.astype(vt.dtype)[:, None]

    _, unravel_wide = _ravel(widen(params))

    def project(v):
        # v in float32 at least, returned as group.horizontal returns it: in its own floating dtypes (a float32
        # vector at bfloat16 parameters is not rounded to them), integer leaves in the parameters'
        f, _ = _ravel(widen(v))
        out = unravel_wide(_horizontal_flat(tm, basis, f.astype(tm.dtype)))

        def back(o, x, p):
            dt = jnp.result_type(x)
            return o.astype(dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(p))

        return jax.tree.map(back, out, v, params)

    return project


def _ravel(tree):
    """``jax.flatten_util.ravel_pytree(tree)``, leaves of several dtypes (float32 kernels beside float64 biases) joined
    in their common one whatever ``jax_numpy_dtype_promotion`` is: under ``"strict"`` the concatenation failed with a
    bare ``TypePromotionError`` (:func:`frozen_horizontal`, so ``lanczos_method="unrolled"``, and
    :func:`dense_hessian`; :func:`gradient_noise` already ravelled so).  The inverse casts each leaf back."""
    from jax.flatten_util import ravel_pytree

    with jax.numpy_dtype_promotion("standard"):
        return ravel_pytree(tree)


@jax.custom_jvp
def _horizontal_flat(tm, basis, f):
    """``f - B^T B f``: the horizontal part of the ravelled vector ``f``, ``B`` (``k x P``) an orthonormal basis of
    the span of the tangents ``tm`` (``k x P``; its rows, and zero rows for dependent or null generators), built from
    the tangents' values (:func:`frozen_horizontal`)."""
    return f - _mm(basis.T, _mm(basis, f))


@_horizontal_flat.defjvp
def _horizontal_flat_jvp(primals, tangents):
    """The derivative of ``P_H f = f - P_V f`` in the tangents and in ``f``: with ``T = C B`` (``C = T B^T``) and
    ``D = C^+``, ``T^+ = B^T D``, and the derivative of the orthogonal projector onto the span of ``T``'s rows is
    ``dP_V = P_H dT^T D^T B + B^T D dT P_H`` (its rank held fixed).  ``B``'s own tangent is not used: ``B`` is a
    function of ``T`` through decompositions (eigh of ``~ I``, an SVD) whose derivatives are not defined where
    eigenvalues repeat."""
    tm, basis, f = primals
    dtm, _, df = tangents
    h = _horizontal_flat(tm, basis, f)
    # (k, k): B's null rows (dropped directions) are exact zeros, so are their columns here; the kept directions'
    # singular values are at least ~sqrt(eps k) (abelian) or eps max(k, P) (GL) of the largest, above this cut
    c = _mm(tm, basis.T)
    d = jnp.linalg.pinv(c, rtol=jnp.finfo(c.dtype).eps)
    a = _mm(dtm.T, _mm(d.T, _mm(basis, f)))
    a = a - _mm(basis.T, _mm(basis, a))
    b = _mm(basis.T, _mm(d, _mm(dtm, h)))
    return h, df - _mm(basis.T, _mm(basis, df)) - a - b


def projection_for(group, params, method: str) -> Callable:
    """The horizontal projection at ``params`` for a Lanczos run by ``method`` (:func:`lanczos_extremes`):
    ``group.horizontal`` applied afresh when the operator is traced once (``"loop"``, ``"matfree"``), the
    :func:`frozen_horizontal` basis (within its build budget) in straight-line code (``"unrolled"``)."""
    if method not in ("loop", "unrolled", "matfree"):  # (any other name was taken for "loop", silently)
        raise ValueError(f"projection_for: method must be 'loop', 'unrolled' or 'matfree', got {method!r}")
    if not _is_group(group):
        raise TypeError(f"projection_for(group, params, method): group must be a symmetry group (model.symmetries()), "
                        f"got {type(group).__name__}")
    if method == "unrolled":
        return frozen_horizontal(group, params)
    return lambda v: group.horizontal(params, v)


@observable(ORBIT_INVARIANT, "sharpness_quotient", "lambda_min_quotient")
def sharpness_quotient(loss_fn, group, params, *, key, num_matvecs: int = 20, k: int = 1,
                       method: str = "loop") -> Extremes:
    """Extremes of the horizontal Hessian at the canonical representative ``c(theta)``: the function's own
    curvature, equal on every point of the orbit (THEORY section 4, kind 1) where the orbit has a canonical
    representative (not at a rescale unit with exactly one zero side, a GL head or chain with a rank-deficient
    factor: see :func:`grad_norm_canonical`)."""
    check_hessian_args("sharpness_quotient", loss_fn, group, with_group=True)
    # bfloat16 / float16 parameters: the canonical point of their float32 widening, not rounded back to them (the
    # Ritz vectors in the parameters' dtypes)
    pc = group.canonicalize(widen(params))
    return _vectors_like(hessian_extremes(loss_fn, pc, projection_for(group, pc, method), key=key,
                                          num_matvecs=num_matvecs, k=k, method=method), params)


@observable(REDUCED_DYNAMICS, "sharpness_horizontal", "lambda_min_horizontal")
def sharpness_horizontal(loss_fn, group, params, *, key, num_matvecs: int = 20, k: int = 1,
                         method: str = "loop") -> Extremes:
    """Extremes of the horizontal Hessian ``P H P`` at the current point: the curvature the next step sees
    (stability, THEORY section 4, kind 2)."""
    check_hessian_args("sharpness_horizontal", loss_fn, group, with_group=True)
    return hessian_extremes(  # (bfloat16 / float16 parameters evaluated in float32 there)
        loss_fn, params, projection_for(group, params, method), key=key, num_matvecs=num_matvecs, k=k,
        method=method
    )


@observable(RAW, "sharpness_raw", "lambda_min_raw")
def sharpness_raw(loss_fn, params, *, key, num_matvecs: int = 20, k: int = 1, method: str = "loop") -> Extremes:
    """Extremes of the raw Hessian at the current point (Dinh et al. 2017: not a function on the quotient)."""
    return hessian_extremes(loss_fn, params, None, key=key, num_matvecs=num_matvecs, k=k, method=method)


@observable(RAW, "sharpness_preconditioned", "lambda_min_preconditioned")
def sharpness_preconditioned(loss_fn, params, preconditioner, *, key, num_matvecs: int = 20, k: int = 1,
                             method: str = "loop") -> Extremes:
    """Extremes of the preconditioned Hessian ``P^-1 H`` at ``params``, with ``P = diag(preconditioner)``:
    the curvature a diagonally preconditioned step ``theta -> theta - eta P^-1 m`` sees (Adam's, Cohen et al.
    2022; :func:`quotient_sgd.optim.adam_preconditioner` gives Adam's ``P``).

    ``P^-1 H`` is not symmetric but similar to ``S = P^-1/2 H P^-1/2`` (``P^-1 H = P^-1/2 S P^1/2``): the same
    eigenvalues, found by Lanczos (:func:`lanczos_extremes` with ``method``) on ``v -> P^-1/2 H (P^-1/2 v)``, one
    Hessian-vector product each, started from a Gaussian vector.  The Ritz vectors returned are those of ``S``
    (orthonormal); ``P^-1/2 u`` are the corresponding right eigenvectors of ``P^-1 H``.

    Raw kind: a diagonal ``P`` in parameter coordinates is not carried along an orbit (a rescaling moves ``H``
    and the step's own ``P`` differently), so the value is not a function on the quotient.

    Args:
        loss_fn: ``params -> loss``.
        params: the evaluation point.
        preconditioner: ``diag(P)``, a pytree like ``params`` with positive entries (an entry ``<= 0`` makes the
            operator, and the result, non-finite).  A leaf missing or of another shape is a ``ValueError`` naming
            ``preconditioner`` (a ``(2,)`` entry for a ``(2, 2)`` kernel broadcast over its rows, silently; a scalar,
            a missing leaf or a shape that did not broadcast failed with a bare ``AttributeError`` / pytree structure
            / broadcasting error).
        key, num_matvecs, k, method: as in :func:`hessian_extremes`.
    """
    check_hessian_args("sharpness_preconditioned", loss_fn)
    _check_key("sharpness_preconditioned", key)
    _check_counts(num_matvecs, k)
    given = jax.tree.map(jnp.asarray, params)
    params = widen(given)  # (Python numbers, bfloat16 / float16: as in hessian_extremes)
    check_like("sharpness_preconditioned", "params", params, preconditioner=preconditioner)
    s = jax.tree.map(lambda p, x: jax.lax.rsqrt(jnp.asarray(p, x.dtype)), preconditioner, params)
    _, lin = jax.linearize(jax.grad(loss_fn), params)

    def matvec(v):
        return jax.tree.map(jnp.multiply, s, lin(jax.tree.map(jnp.multiply, s, v)))

    v0 = tree_random_normal(key, params)
    v0 = tree_scale(1 / tree_norm(v0), v0)
    return _vectors_like(lanczos_extremes(
        matvec, v0, num_matvecs=num_matvecs, k=k, method=method,
        restart=_restart_for(k, lambda j: tree_random_normal(jax.random.fold_in(key, j + 1), params))), given)


def dense_hessian(loss_fn: Callable, params, project: Callable | None = None) -> jax.Array:
    """The dense ``P H P`` in raveled coordinates (``jax.flatten_util.ravel_pytree`` order); small models only.
    Parameters whose leaves have several dtypes are ravelled in their common one (:func:`_ravel`); bfloat16 /
    float16 parameters are evaluated in float32, as :func:`hessian_extremes` evaluates them."""
    params = widen(params)
    flat, unravel = _ravel(params)
    op = hvp_operator(loss_fn, params, project)

    def col(e):
        return _ravel(op(unravel(e)))[0]

    return jax.vmap(col)(jnp.eye(flat.shape[0], dtype=flat.dtype))

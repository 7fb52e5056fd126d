"""Lanczos with partial reorthogonalisation (``lanczos_extremes(..., reortho="partial")``, an option of the
looped and unrolled iterations) on operators where the plain three-term recurrence loses orthogonality: well
separated extremes (and a close pair, 9 / 8.99) that converge within a few steps beside a bulk in [-1, 1].  The
extremes and Ritz vectors are checked against a dense eigendecomposition in float32 and float64, on the whole space
and restricted to a domain (``P A P`` with ``P`` an orthogonal projection, the horizontal Hessian's form), and the
computed basis against the semi-orthogonality level the scheme keeps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.observables import lanczos_extremes
from quotient_sgd.observables._hessian import _lanczos_loop, _lanczos_unrolled, _semiorthogonality

N, STEPS, K = 240, 40, 3
TOP = np.array([10.0, 9.0, 8.99, 8.0])  # 9 / 8.99: a close pair
BOTTOM = np.array([-3.0, -2.5, -2.0])
VERTICAL = np.array([50.0, -20.0])  # eigenvalues off the domain, more extreme than any on it: P must remove them


@functools.cache
def _operator_float64(restricted: bool, seed: int):
    """The float64 ``(A, P, U, ev)`` of :func:`_operator` (``P`` None on the whole space), built once per case for
    the file and read only: its 240 x 240 QR and products took a noticeable share of each test's CPU time."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))
    bulk = np.linspace(-1.0, 1.0, N - len(TOP) - len(BOTTOM) - (len(VERTICAL) if restricted else 0))
    ev = np.sort(np.concatenate([TOP, BOTTOM, bulk]))
    u = q[:, : ev.size]
    a = (u * ev) @ u.T
    proj = None
    if restricted:
        d = q[:, ev.size:]
        a = a + (d * VERTICAL) @ d.T
        proj = u @ u.T
    for x in (a, proj, u, ev):
        if x is not None:
            x.setflags(write=False)
    return a, proj, u, ev


def _operator(dtype, restricted: bool, seed: int = 0):
    """``(A, P, U, ev)``: a symmetric ``A`` (in ``dtype``) with the eigenvalues ``ev`` (float64, ascending) on the
    domain spanned by ``U``'s orthonormal columns, ``P = U U^T`` (``None`` on the whole space).  Restricted, ``A``
    also has ``VERTICAL`` on two directions orthogonal to the domain."""
    a, proj, u, ev = _operator_float64(restricted, seed)
    return jnp.asarray(a, dtype), None if proj is None else jnp.asarray(proj, dtype), u, ev


def _start(dtype, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(N), dtype)


def _plain_orthogonality(a, p, v0, steps: int) -> float:
    """``max |Q Q^T - I|`` of the plain three-term recurrence (no reorthogonalisation) in the operator's dtype."""
    a, v0 = np.asarray(a), np.asarray(v0)
    p = np.eye(N, dtype=a.dtype) if p is None else np.asarray(p)
    q = p @ v0
    q = q / np.linalg.norm(q)
    q_prev, beta, rows = np.zeros_like(q), a.dtype.type(0), []
    for _ in range(steps):
        rows.append(q)
        w = a @ q
        alpha = q @ w
        w = p @ (w - alpha * q - beta * q_prev)
        beta = np.linalg.norm(w)
        q_prev, q = q, w / beta
    basis = np.stack(rows)
    return float(np.max(np.abs(basis @ basis.T - np.eye(steps))))


def _run(dtype, restricted: bool, method: str = "loop", steps: int = STEPS):
    a, p, u, ev = _operator(dtype, restricted)
    kw = {} if p is None else {"domain": lambda v: p @ v, "project_residuals": True}
    f = jax.jit(lambda v: lanczos_extremes(lambda x: a @ x, v, num_matvecs=steps, k=K, method=method,
                                          reortho="partial", **kw))
    v0 = _start(dtype)
    return f(v0 if p is None else p @ v0), a, p, u, ev  # (the start in the domain, as hessian_extremes draws it)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    if request.param == "float32":
        yield jnp.float32
    else:
        with jax.enable_x64(True):
            yield jnp.float64


@pytest.mark.parametrize("restricted", [False, True], ids=["whole", "domain"])
def test_extremes_and_ritz_vectors_match_dense(dtype, restricted):
    """Top-3 / bottom-3 Ritz values within ``50 eps |A|`` of the dense eigenvalues (the close pair 9 / 8.99
    resolved, no ghost copies of the converged top), Ritz vectors unit, in the domain and along the dense
    eigenvectors; the extremes off the domain (50, -20) never appear."""
    (top, bottom, top_vecs, bottom_vecs), a, p, u, ev = _run(dtype, restricted)
    eps = float(jnp.finfo(dtype).eps)
    norm_a = float(np.max(np.abs(ev)))
    np.testing.assert_allclose(np.asarray(top, np.float64), ev[::-1][:K], rtol=0, atol=50 * eps * norm_a)
    np.testing.assert_allclose(np.asarray(bottom, np.float64), ev[:K], rtol=0, atol=50 * eps * norm_a)
    dense_vecs = u @ np.linalg.eigh(u.T @ np.asarray(a, np.float64) @ u)[1]  # eigenvectors of A on the domain
    for vals, vecs, cols in ((top, top_vecs, dense_vecs[:, ::-1][:, :K]), (bottom, bottom_vecs, dense_vecs[:, :K])):
        y = np.asarray(vecs, np.float64)
        # unit and mutually orthogonal to a few times the semi-orthogonality level
        np.testing.assert_allclose(y @ y.T, np.eye(K), rtol=0, atol=4 * _semiorthogonality(dtype, STEPS))
        # eigenvectors: the residual |A y - theta y| is small against the gap (0.01 for the close pair), and
        # y lies along the dense eigenvector (the pair's vectors within residual / gap)
        res = np.linalg.norm(y @ np.asarray(a, np.float64) - np.asarray(vals, np.float64)[:, None] * y, axis=1)
        assert np.all(res < 1e-3 * norm_a), res
        align = np.abs(np.sum(y * cols.T, axis=1))
        assert np.all(align > 1 - 1e-3), align
        if restricted:
            off = np.linalg.norm(y - y @ u @ u.T, axis=1)
            assert np.max(off) < 1e3 * eps, off


@pytest.mark.parametrize("restricted", [False, True], ids=["whole", "domain"])
def test_basis_stays_semi_orthogonal(dtype, restricted):
    """Where the plain recurrence's basis loses orthogonality entirely (``max |Q Q^T - I| > 0.1``), the partial
    scheme keeps it below its level ``sqrt(eps / K)`` (the recurrence's estimates bound the true inner products,
    which the scheme keeps under that level), and the tridiagonal matrix's extremes are those of full
    reorthogonalisation to ``50 eps |A|``."""
    a, p, _, ev = _operator(dtype, restricted)
    v0 = _start(dtype)
    if p is not None:
        v0 = p @ v0
    assert _plain_orthogonality(a, p, v0, STEPS) > 0.1
    residual = None
    if p is not None:
        def residual(q, q_prev, beta_prev):
            w = a @ q
            alpha = q @ w
            return alpha, p @ (w - alpha * q - beta_prev * q_prev)

    def run(reortho):
        return jax.jit(lambda v: _lanczos_loop(lambda x: a @ x, v, STEPS, None, residual, p is not None,
                                               reortho))(v0)

    t, basis, active = run("partial")
    assert bool(jnp.all(active))
    basis = np.asarray(basis, np.float64)  # (the checks in numpy: eager jnp compiled each op)
    gram = basis @ basis.T
    assert np.max(np.abs(gram - np.eye(STEPS))) < _semiorthogonality(dtype, STEPS)
    t_full, _, _ = run("full")
    ritz, ritz_full = (np.sort(np.linalg.eigvalsh(np.asarray(x, np.float64))) for x in (t, t_full))
    eps = float(jnp.finfo(dtype).eps)
    norm_a = float(np.max(np.abs(ev)))
    for sl in (slice(0, K), slice(-K, None)):
        np.testing.assert_allclose(ritz[sl], ritz_full[sl], rtol=0, atol=50 * eps * norm_a)


def test_unrolled_matches_loop():
    """The straight-line iteration takes the same steps as the loop (float32, whole space, 16 steps: the top
    converged and orthogonality lost within them)."""
    a, _, _, ev = _operator(jnp.float32, False)
    v0 = _start(jnp.float32)
    assert _plain_orthogonality(a, None, v0, 16) > _semiorthogonality(jnp.float32, 16)
    out = [jax.jit(lambda v, f=f: f(lambda x: a @ x, v, 16, reortho="partial"))(v0)
           for f in (_lanczos_loop, _lanczos_unrolled)]
    (t_loop, q_loop, _), (t_unr, q_unr, _) = out
    np.testing.assert_allclose(np.asarray(t_unr), np.asarray(t_loop), rtol=0, atol=1e-5 * float(np.max(np.abs(ev))))
    q_unr = np.asarray(q_unr, np.float64)  # (in numpy: eager jnp compiled each op)
    np.testing.assert_allclose(q_unr @ q_unr.T, np.eye(16), rtol=0,
                               atol=_semiorthogonality(jnp.float32, 16))


def test_vmap_matches_single_runs_and_is_deterministic():
    """``jax.vmap`` over start vectors (the reorthogonalisation's branch then a select) gives each start's own
    result, and a second call the same bits."""
    a, _, _, ev = _operator(jnp.float32, False)
    starts = jnp.stack([_start(jnp.float32, seed) for seed in (1, 2, 3)])
    f = jax.jit(lambda v: lanczos_extremes(lambda x: a @ x, v, num_matvecs=STEPS, k=2, reortho="partial"))
    batched = jax.jit(jax.vmap(lambda v: lanczos_extremes(lambda x: a @ x, v, num_matvecs=STEPS, k=2,
                                                          reortho="partial")))(starts)
    tol = 50 * float(jnp.finfo(jnp.float32).eps) * float(np.max(np.abs(ev)))
    for i in range(starts.shape[0]):
        single = f(starts[i])
        np.testing.assert_allclose(np.asarray(batched.top[i]), np.asarray(single.top), rtol=0, atol=tol)
        np.testing.assert_allclose(np.asarray(batched.bottom[i]), np.asarray(single.bottom), rtol=0, atol=tol)
    again = f(starts[0])
    for x, y in zip(jax.tree.leaves(f(starts[0])), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_reortho_must_be_partial_or_full():
    with pytest.raises(ValueError, match="reortho must be 'partial' or 'full', got 'selective'"):
        lanczos_extremes(lambda x: x, jnp.ones(4), num_matvecs=3, reortho="selective")

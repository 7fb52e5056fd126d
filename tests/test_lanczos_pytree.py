"""Lanczos on pytree vectors: the iteration keeps the leaves (a matrix, a vector, a scalar) and a basis matrix per
leaf instead of one ravelled vector, with and without a projection onto a domain; the extremes and Ritz vectors
must be those of the ravelled operator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from helpers import dot_precisions
from quotient_sgd import observables as qobs


def _problem(seed, n_mat=(2, 3), n_vec=4):
    # 11 dimensions (the checks run as many steps, and the unrolled iteration compiles one copy of its step each)
    like = {"w": jnp.zeros(n_mat, jnp.float32), "b": jnp.zeros((n_vec,), jnp.float32),
            "s": jnp.zeros((), jnp.float32)}
    flat, unravel = ravel_pytree(like)
    n = flat.shape[0]
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    # the operator and the domain built in numpy, in float32 (eager jnp compiled each op)
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(k1, (n, n), jnp.float32)))
    ev = np.linspace(-3.0, 7.0, n).astype(np.float32) * np.exp(
        np.asarray(jax.random.normal(k2, (n,), jnp.float32)) * np.float32(0.1))
    a = (q * ev[None, :]) @ q.T
    a = (a + a.T) / 2
    # a domain: the complement of two random directions
    d, _ = np.linalg.qr(np.asarray(jax.random.normal(k3, (n, 2), jnp.float32)))
    proj = np.eye(n, dtype=np.float32) - d @ d.T
    assert a.dtype == proj.dtype == np.float32

    def matvec(v):
        return unravel(a @ ravel_pytree(v)[0])

    def domain(v):
        return unravel(proj @ ravel_pytree(v)[0])

    v0 = unravel(jax.random.normal(jax.random.key(seed + 100), (n,), jnp.float32))
    return a, proj, matvec, domain, v0, unravel


@pytest.mark.parametrize("method", ["loop", "unrolled"])
@pytest.mark.parametrize("with_domain", [False, True])
@pytest.mark.parametrize("seed", [3])
def test_pytree_lanczos_matches_the_ravelled_operator(method, with_domain, seed):
    a, proj, matvec, domain, v0, unravel = _problem(seed)
    n = a.shape[0]
    k = 2
    if with_domain:
        v0 = domain(v0)
        kw = dict(domain=domain, project_residuals=True)
        op = np.asarray(proj, np.float64) @ np.asarray(a, np.float64) @ np.asarray(proj, np.float64)
        basis = np.linalg.svd(np.asarray(proj, np.float64))[0][:, : n - 2]
        dense = np.linalg.eigvalsh(basis.T @ op @ basis)
    else:
        kw = {}
        op = np.asarray(a, np.float64)
        dense = np.linalg.eigvalsh(op)
    out = jax.jit(lambda v: qobs.lanczos_extremes(matvec, v, num_matvecs=n, k=k, method=method, restart=True,
                                                  **kw))(v0)
    np.testing.assert_allclose(np.asarray(out.top), dense[::-1][:k], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(out.bottom), dense[:k], rtol=2e-4, atol=2e-4)
    for vals, vecs in ((out.top, out.top_vectors), (out.bottom, out.bottom_vectors)):
        # the Ritz vectors keep each leaf's shape and dtype, with a leading axis k
        for leaf, like in zip(jax.tree.leaves(vecs), jax.tree.leaves(v0)):
            assert leaf.shape == (k,) + like.shape and leaf.dtype == like.dtype
        u = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vecs), np.float64)
        np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-4)
        resid = u @ op.T - np.asarray(vals, np.float64)[:, None] * u
        assert float(np.max(np.linalg.norm(resid, axis=1))) < 1e-3 * float(np.max(np.abs(dense)))
        if with_domain:
            # eigenvectors of the domain: unchanged by the projection
            np.testing.assert_allclose(u @ np.asarray(proj, np.float64).T, u, atol=1e-4)


def test_lanczos_and_frozen_projection_products_ask_for_full_precision():
    """The Krylov basis' products (``Q w``, ``Q^T c``, the Ritz vectors) and the frozen horizontal projection's
    (its Gram matrix, ``B^T B f``, its derivative) were asked at JAX's default matmul precision: on recent NVIDIA GPUs
    (TF32) and TPUs (bfloat16) float32 operands are rounded to 10 / 7 bits, which would keep the basis orthogonal to
    ~1e-3 only.  Every product of the iteration and of the projection asks for Precision.HIGHEST now, whatever
    jax_default_matmul_precision is (the operator here has no product of its own)."""
    from quotient_sgd.symmetry import Product, Rescale

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    params = {"a": jax.random.normal(jax.random.key(0), (3, 4)), "b": jax.random.normal(jax.random.key(1), (4, 2))}
    group = Product((Rescale(incoming=((("a",), 1),), outgoing=((("b",), 0),), name="r"),))
    scale = jax.tree.map(lambda x: 1.0 + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)

    def top(p):
        project = qobs.frozen_horizontal(group, p)
        matvec = lambda v: project(jax.tree.map(jnp.multiply, scale, project(v)))  # noqa: E731
        e = qobs.lanczos_extremes(matvec, project(jax.tree.map(jnp.ones_like, p)), num_matvecs=6, k=2,
                                  domain=project)
        return e.top, e.top_vectors

    with jax.default_matmul_precision("bfloat16"):
        for fn in (top, lambda p: jax.jvp(top, (p,), (p,))):
            found = dot_precisions(fn, params)
            assert found and all(p == highest for p in found), found

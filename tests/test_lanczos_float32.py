"""Float32 Lanczos on ``P H P`` past the dimension of the horizontal space.

The Lanczos operator used to be ``P H`` (one projection per product, the Lanczos vectors being horizontal), but the
rounding of ``q_j`` off the horizontal space stayed in the residual ``P H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``
and the division by ``beta_j`` amplified it at every step: on small linear classifiers in float32 the vector that
follows the exhaustion of the horizontal space came out vertical, and the bottom eigenvalue read 0 (7-22% of the
top off the dense one).  The projection now acts on the residual, at the same cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd import observables as qobs


def _classifier(din, dout, seed):
    model = models.MLP(din, (), dout, classifier=True, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(seed + 1), (32, din), jnp.float32)
    y = jax.random.randint(jax.random.key(seed + 2), (32,), 0, dout)

    def loss(p):  # in the parameters' dtype (the float64 reference casts them)
        dt = jax.tree.leaves(p)[0].dtype
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x.astype(dt)), y).mean()

    return loss, params, model.symmetries()


def _rows(tree):
    """A pytree of stacked vectors (leading axis) as the rows of one float64 matrix, in ``ravel_pytree`` order."""
    return np.concatenate([np.asarray(a, np.float64).reshape(a.shape[0], -1) for a in jax.tree.leaves(tree)], axis=1)


def _dense_horizontal(loss, group, point):
    """Eigenvalues of the horizontal Hessian at ``point`` (ascending) in float64, and the horizontal basis.  The
    tangents and the Hessian come from one compiled program (op by op, each case compiled dozens of small ones)."""
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), point)
    tangents, h = jax.jit(lambda p: (group.tangents(p), qobs.dense_hessian(loss, p)))(p64)
    _, s, vt = np.linalg.svd(_rows(tangents))
    rank = int(np.sum(s > 1e-6 * s[0]))
    hor = vt[rank:].T
    h = np.asarray(h)
    assert h.dtype == np.float64
    return np.linalg.eigvalsh(hor.T @ h @ hor), vt[:rank].T


# fast: each point (horizontal, quotient) on a classifier with more inputs than classes and one with no more (fewer,
# equal); the other four pairings slow
@pytest.mark.parametrize("where, din, dout, seed", [
    ("horizontal", 4, 3, 0),
    ("horizontal", 3, 5, 2),
    ("quotient", 6, 4, 1),
    ("quotient", 5, 5, 4),
    pytest.param("horizontal", 6, 4, 1, marks=pytest.mark.slow),
    pytest.param("horizontal", 5, 5, 4, marks=pytest.mark.slow),
    pytest.param("quotient", 4, 3, 0, marks=pytest.mark.slow),
    pytest.param("quotient", 3, 5, 2, marks=pytest.mark.slow),
])
def test_float32_lanczos_past_the_horizontal_dimension_matches_dense(x64, din, dout, seed, where):
    loss, params, group = _classifier(din, dout, seed)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    point = jax.jit(group.canonicalize)(params) if where == "quotient" else params
    dense, vertical = _dense_horizontal(loss, group, point)
    d = dense.shape[0]
    assert d == din * dout + dout - (din + 1)  # the translations of the logits are the only continuous symmetry
    fn = qobs.sharpness_quotient if where == "quotient" else qobs.sharpness_horizontal
    settings = ((d + 2, 1), (2 * d, 2))
    # both settings in one program (one compilation a case)
    results = jax.jit(lambda p: [fn(loss, group, p, key=jax.random.key(3), num_matvecs=n, k=k)
                                 for n, k in settings])(params)
    for (num_matvecs, k), ex in zip(settings, results):
        assert ex.top.dtype == jnp.float32
        scale = dense[-1]
        np.testing.assert_allclose(ex.bottom, dense[:k], atol=1e-5 * scale)
        np.testing.assert_allclose(ex.top, dense[::-1][:k], atol=1e-5 * scale)
        # the Ritz vectors are horizontal (the spurious zero's was vertical)
        for vecs in (ex.bottom_vectors, ex.top_vectors):
            assert np.max(np.abs(_rows(vecs) @ vertical)) < 1e-4


def test_project_residuals_is_the_projected_operator(x64):
    """``project_residuals`` with the unprojected ``A``: the extremes of ``P A P`` on the domain, as with the
    projected operator; it needs ``domain``; ``"matfree"`` projects the products instead."""
    # the operator and the dense reference in numpy (eager jnp compiled each op)
    d = np.array([9.0, 8.0, 2.0, 2.5, 4.0, 5.0, 6.0, 7.0, 3.0])
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(5), (9, 9), jnp.float64)))
    a = (q * d[None, :]) @ q.T
    basis, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(6), (9, 2), jnp.float64)))
    proj = lambda v: v - basis @ (basis.T @ v)  # noqa: E731
    hor = np.linalg.qr(np.concatenate([basis, np.eye(9)], axis=1))[0][:, 2:9]
    dense = np.sort(np.linalg.eigvalsh(hor.T @ a @ hor))
    v0 = proj(np.ones(9))
    # the three methods in one compiled program (op by op, the unrolled iteration compiled each of its steps)
    exs = jax.jit(lambda v: [qobs.lanczos_extremes(lambda u: a @ u, v, num_matvecs=7, k=1, method=method,
                                                   domain=proj, project_residuals=True)
                             for method in ("loop", "unrolled", "matfree")])(v0)
    for ex in exs:
        np.testing.assert_allclose([ex.bottom[0], ex.top[0]], [dense[0], dense[-1]], rtol=1e-6)
    with pytest.raises(ValueError, match="project_residuals=True needs domain="):
        qobs.lanczos_extremes(lambda u: a @ u, v0, num_matvecs=4, project_residuals=True)

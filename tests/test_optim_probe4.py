"""Lanczos extremes with repeated eigenvalues: after a breakdown the Krylov space of one start vector holds one
direction per distinct eigenvalue, so top-k / bottom-k (k > 1) skipped the copies of a repeated one even with
more Lanczos steps than the operator has dimensions; now Lanczos restarts from a fresh vector of the operator's
domain and agrees with a dense eigendecomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from helpers import horizontal_basis

from quotient_sgd import models
from quotient_sgd import observables as qobs


@pytest.mark.parametrize("method", ["loop", "unrolled"])
def test_lanczos_keeps_multiplicities_once_the_krylov_space_is_exhausted(x64, method):
    """A 9 x 9 operator with eigenvalues 3, 3, 2, 1, 1, 0, 0, -1, -1 and 9 Lanczos steps: top-3 / bottom-3 are
    the dense ones with their repeats (before: 3, 2, 1 and -1, 0, 1), with orthonormal Ritz vectors."""
    # the operator and the checks in numpy (eager jnp compiled each op)
    d = np.array([3.0, 3.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (9, 9), jnp.float64)))
    a = (q * d[None, :]) @ q.T
    ex = jax.jit(lambda v: qobs.lanczos_extremes(lambda u: a @ u, v, num_matvecs=9, k=3, method=method))(
        jnp.ones(9, jnp.float64))
    np.testing.assert_allclose(ex.top, [3.0, 3.0, 2.0], atol=1e-10)
    np.testing.assert_allclose(ex.bottom, [-1.0, -1.0, 0.0], atol=1e-10)
    for vecs, vals in ((ex.top_vectors, ex.top), (ex.bottom_vectors, ex.bottom)):
        vecs, vals = np.asarray(vecs), np.asarray(vals)
        np.testing.assert_allclose(vecs @ vecs.T, np.eye(3), atol=1e-9)
        np.testing.assert_allclose(vecs @ a.T, vals[:, None] * vecs, atol=1e-9)


def test_lanczos_restart_refuses_a_bad_argument():
    with pytest.raises(TypeError, match="restart must be True, False or a function"):
        qobs.lanczos_extremes(lambda u: u, jnp.ones(3), num_matvecs=3, restart="yes")


def _linear_classifier():
    """A linear softmax classifier (convex: P H P is positive semi-definite) whose first input feature is always
    zero, as the border pixels of digits: its weights are null directions of the Hessian, a repeated zero
    eigenvalue on the horizontal space (two of them: the third direction of that row is the translation)."""
    model = models.MLP(4, (), 3, classifier=True, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 4), jnp.float64).at[:, 0].set(0.0)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p).logits(x), y).mean()

    return loss, params, model.symmetries()


def _dense_horizontal(loss, group, params):
    """The eigenvalues of P H P on the horizontal space at ``params``, ascending: the tangents and the Hessian from
    one compiled program (op by op, each compiled dozens of small ones), the rest in numpy."""
    tang, h = jax.jit(lambda p: (jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(p)),
                                 qobs.dense_hessian(loss, p)))(params)
    hor, _ = horizontal_basis(tang)
    return np.sort(np.linalg.eigvalsh(hor.T @ np.asarray(h) @ hor))


def _check_horizontal(method, quotient):
    loss, params, group = _linear_classifier()
    point = jax.jit(group.canonicalize)(params) if quotient else params
    dense = _dense_horizontal(loss, group, point)
    assert dense.shape == (10,) and abs(dense[1]) < 1e-12 < dense[2]  # the repeated zero, then positive
    scale = float(dense[-1])
    fn = qobs.sharpness_quotient if quotient else qobs.sharpness_horizontal
    ex = jax.jit(lambda p: fn(loss, group, p, key=jax.random.key(3), num_matvecs=15, k=3, method=method))(params)
    np.testing.assert_allclose(ex.top, dense[::-1][:3], rtol=1e-8, atol=1e-10 * scale)
    np.testing.assert_allclose(ex.bottom, dense[:3], rtol=1e-8, atol=1e-10 * scale)


def test_horizontal_hessian_bottom_k_keeps_a_repeated_zero(x64):
    """sharpness_horizontal with k = 3 and more Lanczos steps (15) than the horizontal space has dimensions (10)
    equals the dense eigendecomposition of P H P on it, the repeated zero included (before: bottom 0, 0.058, 0.110
    against the dense 0, 0, 0.058); the restart vectors stay horizontal (no spurious third zero from a vertical
    direction)."""
    _check_horizontal("loop", quotient=False)


@pytest.mark.slow
@pytest.mark.parametrize("method, quotient", [("loop", True), ("unrolled", False), ("unrolled", True)])
def test_horizontal_hessian_bottom_k_keeps_a_repeated_zero_variants(x64, method, quotient):
    """The same at the canonical point (sharpness_quotient) and with the unrolled Lanczos."""
    _check_horizontal(method, quotient)


def test_raw_hessian_top_k_keeps_multiplicities(x64):
    """sharpness_raw on the same model with as many Lanczos steps as parameters: top-4 / bottom-4 equal the dense
    eigendecomposition of the raw Hessian, whose null space (the zero feature's weights, the translations) gives
    a bottom-4 of zeros (before: one zero, then 0.058, 0.110, 0.150)."""
    loss, params, _ = _linear_classifier()
    dense = np.sort(np.linalg.eigvalsh(np.asarray(jax.jit(lambda p: qobs.dense_hessian(loss, p))(params))))
    n = dense.shape[0]
    ex = jax.jit(lambda p: qobs.sharpness_raw(loss, p, key=jax.random.key(4), num_matvecs=n, k=4))(params)
    scale = float(dense[-1])
    np.testing.assert_allclose(ex.bottom, dense[:4], atol=1e-10 * scale)
    np.testing.assert_allclose(ex.top, dense[::-1][:4], rtol=1e-8)


def test_lanczos_restarts_stay_in_the_operators_domain(x64):
    """P A P with P the projection off two directions, restarted past its 7-dimensional domain: with
    ``domain=P`` the extremes are those of A restricted to the domain (dense reference), not the zeros of the
    projected-out directions that a restart from the whole space finds."""
    # the operator and the dense reference in numpy (eager jnp compiled each op)
    d = np.array([9.0, 8.0, 2.0, 2.0, 4.0, 5.0, 6.0, 7.0, 3.0])
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(5), (9, 9), jnp.float64)))
    a = (q * d[None, :]) @ q.T
    out = np.asarray(jax.random.normal(jax.random.key(6), (9, 2), jnp.float64))
    basis, _ = np.linalg.qr(out)
    proj = lambda v: v - basis @ (basis.T @ v)  # noqa: E731
    v0 = proj(np.ones(9))
    run = jax.jit(lambda v: (qobs.lanczos_extremes(lambda u: proj(a @ proj(u)), v, num_matvecs=12, k=2,
                                                   domain=proj),
                             qobs.lanczos_extremes(lambda u: proj(a @ proj(u)), v, num_matvecs=12, k=2)))
    inside, whole = run(v0)
    hor = np.linalg.qr(np.concatenate([basis, np.eye(9)], axis=1))[0][:, 2:9]
    dense = np.sort(np.linalg.eigvalsh(hor.T @ a @ hor))
    np.testing.assert_allclose(inside.bottom, dense[:2], rtol=1e-9)
    np.testing.assert_allclose(inside.top, dense[::-1][:2], rtol=1e-9)
    np.testing.assert_allclose(whole.bottom, [0.0, 0.0], atol=1e-9)  # the projected-out directions


def _inner(v):
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(j, "jaxpr", None)
        if inner is not None:
            yield getattr(inner, "jaxpr", inner)


def _has(jaxpr, names) -> bool:
    return any(e.primitive.name in names or any(_has(i, names) for v in e.params.values() for i in _inner(v))
               for e in jaxpr.eqns)


def _cond_draws(jaxpr) -> bool:
    """Whether a cond of ``jaxpr`` (at any depth) draws random numbers in a branch: the restart's fresh vector."""
    for e in jaxpr.eqns:
        inner = [i for v in e.params.values() for i in _inner(v)]
        if e.primitive.name == "cond" and any(_has(i, ("random_bits", "threefry2x32")) for i in inner):
            return True
        if any(_cond_draws(i) for i in inner):
            return True
    return False


def test_top_1_needs_no_restart(x64):
    """With k = 1 the Gaussian-started runs carry no restart branch (it only adds multiplicities, which top-1 /
    bottom-1 do not read, and would cost the training program compile time: no branch draws a fresh vector; a
    partial reorthogonalisation's conditional pass is a cond too), and the extremes past a breakdown
    are still the dense ones: the largest and the smallest eigenvalue of P H P on the horizontal space (0)."""
    loss, params, group = _linear_classifier()
    dense = _dense_horizontal(loss, group, params)

    def run(k):
        return lambda p: qobs.sharpness_horizontal(loss, group, p, key=jax.random.key(3), num_matvecs=15, k=k)

    assert not _cond_draws(jax.make_jaxpr(run(1))(params).jaxpr)
    assert _cond_draws(jax.make_jaxpr(run(2))(params).jaxpr)
    ex = jax.jit(run(1))(params)
    np.testing.assert_allclose(ex.top, dense[-1:], rtol=1e-8)
    np.testing.assert_allclose(ex.bottom, dense[:1], atol=1e-10 * float(dense[-1]))
    raw = jax.make_jaxpr(lambda p: qobs.sharpness_raw(loss, p, key=jax.random.key(4), num_matvecs=5, k=1))(params)
    assert not _cond_draws(raw.jaxpr)

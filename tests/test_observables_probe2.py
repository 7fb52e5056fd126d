"""Observables and Hessian extremes on the models and group elements the other tests leave out: a deep linear GL
chain and a BatchNorm CNN far from the identity (factors up to e^6), top-k and bottom-k of the horizontal, quotient
and raw Hessians of a GL chain against a dense float64 eigendecomposition, the gradient-noise temperature of a
Transformer (GL heads) against the dense covariance of its per-example gradients, and the Ritz vectors carried by
an orthogonal GL element."""

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
from quotient_sgd.optim import SGDSpec, eigenvectors_of, observables_of, quotient_trajectory


def _model(name):
    """``(group, params, loss, example_losses, outputs)`` of a small float64 model on a fixed batch."""
    key = jax.random.key(100)
    kx, ky = jax.random.split(key)
    if name == "deep_linear":  # a minimal GL chain 3-2-2-3 (canonical section: all inner widths <= both ends)
        model = models.DeepLinear(3, (2, 2), 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        x = jax.random.normal(kx, (12, 3), jnp.float64)
        y = jax.random.normal(ky, (12, 3), jnp.float64)
    elif name == "batchnorm_cnn":
        model = models.CNN(1, (3, 4), 3, norm="batch", classifier=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        x = jax.random.normal(kx, (6, 5, 5, 1), jnp.float64)
        y = jax.random.randint(ky, (6,), 0, 3)
    else:  # a one-block Transformer, vocabulary 5, width 4
        heads = {"transformer_1_head": 1, "transformer_2_heads": 2}[name]
        model = models.Transformer(5, 4, heads, 1, 4, rngs=nnx.Rngs(0), mlp_ratio=2, param_dtype=jnp.float64)
        x = jax.random.randint(kx, (4, 4), 0, 5)
        y = jnp.roll(x, -1, axis=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def outputs(p):
        return nnx.merge(graphdef, p, rest)(x)

    def example_losses(p):
        out = outputs(p)
        if name == "deep_linear":
            return jnp.mean(jnp.square(out - y), axis=1)
        picked = jnp.take_along_axis(out, y[..., None], axis=-1)[..., 0]  # log-probabilities of the targets
        return -(picked if picked.ndim == 1 else jnp.mean(picked, axis=1))

    def loss(p):
        return jnp.mean(example_losses(p))

    return model.symmetries(), params, loss, example_losses, outputs


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _stacked(tree):
    """A pytree with a leading axis ``k`` as a ``(k, P)`` matrix."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def _tangent_rows(group):
    """The orbit tangents at a point as the rows of a ``(k, P)`` matrix, one compiled program (op by op, each
    point compiled dozens of small ones)."""
    return jax.jit(lambda p: jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(p)))


def _horizontal_basis(tangent_rows, params):
    """``(B, T)``: an orthonormal basis (columns) of the orthogonal complement of the orbit tangents at ``params``,
    and the tangents (rows), from a float64 SVD; the rank of the tangents is read from their singular values."""
    tangents = np.asarray(tangent_rows(params))
    return horizontal_basis(tangents, rtol=1e-12)[0], tangents


@pytest.mark.parametrize("name", ["deep_linear", "batchnorm_cnn"])
def test_orbit_invariants_far_from_the_identity(x64, name):
    """One SGD step with momentum and coupled decay: every orbit-invariant observable (loss, canonical gradient
    norm, invariant norms; for the GL chain also sharpness_quotient with its top / bottom 2, the Hessian at the
    canonical point) is the same on g.params for group elements with factors up to e^6 (a GL chain's condition
    number up to e^9), while the raw gradient norm changes by >= 10x."""
    group, params, loss, _, outputs = _model(name)
    hessian = dict(hessian_every=1, hessian_at=("quotient",), hessian_k=2, lanczos_steps=12)
    tx = quotient_trajectory(optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9)), group,
                             spec=SGDSpec(0.05, coupled_weight_decay=0.01, momentum=0.9),
                             observables=("loss", "grad_norm", "grad_norm_canonical", "invariant_norms"),
                             **(hessian if name == "deep_linear" else {}))

    @jax.jit
    def observed(p):
        _, s = tx.update(jax.grad(loss)(p), tx.init(p), p, value=loss(p), loss_fn=loss)
        return observables_of(s)

    o0 = observed(params)
    invariant = [k for k in o0 if qobs.kind_of(k) == qobs.ORBIT_INVARIANT]
    assert {"loss", "grad_norm_canonical", "invariant_norms"} <= set(invariant)
    assert name != "deep_linear" or {"sharpness_quotient", "hessian_bottom_quotient"} <= set(invariant)
    ratio = 1.0
    # the draw, the action and the model's outputs each one compiled program (op by op, each compiled its ops)
    move = jax.jit(lambda k: group.act(group.sample(k, params, scale=3.0), params))
    outputs = jax.jit(outputs)
    for i in range(2):
        moved = move(jax.random.key(10 + i))
        # (the BatchNorm's eps makes its scale symmetry exact to ~1e-10 only)
        np.testing.assert_allclose(outputs(moved), outputs(params), atol=1e-8)
        o1 = observed(moved)
        for k in invariant:
            for a, b in zip(jax.tree.leaves(o0[k]), jax.tree.leaves(o1[k])):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-10, err_msg=k)
        ratio = max(ratio, float(o1["grad_norm"] / o0["grad_norm"]), float(o0["grad_norm"] / o1["grad_norm"]))
    assert ratio >= 10, ratio


def test_hessian_top_and_bottom_k_of_a_gl_chain_against_dense(x64):
    """At g.params of a deep linear chain (GL vertical space, non-abelian): top-3 and bottom-3 of the horizontal
    Hessian at the point and of the horizontal Hessian at the canonical representative equal the dense eigenvalues
    of B^T H B (B an orthonormal basis of the horizontal space at the evaluation point); the Ritz vectors
    are unit, horizontal and eigenvectors of the dense operator.  (The raw Hessian's against dense: other tests.)"""
    group, params, loss, _, _ = _model("deep_linear")
    point = jax.jit(lambda p: group.act(group.sample(jax.random.key(3), p, scale=1.5), p))(params)
    n = _flat(point).size
    cases = {"horizontal": (qobs.sharpness_horizontal, point), "quotient": (qobs.sharpness_quotient,
                                                                           jax.jit(group.canonicalize)(point))}
    dense_hessian, tangent_rows = jax.jit(lambda p: qobs.dense_hessian(loss, p)), _tangent_rows(group)
    for where, (fn, at) in cases.items():
        ex = jax.jit(lambda p, fn=fn: fn(loss, group, p, key=jax.random.key(1), num_matvecs=n, k=3))(point)
        h = np.asarray(dense_hessian(at))
        basis, tangents = _horizontal_basis(tangent_rows, at)
        assert basis.shape[1] == n - tangents.shape[0]  # the chain is minimal: its generators are independent
        dense = np.linalg.eigvalsh(basis.T @ h @ basis)
        scale = np.max(np.abs(dense))
        np.testing.assert_allclose(ex.top, dense[::-1][:3], atol=1e-10 * scale, err_msg=where)
        np.testing.assert_allclose(ex.bottom, dense[:3], atol=1e-10 * scale, err_msg=where)
        for vecs, vals in ((ex.top_vectors, ex.top), (ex.bottom_vectors, ex.bottom)):
            v = _stacked(vecs)
            np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-10, err_msg=where)
            assert np.max(np.abs(v @ tangents.T)) < 1e-9 * np.max(np.abs(tangents)), where
            ph = basis @ (basis.T @ h)  # P H: on horizontal vectors P H P v = P H v
            np.testing.assert_allclose(v @ ph.T, np.asarray(vals)[:, None] * v, atol=1e-9 * scale, err_msg=where)


def test_gradient_noise_of_a_transformer_against_the_dense_covariance(x64):
    """The noise observable of a 2-head Transformer (QK / VO GL heads, MLP rescale, logit translation: 29
    generators): sigma^2 is the trace of the float64 sample covariance of the per-example gradients projected on the
    horizontal space, divided by its dimension, and T = eta sigma^2 / (2 B), at the parameters, at g.params far
    from the identity and at an orthogonal element (charge-preserving: the same value there); a batch of identical
    examples has zero variance, not NaN."""
    group, params, _, example_losses, _ = _model("transformer_2_heads")
    lr = 0.1
    noise = jax.jit(lambda p: qobs.gradient_noise(example_losses, group, p, lr=lr))
    per_example_grads = jax.jit(lambda p: jax.vmap(lambda t: ravel_pytree(t)[0])(jax.jacrev(example_losses)(p)))
    values = {}
    tangent_rows = _tangent_rows(group)
    # one program for both elements (the scale an input)
    move = jax.jit(lambda q, s: group.act(group.sample(jax.random.key(4), q, scale=s), q))
    for scale in (None, 0.0, 2.0):
        p = params if scale is None else move(params, scale)
        got = noise(p)
        per_example = np.asarray(per_example_grads(p))
        basis, _ = _horizontal_basis(tangent_rows, p)
        projected = per_example @ basis
        sigma2 = np.trace(np.cov(projected.T)) / basis.shape[1]
        np.testing.assert_allclose(got.sigma2, sigma2, rtol=1e-10)
        np.testing.assert_allclose(got.temperature, lr * sigma2 / (2 * per_example.shape[0]), rtol=1e-10)
        np.testing.assert_allclose(got.viscosity, got.temperature / 2, rtol=1e-12)
        values[scale] = float(got.sigma2)
    np.testing.assert_allclose(values[0.0], values[None], rtol=1e-9)  # an orthogonal element keeps the charges
    assert max(values[2.0] / values[None], values[None] / values[2.0]) > 1.5  # a non-isometric one does not

    def same_example(p):
        return jnp.repeat(example_losses(p)[:1], 3)

    n = jax.jit(lambda p: qobs.gradient_noise(same_example, group, p, lr=lr))(params)
    assert np.isfinite(float(n.sigma2)) and abs(float(n.sigma2)) < 1e-25
    assert float(n.temperature) == pytest.approx(0.0, abs=1e-25)


def test_ritz_vectors_are_carried_by_an_orthogonal_gl_element(x64):
    """A deep linear chain moved by an orthogonal element (Haar-random orthogonal GL matrices: charge-preserving):
    the horizontal Hessian's top and bottom Ritz vectors kept by the trajectory at g.params are the pushed-forward
    ones g . v of those at the parameters (up to sign), with the same eigenvalues, and the quotient ones (at the
    canonical representative, the same point for both) are the same vectors."""
    group, params, loss, _, _ = _model("deep_linear")
    n = _flat(params).size
    tx = quotient_trajectory(optax.sgd(0.05), group, spec=SGDSpec(0.05), observables=("loss",), hessian_every=1,
                             hessian_at=("horizontal", "quotient"), hessian_k=2, lanczos_steps=n,
                             keep_eigenvectors=True)

    @jax.jit
    def evaluate(p):
        _, s = tx.update(jax.grad(loss)(p), tx.init(p), p, value=loss(p), loss_fn=loss)
        return observables_of(s), eigenvectors_of(s)

    g = jax.jit(lambda p: group.sample(jax.random.key(5), p, scale=0.0))(params)
    act = jax.jit(group.act)  # (op by op, each action compiled its ops)
    moved = act(g, params)
    o0, v0 = evaluate(params)
    o1, v1 = evaluate(moved)
    assert o0["hessian_top_horizontal"][0] > o0["hessian_top_horizontal"][1] + 1e-3  # simple eigenvalues
    for where in ("horizontal", "quotient"):
        for end in ("top", "bottom"):
            np.testing.assert_allclose(o1[f"hessian_{end}_{where}"], o0[f"hessian_{end}_{where}"], rtol=1e-9)
            for i in range(2):
                v = jax.tree.map(lambda x, i=i: x[i], v0[f"{end}_{where}"])
                w = _flat(jax.tree.map(lambda x, i=i: x[i], v1[f"{end}_{where}"]))
                carried = _flat(act(g, v)) if where == "horizontal" else _flat(v)  # the action is linear
                assert abs(abs(carried @ w) - 1) < 1e-9, (where, end, i, carried @ w)

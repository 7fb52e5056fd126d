"""The vertical projection of an overlapping rescale chain (an MLP's two hidden layers, a CNN's stacked channels)
by the accurate factorisation of its Gram matrix as a diagonally dominant M-matrix (symmetry/_reduced.py,
``direct_vcoeffs``): float32 far from balance, derivatives, degenerate points, and the clusters it must leave to
the generic solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd.symmetry import Product, Rescale
from quotient_sgd.symmetry import _reduced

from helpers import np_tree_norm as tree_norm, np_tree_sub as _sub


# The checks' arithmetic on trees (casts, norms, products) runs in numpy: eager jnp compiled each operation per leaf
# shape.
def _cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(dtype)), tree)


def _tangent_dots(T, h):
    """The products of every orbit tangent (leading axis of ``T``'s leaves) with ``h``."""
    return sum(np.tensordot(np.asarray(t), np.asarray(x), axes=x.ndim) for t, x in zip(jax.tree.leaves(T),
                                                                                       jax.tree.leaves(h)))


def tree_dot(a, b):
    """The Euclidean product of two trees (traced: jnp, inside the differentiated function)."""
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _model(kind):
    if kind == "mlp":
        return models.MLP(6, (8, 8), 4, classifier=True, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    return models.CNN(1, (4, 8), 3, classifier=True, rngs=nnx.Rngs(0), param_dtype=jnp.float64)


def _normal(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float32_projection_far_from_balance_agrees_with_float64(kind, x64):
    # Elements of scale 3 (log-factors up to +-6): the eigendecomposition of the assembled float32 Gram matrix
    # dropped directions and left 3-13% of |v| in the wrong space for most samples.  Reference: float64 at the same
    # (float32-rounded) point and vector.
    model = _model(kind)
    group = model.symmetries()
    _, p = nnx.split(model, nnx.Param)
    worst = 0.0
    for s in range(4):
        k1, k2 = jax.random.split(jax.random.key(100 + s))
        q32 = _cast(group.act(group.sample(k1, p, 3.0), p), np.float32)
        v32 = _cast(_normal(k2, p), np.float32)
        h32 = group.horizontal(q32, v32)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(h32))
        h64 = group.horizontal(*(_cast(t, np.float64) for t in (q32, v32)))
        err = tree_norm(_sub(h32, h64))
        worst = max(worst, err / tree_norm(v32))
    assert worst < 1e-3, worst


def test_projection_is_exact_and_differentiable_at_an_unbalanced_float64_point(x64):
    model = _model("mlp")
    group = model.symmetries()
    _, p = nnx.split(model, nnx.Param)
    p = group.act(group.sample(jax.random.key(1), p, 2.0), p)
    v, w, d = (_normal(jax.random.key(i), p) for i in (2, 3, 4))
    h = group.horizontal(p, v)
    # orthogonal to every orbit tangent, idempotent, and v - h is vertical (its own projection)
    T = group.tangents(p)
    dots = _tangent_dots(T, h)
    assert float(np.max(np.abs(dots))) < 1e-12 * tree_norm(v) * tree_norm(T)
    assert tree_norm(_sub(group.horizontal(p, h), h)) < 1e-12 * tree_norm(v)
    vert = jax.tree.map(jnp.asarray, _sub(v, h))
    assert tree_norm(group.horizontal(p, vert)) < 1e-10 * tree_norm(v)

    def f(p):
        return tree_dot(group.horizontal(p, v), w)

    value_and_grad = jax.jit(jax.value_and_grad(f))  # one program for the gradient and f (eager: op by op)
    an = float(sum(np.sum(np.asarray(a) * np.asarray(b)) for a, b in zip(jax.tree.leaves(value_and_grad(p)[1]),
                                                                        jax.tree.leaves(d))))
    eps = 1e-6
    shifted = [jax.tree.map(lambda a, b: jnp.asarray(np.asarray(a) + s * eps * np.asarray(b)), p, d) for s in (1, -1)]
    fd = (float(value_and_grad(shifted[0])[0]) - float(value_and_grad(shifted[1])[0])) / (2 * eps)
    assert abs(an - fd) < 1e-6 * max(1.0, abs(fd))


def test_dead_unit_gets_zero_coefficient_and_a_finite_gradient(x64):
    model = _model("mlp")
    group = model.symmetries()
    _, p = nnx.split(model, nnx.Param)
    p = jax.tree.map(lambda x: x, p)
    k0, b0, k1 = p["layers"][0]["kernel"], p["layers"][0]["bias"], p["layers"][1]["kernel"]
    k0[...] = k0[...].at[:, 2].set(0.0)
    b0[...] = b0[...].at[2].set(0.0)
    k1[...] = k1[...].at[2, :].set(0.0)
    v = _normal(jax.random.key(2), p)
    h = group.horizontal(p, v)
    # the dead unit has no orbit tangent: its (zero) weights' components of v are horizontal, kept as they are
    np.testing.assert_array_equal(np.asarray(h["layers"][0]["kernel"][...][:, 2]),
                                  np.asarray(v["layers"][0]["kernel"][...][:, 2]))
    T = group.tangents(p)
    dots = _tangent_dots(T, h)
    assert float(np.max(np.abs(dots))) < 1e-12 * tree_norm(v) * tree_norm(T)
    g = jax.jit(jax.grad(lambda p: tree_dot(group.horizontal(p, v), v)))(p)  # (eager: op by op)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_signs_exist_for_chains_and_not_for_three_actions_on_one_array():
    x = {("a",): jnp.ones((3, 4)), ("b",): jnp.ones((4, 5)), ("c",): jnp.ones((5, 2))}
    chain = (Rescale([(("a",), 1)], [(("b",), 0)], "r0"), Rescale([(("b",), 1)], [(("c",), 0)], "r1"))
    plan = _reduced.rescale_plan(chain, x)
    assert _reduced.m_signs(plan, 2) == (1, 1)
    # the same chain with the second component declared the other way round (incoming / outgoing swapped): the
    # coupling changes sign, and so does that component's sign
    flipped = (chain[0], Rescale([(("c",), 0)], [(("b",), 1)], "r1"))
    assert _reduced.m_signs(_reduced.rescale_plan(flipped, x), 2) == (1, -1)
    y = {("a",): jnp.ones((3, 4, 5)), ("b",): jnp.ones((3,)), ("c",): jnp.ones((4,)), ("d",): jnp.ones((5,))}
    three = tuple(Rescale([(("a",), i)], [(q, 0)], f"r{i}") for i, q in enumerate([("b",), ("c",), ("d",)]))
    assert _reduced.m_signs(_reduced.rescale_plan(three, y), 3) is None


def test_a_cluster_without_signs_is_still_projected_exactly(x64):
    # three rescales on the axes of one array (no M-matrix form): the generic dense solve runs, and the result is
    # the orthogonal projection (checked against the tangents)
    key = jax.random.key(0)
    ks = jax.random.split(key, 5)
    p = {"a": jax.random.normal(ks[0], (3, 4, 5), jnp.float64), "b": jax.random.normal(ks[1], (3,), jnp.float64),
         "c": jax.random.normal(ks[2], (4,), jnp.float64), "d": jax.random.normal(ks[3], (5,), jnp.float64)}
    group = Product([Rescale([(("a",), i)], [((q,), 0)], f"r{i}") for i, q in enumerate("bcd")])
    v = _normal(ks[4], p)
    h = group.horizontal(p, v)
    T = group.tangents(p)
    dots = _tangent_dots(T, h)
    assert float(np.max(np.abs(dots))) < 1e-10
    assert tree_norm(_sub(group.horizontal(p, h), h)) < 1e-10

"""The sums the per-step observables run on (``quotient_sgd._reduce``: products with a vector of ones instead of
``reduce`` kernels), the unsorted permutation invariants behind ``invariant_norms``, and the skipped-step test of
the charge prediction: each equal to the direct form it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd._reduce import sum_all, sum_except, vdot
from quotient_sgd.observables._util import tree_dot, unit_sum
from quotient_sgd.optim import SGDSpec, observables_of, quotient_trajectory

SHAPES = [(), (5,), (300,), (3, 4), (64, 256), (256, 10), (17, 300), (3, 3, 4, 8), (2, 3, 40, 5, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sums_equal_jnp_sum_on_every_axis(shape, x64):
    x = jax.random.normal(jax.random.key(len(shape)), shape, jnp.float64)
    y = jax.random.normal(jax.random.key(7), shape, jnp.float64)
    scale = np.sum(np.abs(np.asarray(x)))
    np.testing.assert_allclose(sum_all(x), np.sum(np.asarray(x)), rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(vdot(x, y), np.sum(np.asarray(x) * np.asarray(y)), rtol=0,
                               atol=1e-13 * float(np.sum(np.abs(np.asarray(x) * np.asarray(y)))))
    for axis in range(-len(shape), len(shape)):
        want = np.sum(np.asarray(x), axis=tuple(i for i in range(len(shape)) if i != axis % len(shape)))
        got = sum_except(x, axis)
        assert got.shape == (shape[axis],)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * scale)


def test_sums_in_float32_keep_dtype_and_compose_with_vmap_and_grad():
    x = jax.random.normal(jax.random.key(0), (4, 64, 256), jnp.float32)
    assert sum_all(x[0]).dtype == jnp.float32 and sum_except(x[0], 1).dtype == jnp.float32
    np.testing.assert_allclose(jax.vmap(sum_all)(x), np.sum(np.asarray(x, np.float64), axis=(1, 2)), rtol=1e-4,
                               atol=1e-3)
    np.testing.assert_allclose(jax.vmap(lambda a: sum_except(a, 0))(x), np.sum(np.asarray(x), axis=2), rtol=1e-4,
                               atol=1e-4)
    y = jax.random.normal(jax.random.key(1), (64, 256), jnp.float32)
    np.testing.assert_allclose(jax.grad(lambda a: vdot(a, y))(x[0]), y, rtol=0, atol=0)
    w = jax.random.normal(jax.random.key(2), (256,), jnp.float32)
    np.testing.assert_allclose(jax.grad(lambda a: jnp.dot(sum_except(a, 1), w))(x[0]),
                               np.broadcast_to(np.asarray(w), (64, 256)), rtol=0, atol=0)


def test_tree_dot_and_unit_sum_equal_their_direct_forms(x64):
    model = models.CNN(1, (4, 8), 3, classifier=True, rngs=nnx.Rngs(0))
    _, p = nnx.split(model, nnx.Param)
    p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
    q = jax.tree.map(lambda a: jnp.sin(3 * a) + 0.1, p)
    direct = sum(float(np.sum(np.asarray(a) * np.asarray(b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
    np.testing.assert_allclose(tree_dot(p, q), direct, rtol=1e-12)
    group = model.symmetries()
    for comp in group.components:
        members = tuple(getattr(comp, "incoming", ())) + tuple(getattr(comp, "outgoing", ()))
        if not members:
            continue
        got = unit_sum((p, q), members, lambda a, b: a * b)
        want = 0
        for path, axis in members:
            a = np.asarray(_leaf(p, path))
            b = np.asarray(_leaf(q, path))
            if axis is None:
                want = want + np.sum(a * b)
            else:
                ax = axis % a.ndim
                want = want + np.sum(a * b, axis=tuple(i for i in range(a.ndim) if i != ax))
        np.testing.assert_allclose(got, np.reshape(want, np.shape(got)), rtol=1e-12, atol=1e-14)


def _leaf(tree, path):
    from quotient_sgd import _tree

    return _tree.flatten(tree)[0][tuple(path)]


def test_unordered_permutation_invariants_are_the_sorted_ones_unsorted():
    """``unordered_invariants`` of a permutation component are its sort keys in the units' order: sorted, they
    are ``invariants`` (the canonical representative's), not only of the same norm."""
    model = models.MLP(5, (7, 6), 3, classifier=True, rngs=nnx.Rngs(3))
    _, p = nnx.split(model, nnx.Param)
    group = model.symmetries()
    g = group.sample(jax.random.key(4), p, scale=1.0)
    inv = group.invariants(p)
    perms = [c.name for c in group.components if not c.continuous]
    assert perms
    for q in (p, group.act(g, p)):
        un = group.unordered_invariants(q)
        for name in perms:
            np.testing.assert_allclose(jnp.sort(un[name]), inv[name], rtol=1e-4, atol=1e-6)


def test_a_skipped_step_is_one_of_exact_zeros_only():
    """The charge prediction treats an update of exact zeros as a skipped step (optax.apply_if_finite, MultiSteps:
    no drift predicted); an update of entries ~1e-37 (normal numbers, whose squares are 0 in float32) is a step
    (the weight decay's drift is predicted)."""
    model = models.MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    _, p = nnx.split(model, nnx.Param)
    group = model.symmetries()
    grads = jax.tree.map(jnp.zeros_like, p)
    spec = SGDSpec(0.1, weight_decay=0.5)
    for s, skipped in ((0.0, True), (1e-36, False)):
        # the update is s times SGD's with weight decay; s = 1e-36 makes its entries ~1e-37
        tx = quotient_trajectory(optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1), optax.scale(s)),
                                 group, spec=spec, observables=("charge_drift_predicted",))
        _, state = tx.update(grads, tx.init(p), p, value=jnp.float32(1.0))
        pred = observables_of(state)["charge_drift_predicted"]
        assert any(bool(jnp.any(v != 0)) for v in jax.tree.leaves(pred)) != skipped, (s, pred)

"""Rescale chains (and a logit translation) canonicalised and projected through their squared weights
(quotient_sgd.symmetry._reduced): exact properties in float64 at random group elements, and agreement with the
dense reference projection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd.symmetry import Product, _reduced
from quotient_sgd.symmetry._vertical import vertical_generic
from helpers import np_tree_norm as _norm


def _f64(tree):
    """The tree cast to float64 on the host (eager, each leaf shape compiled a conversion)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


def _setup(widths, classifier, seed, d_in=5, d_out=3):
    # the model initialised with float64 off (the float32 test's initialisation programs, compiled once), its
    # parameters cast to float64 (in the caller's float64 context)
    with jax.enable_x64(False):
        model = models.MLP(d_in, widths, d_out, classifier=classifier, rngs=nnx.Rngs(seed))
        graphdef, params = nnx.split(model, nnx.Param)
    return model, graphdef, _f64(params), model.symmetries()


# The float64 tests share one architecture, (40, 30) hidden units with a classifier head (a rescale chain of 70
# units plus the logit translation, above dense_max: the reduced CG path), so that its model initialisation and its
# group's sample / act / canonical-element programs compile once for the file; each test draws its own parameters.
WIDTHS = (40, 30)


def _maxdiff(a, b):
    """The largest entry of ``|a - b|`` over two trees (in numpy: eager jnp compiled three operations per shape)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                    jax.tree.leaves(b)))


def _randlike(tree, offset):
    """Standard normal entries like every leaf (its shape and dtype), seeded by the leaf's size and ``offset``; drawn
    in numpy (drawn by JAX, each leaf shape compiled a program of its own)."""
    return jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size + offset).standard_normal(x.shape)
                                              .astype(x.dtype)), tree)


def _cluster_comps(group):
    (cl,) = [cl for cl in group.continuous_clusters() if len(cl) > 1]
    return tuple(group.components[i] for i in cl)


@functools.partial(jax.jit, static_argnums=(0,))
def _balance_errors(group, point):
    """Per rescale, the largest charge of a unit relative to its norms; per translation, the largest row or bias
    mean: one compiled program per group and shapes (eager, each small operation compiles on its own)."""
    flat, _ = group._flat(point)
    out = {}
    for c in group.components:
        if type(c).__name__ == "Rescale":
            sin, sout = c._in_out_sq(flat)
            out[c.name] = jnp.max(jnp.abs(sin - sout) / (sin + sout))
        if type(c).__name__ == "Translation":
            out[c.name] = jnp.maximum(jnp.max(jnp.abs(jnp.mean(flat[c.kernel], axis=1))),
                                      jnp.abs(jnp.mean(flat[c.bias])))
    return out


def _balanced_and_centred(group, point, tol):
    """Every rescale unit balanced (charge 0 relative to its norms), every translation's rows and bias centred."""
    errs = _balance_errors(group, point)
    assert any(k.startswith("rescale") for k in errs)
    assert all(float(e) < tol for e in errs.values()), errs


@pytest.mark.parametrize("widths,classifier,seed", [
    (WIDTHS, True, 0), pytest.param((20, 30, 25), False, 1, marks=pytest.mark.slow)])
def test_reduced_canonical_point_is_exact_and_orbit_constant(widths, classifier, seed):
    with jax.enable_x64(True):
        model, graphdef, params, group = _setup(widths, classifier, seed)
        comps = _cluster_comps(group) if len(widths) > 1 or classifier else None
        if comps is not None:
            assert _reduced.split_cluster(comps, group._flat(params)[0]) is not None  # the reduced path runs
        g = group.sample(jax.random.key(seed + 10), params, scale=2.0)
        moved = group.act(g, params)
        pts = [group.act(group.continuous_canonical_element(p), p) for p in (params, moved)]
        for pt in pts:
            _balanced_and_centred(group, pt, 1e-9)
        # the continuous group: canonical points of params and g . params differ by a permutation of units only,
        # so compare the (sorted) canonical representatives
        c0, c1 = group.canonicalize(params), group.canonicalize(moved)
        assert _maxdiff(c0, c1) < 1e-8 * max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(c0))
        # same function
        x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 5)))  # float64 (drawn in numpy: no compile)
        out = nnx.merge(graphdef, moved)(x)
        np.testing.assert_allclose(nnx.merge(graphdef, pts[1])(x), out, rtol=1e-9, atol=1e-12)
        # warm start from another point's element: the same fixed point
        warm = group.continuous_canonical_element(moved, init=group.continuous_canonical_element(params))
        assert _maxdiff(group.act(warm, moved), pts[1]) < 1e-9


def test_reduced_translation_before_the_rescales_in_the_word():
    """A translation listed before the rescales acts on the unscaled rows: its element differs, the point does
    not."""
    with jax.enable_x64(True):
        _, _, params, group = _setup(WIDTHS, True, 4)
        comps = list(group.components)
        trans = [c for c in comps if type(c).__name__ == "Translation"]
        reordered = Product(trans + [c for c in comps if c not in trans])
        moved = group.act(group.sample(jax.random.key(5), params, scale=2.0), params)
        a = group.act(group.continuous_canonical_element(moved), moved)
        b = reordered.act(reordered.continuous_canonical_element(moved), moved)
        assert _maxdiff(a, b) < 1e-9
        _balanced_and_centred(reordered, b, 1e-9)


def test_reduced_canonical_point_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        _, _, params, group = _setup((12, 9), True, 6)
        params = group.act(group.sample(jax.random.key(7), params, scale=1.0), params)
        w = _randlike(params, 0)

        def f(p):
            c = group.act(group.continuous_canonical_element(p), p)
            return sum(jnp.sum(jnp.sin(a) * b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(w)))

        # one program for the gradient and the two values of f (eager, the gradient dispatched op by op)
        value_and_grad = jax.jit(jax.value_and_grad(f))
        grad = value_and_grad(params)[1]
        d = _randlike(params, 1)
        h = 1e-5
        # the shifted points and the directional derivative in numpy (eager jnp compiled each op per shape)
        fd = (value_and_grad(jax.tree.map(lambda x, y: np.asarray(x) + h * np.asarray(y), params, d))[0]
              - value_and_grad(jax.tree.map(lambda x, y: np.asarray(x) - h * np.asarray(y), params, d))[0])
        fd = fd / (2 * h)
        an = sum(np.sum(np.asarray(a) * np.asarray(b)) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
        assert abs(float(an - fd)) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("widths,classifier", [(WIDTHS, True), pytest.param((90,), True, marks=pytest.mark.slow)])
def test_reduced_vertical_matches_the_dense_reference(widths, classifier):
    """Clusters above dense_max generators go through CG on the reduced Gram matrix (with the translation's rows
    split off); the projection equals the dense pseudo-inverse one and is a projection."""
    with jax.enable_x64(True):
        _, _, params, group = _setup(widths, classifier, 8)
        params = group.act(group.sample(jax.random.key(9), params, scale=2.0), params)
        comps = _cluster_comps(group) if len(widths) > 1 or classifier else None
        if comps is not None:
            k = sum(x.size for c in comps for x in jax.tree.leaves(c._algebra_zeros(group._flat(params)[0])))
            assert k > group.dense_max  # the CG path
        v = _randlike(params, 3)
        pv = group.vertical(params, v)
        scale = _norm(v)
        assert _maxdiff(pv, vertical_generic(group, params, v)) < 1e-8 * scale
        assert _maxdiff(group.vertical(params, pv), pv) < 1e-8 * scale
        h = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), v, pv)
        tangents = group.tangents(params)  # stacked on a leading axis
        tl, hl = [np.asarray(t) for t in jax.tree.leaves(tangents)], [np.asarray(a) for a in jax.tree.leaves(h)]
        dots = sum(np.tensordot(t, a, axes=a.ndim) for t, a in zip(tl, hl))  # (in numpy: eager jnp, op by op)
        tnorm = np.sqrt(sum(np.sum(np.square(t), axis=tuple(range(1, t.ndim))) for t in tl))
        assert float(np.max(np.abs(dots) / tnorm)) < 1e-8 * scale  # the horizontal part is orthogonal to the orbit


def test_reduced_vertical_float32_and_conv_kernels():
    """float32 projection within its rounding of the dense reference, on a CNN (4-d kernels, a classifier head)
    and an MLP whose cluster is above dense_max (the float64 tests' architecture: its initialisation compiled
    once)."""
    cnn = models.CNN(1, (8, 12), 10, classifier=True, rngs=nnx.Rngs(0))
    mlp = models.MLP(5, WIDTHS, 3, classifier=True, rngs=nnx.Rngs(1))
    for model in (cnn, mlp):
        _, params = nnx.split(model, nnx.Param)
        group = model.symmetries()
        params = group.act(group.sample(jax.random.key(2), params, scale=1.0), params)
        v = _randlike(params, 0)
        scale = _norm(v)
        assert _maxdiff(group.vertical(params, v), vertical_generic(group, params, v)) < 1e-4 * scale
        point = group.act(group.continuous_canonical_element(params), params)
        _balanced_and_centred(group, point, 1e-4)

"""Probe of the symmetry groups at other sizes and special points: the generic block-coordinate sweeps with a logit
translation listed before the rescale that scales its rows, and derivatives of the dense vertical projection at
points where Gram eigenvalues or singular values coincide (identical units, dead units, orthonormal factors)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import _tree, models
from quotient_sgd.symmetry import Permutation, Product, Rescale, Scale, Translation, _reduced


def _maxdiff(a, b):
    """The largest entry of ``|a - b|`` over whole trees, in NumPy (eager ``jnp`` would compile each operation)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _rand_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# ----- sweeps: a translation listed before the rescale of its rows ---------------------------------------------
def _two_layer(seed, d_in=4, h=5, c=3):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"l0": {"kernel": jax.random.normal(k[0], (d_in, h), jnp.float64),
                   "bias": jax.random.normal(k[1], (h,), jnp.float64)},
            "l1": {"kernel": jax.random.normal(k[2], (h, c), jnp.float64),
                   "bias": jax.random.normal(k[3], (c,), jnp.float64)}}


def _components():
    """Hidden-unit rescale, the logit translation on the next kernel (whose rows the rescale scales), a scale block
    on the first layer (keeps the cluster off the squared-weight path) and the unit permutation."""
    r = Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),), name="r")
    t = Translation(kernel=("l1", "kernel"), bias=("l1", "bias"), name="t")
    s = Scale(members=((("l0", "kernel"), None), (("l0", "bias"), None)), name="s")
    p = Permutation(members=((("l0", "kernel"), 1), (("l0", "bias"), 0), (("l1", "kernel"), 0)), name="p")
    return r, t, s, p


def _gauge_errors(comps, point):
    return tuple(float(e) for e in _gauge_errors_compiled(comps, _tree.flatten(point)[0]))


@functools.partial(jax.jit, static_argnums=0)  # (one program: op by op the canonical elements compiled each operation)
def _gauge_errors_compiled(comps, flat):
    r, t, s, _ = comps
    return (jnp.max(jnp.abs(r._canonical_element(flat))), jnp.abs(s._canonical_element(flat)),
            jnp.max(jnp.abs(jnp.mean(flat[t.kernel], axis=1))), jnp.abs(jnp.mean(flat[t.bias])))


@jax.jit  # one program per listing order, shared by the seeds (the group's fields are static: part of the key)
def _canonicalize_twice(group, x):
    c = group.canonicalize(x)
    return c, group.canonicalize(c)


@pytest.mark.parametrize("seed", [0, 1])
def test_sweeps_with_the_translation_listed_first_reach_the_same_canonical_point(x64, seed):
    comps = _components()
    r, t, s, p = comps
    params = _two_layer(seed)
    orders = [(r, s, t, p), (t, r, s, p)]
    groups = [Product(o, name="g") for o in orders]
    (cl,) = [cl for cl in groups[1].continuous_clusters() if len(cl) > 1]
    assert _reduced.split_cluster(tuple(groups[1].components[i] for i in cl),
                                  _tree.flatten(params)[0]) is None  # the generic sweeps run
    moved = groups[0].act(groups[0].sample(jax.random.key(seed + 10), params, scale=2.0), params)
    ref = groups[0].canonicalize(params)
    for g in groups:
        can, again = _canonicalize_twice(g, moved)
        assert _maxdiff(can, ref) < 1e-12  # the same representative for every listing order, constant on the orbit
        assert _maxdiff(again, can) < 1e-12  # a fixed point
        assert max(_gauge_errors(comps, can)) < 1e-12  # balanced, unit norm, centred


# ----- derivatives of the dense projection at degenerate points ------------------------------------------------
def _fd_check(f_and_grad, point, seed, eps=1e-6, rtol=1e-6):
    """``f_and_grad = (f, grad f)``: the gradient at ``point`` against the central difference of f along a random
    direction."""
    f, grad_f = f_and_grad
    grad = grad_f(point)
    assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(grad))
    d = _rand_like(point, seed)
    fd = float(f(_shifted(point, d, eps))) - float(f(_shifted(point, d, -eps)))
    fd = fd / (2 * eps)
    an = float(sum(np.sum(np.asarray(a) * np.asarray(b)) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(d))))
    np.testing.assert_allclose(an, fd, rtol=rtol, atol=1e-8)


def _shifted(point, d, t):
    """``point + t d``, leaf by leaf in NumPy (eager ``jnp`` would compile each operation)."""
    return jax.tree.map(lambda x, y: jnp.asarray(np.asarray(x) + t * np.asarray(y)), point, d)


def _projection_sum(group, v, p):
    h = group.horizontal(p, v)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(h))


# f(p) = sum sin(horizontal(p, v)) and its gradient in p: one program each per group and shapes (the group's fields
# are static, part of the cache key), shared by the tests on the same network
_projection_value = jax.jit(_projection_sum)
_projection_grad = jax.jit(jax.grad(_projection_sum, argnums=2))


def _projection_functional(group, v):
    return functools.partial(_projection_value, group, v), functools.partial(_projection_grad, group, v)


def _mlp(widths, seed):
    model = models.MLP(3, widths, 2, rngs=nnx.Rngs(seed))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), nnx.split(model, nnx.Param)[1])
    return params, model.symmetries()


def _set_units(params, layer, fn):
    """``params`` with layer ``layer``'s hidden units (incoming kernel columns, bias, outgoing kernel rows) replaced
    by ``fn(array, axis)``."""
    p = jax.tree.map(lambda x: x, params)
    lay = p["layers"]
    for (l, name, axis) in ((layer, "kernel", 1), (layer, "bias", 0), (layer + 1, "kernel", 0)):
        lay[l][name][...] = fn(lay[l][name][...], axis)
    return p


def test_grad_of_the_dense_projection_at_identical_units_is_the_finite_difference(x64):
    params, group = _mlp((4, 4), 0)
    # every unit of the first hidden layer identical: the Jacobi-scaled Gram matrix has a repeated eigenvalue
    same = _set_units(params, 0, lambda x, a: jnp.broadcast_to(jnp.take(x, jnp.array([0]), axis=a), x.shape))
    _fd_check(_projection_functional(group, _rand_like(params, 1)), same, 2)


def test_grad_of_the_dense_projection_at_dead_units_is_finite(x64):
    params, group = _mlp((4, 4), 3)
    zero = jnp.array([0.0, 0.0, 1.0, 1.0])  # units 0 and 1 of the first hidden layer dead
    dead = _set_units(params, 0, lambda x, a: x * zero.reshape([-1 if i == a else 1 for i in range(x.ndim)]))
    f = _projection_functional(group, _rand_like(params, 4))
    grad = f[1](dead)
    assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(grad))
    # (the projection jumps at a dead unit; near it, the derivative is the finite difference)
    _fd_check(f, _shifted(dead, _rand_like(params, 5), 1e-2), 6)


def test_grad_of_the_deep_linear_projection_at_orthonormal_factors_is_the_finite_difference(x64):
    model = models.DeepLinear(3, (2, 2), 3, rngs=nnx.Rngs(0))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), nnx.split(model, nnx.Param)[1])
    e = jnp.eye(3, dtype=jnp.float64)[:, :2]
    for l, w in enumerate((e, jnp.eye(2, dtype=jnp.float64), e.T)):  # every singular value of J repeated
        params["layers"][l]["kernel"][...] = w
    _fd_check(_projection_functional(model.symmetries(), _rand_like(params, 7)), params, 8)


def test_grad_of_the_attention_projection_at_orthonormal_heads_is_the_finite_difference(x64):
    model = models.Transformer(5, 4, 2, 1, 3, mlp_ratio=1, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    params = nnx.split(model, nnx.Param)[1]
    attn = params["blocks"][0]["attn"]
    e = jnp.broadcast_to(jnp.eye(4, dtype=jnp.float64)[:, :2], (2, 4, 2))
    for n in ("w_q", "w_k", "w_v"):  # L^T L = R~^T R~ = I in every head: repeated singular values
        attn[n][...] = e
    attn["w_o"][...] = jnp.swapaxes(e, 1, 2)
    _fd_check(_projection_functional(model.symmetries(), _rand_like(params, 9)), params, 10)

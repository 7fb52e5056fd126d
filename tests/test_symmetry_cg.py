"""The matrix-free vertical solve (CG on the Gram matrix of an overlapping cluster): exact against a dense
solve, and it stops when it has converged on generic vectors in float32 (its stopping test is norm-wise: a
per-entry relative test never passes for entries near zero, and the solve ran to its cap of 4 k iterations)."""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from quotient_sgd import models
from quotient_sgd.symmetry import _base


def _setup(sizes, dtype):
    din, hidden, dout = sizes
    model = models.MLP(din, hidden, dout, classifier=True, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    group = model.symmetries()
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = jax.tree.unflatten(treedef, [_normal(k, x.shape, "float32").astype(dtype)
                                     for k, x in zip(keys, leaves)])
    return group, params, v


def _normal(key, shape, dtype):
    """``jax.random.normal(key, shape, dtype)``, drawn flat and reshaped: the same values (threefry counts by the
    flat index), without compiling a two-dimensional draw per shape (~1 s each)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _ravel(tree, lead=False):
    """``ravel_pytree(tree)[0]`` as a float64 numpy vector (rows of a matrix for leaves stacked on a leading axis)."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    if lead:
        return np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
    return np.concatenate([x.reshape(-1) for x in leaves])


def _cg_steps(group, params, v):
    flat, _ = group._flat(params)
    vflat, _ = group._flat(v)
    comps = tuple(group.components[i] for i in group._cont())
    k = sum(x.size for c in comps for x in jax.tree.leaves(c._algebra_zeros(flat)))

    def run(flat, vflat):  # jitted: one program, not the solve dispatched op by op
        matvec, b, inv, tol, max_steps, _ = _base.cg_system(comps, flat, vflat)
        return _base._pcg(matvec, b, inv, tol, max_steps, return_steps=True)[1]

    num_steps = jax.jit(run)(flat, vflat)
    return int(num_steps), k


# float32: the CG's step count and its accuracy against the float64 projection are asserted on a wider network by
# test_cg_vertical_stops_in_float32_on_a_wide_mlp (and the float64 projection against the dense one here)
@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "float64"])
def test_cg_vertical_matches_dense_projection(dtype, monkeypatch):
    with jax.enable_x64(dtype == "float64"):
        group, params, v = _setup((32, (128, 128), 10), dtype)
        steps, k = _cg_steps(group, params, v)
        assert k > group.dense_max  # the cluster is solved by CG, not densely
        tm = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(params)), np.float64)
        vf = np.asarray(ravel_pytree(v)[0], np.float64)
        proj = tm.T @ np.linalg.solve(tm @ tm.T, tm @ vf)
        got = np.asarray(ravel_pytree(group.vertical(params, v))[0], np.float64)
        tol = 1e-9 if dtype == "float64" else 1e-4
        assert np.linalg.norm(got - proj) <= tol * np.linalg.norm(proj)
        assert steps < 60, (steps, 4 * k)


def test_cg_vertical_stops_in_float32_on_a_wide_mlp(monkeypatch):
    """64-256-256-10 (769 generators, Jacobi-scaled Gram condition number ~6): converged in ~10 iterations; the
    per-entry test ran all 3076."""
    group, params, v = _setup((64, (256, 256), 10), "float32")
    steps, k = _cg_steps(group, params, v)
    assert steps < 60, (steps, 4 * k)
    with jax.enable_x64(True):  # the same group, parameters and vector in float64 (what _setup gives)
        p64, v64 = (jax.tree.map(lambda x: x.astype("float64"), t) for t in (params, v))
        ref = np.asarray(ravel_pytree(group.vertical(p64, v64))[0])
    got = np.asarray(ravel_pytree(group.vertical(params, v))[0], np.float64)
    assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)


# (6, 6) is a second non-minimal chain on the same CG path (72 generators against 74): slow suite
@pytest.mark.parametrize("widths", [(5, 7), pytest.param((6, 6), marks=pytest.mark.slow)])
def test_cg_projection_of_horizontal_vectors(x64, widths, monkeypatch):
    """A horizontal vector (a gradient) has a zero vertical part, and the projection is idempotent, when the
    cluster goes through CG with a rank-deficient Gram matrix (a non-minimal deep linear GL chain, 72-74
    generators).  Scaling the right-hand side by |J^T v| (~ rounding here) made CG chase the noise: a vertical
    part 22x the gradient's norm."""
    import jax.numpy as jnp

    from quotient_sgd.symmetry import Product

    from quotient_sgd.symmetry import _product

    model = models.DeepLinear(8, widths, 5, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    gd, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    dense = Product(group.components, name=group.name, dense_max=10**6)
    monkeypatch.setattr(_product, "NONABELIAN_DENSE_MAX", 0)  # this test is about the CG solve itself
    x = jax.random.normal(jax.random.key(1), (7, 8), jnp.float64)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(nnx.merge(gd, q)(x)))))(params)  # (eager: op by op)
    norm = lambda t: float(jnp.linalg.norm(ravel_pytree(t)[0]))  # noqa: E731
    k = jax.tree.leaves(jax.eval_shape(group.tangents, params))[0].shape[0]  # generators
    assert k > group.dense_max  # solved by CG
    assert norm(group.vertical(params, grad)) <= 1e-10 * norm(grad)
    v = jax.tree.map(lambda a: _normal(jax.random.key(3), a.shape, a.dtype), params)
    h = group.horizontal(params, v)
    diff = jax.tree.map(lambda a, b: a - b, group.horizontal(params, h), h)
    assert norm(diff) <= 1e-9 * norm(h)
    ref = dense.horizontal(params, v)
    assert norm(jax.tree.map(lambda a, b: a - b, h, ref)) <= 1e-9 * norm(ref)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_gl_chain_projection_at_unbalanced_points(x64, scale):
    """A deep linear GL chain's cluster (72 generators, above dense_max) at a point moved by a random element:
    the horizontal part is orthogonal to every orbit tangent and the projection is idempotent.  Jacobi-CG stalled
    at its step cap here (16-24% off at scale 2); such clusters are solved densely."""
    import jax.numpy as jnp

    model = models.DeepLinear(8, (6, 6), 7, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
    _, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    k = jax.tree.leaves(jax.eval_shape(group.tangents, params))[0].shape[0]
    assert k > group.dense_max
    for seed in (7, 8):
        p = group.act(group.sample(jax.random.key(seed), params, scale=scale), params)
        v = jax.tree.map(lambda a: _normal(jax.random.key(3), a.shape, a.dtype), p)
        h = group.horizontal(p, v)
        # ravelled (in ravel_pytree's leaf order) and checked in numpy: eager jnp compiled each operation per shape
        hf, vf, hh = (_ravel(t) for t in (h, v, group.horizontal(p, h)))
        tm = _ravel(group.tangents(p), lead=True)
        cos = np.abs(tm @ hf) / (np.linalg.norm(tm, axis=1) * np.linalg.norm(vf))
        assert float(np.max(cos)) < 1e-10
        assert float(np.linalg.norm(hh - hf)) < 1e-6 * float(np.linalg.norm(hf))


def test_cg_vertical_is_finite_once_converged():
    """float32 MLP with a width-1 hidden layer at unbalanced points (69 generators: CG): the CG reached an exactly
    zero residual and divided 0 by 0, so the projection was NaN (lineax's CG, 4-10 of 10 points); it now stops
    there, and the projection equals the float64 one to float32 rounding."""
    import jax.numpy as jnp

    model = models.MLP(5, (60, 1, 8), 3, classifier=True, rngs=nnx.Rngs(1))
    _, p0 = nnx.split(model, nnx.Param)
    group = model.symmetries()
    key = jax.random.key(0)
    p = group.act(group.sample(key, p0, scale=2.0), p0)
    v = jax.tree.map(lambda x: _normal(jax.random.fold_in(key, x.size), x.shape, "float32"), p)
    got = np.asarray(ravel_pytree(group.vertical(p, v))[0], np.float64)
    assert np.all(np.isfinite(got))
    with jax.enable_x64(True):
        p64, v64 = (jax.tree.map(lambda x: x.astype(jnp.float64), t) for t in (p, v))
        ref = np.asarray(ravel_pytree(group.vertical(p64, v64))[0])
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(np.asarray(ravel_pytree(v64)[0]))


def test_grad_through_the_cg_vertical_matches_finite_differences(x64, monkeypatch):
    """Derivatives of the CG projection by the implicit function theorem (``custom_linear_solve``): an MLP's
    rescale chain on the generic CG (not the squared-weight one, not the dense solve), against central finite
    differences in float64.  lineax refused the tangent of the Jacobi preconditioner built from the parameters:
    jax.grad raised."""
    import jax.numpy as jnp

    from quotient_sgd.symmetry import Product, _reduced

    model = models.MLP(3, (4, 5), 2, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
    _, params = nnx.split(model, nnx.Param)
    group = Product(model.symmetries().components, dense_max=0)  # CG for every cluster
    monkeypatch.setattr(_reduced, "split_cluster", lambda *a: None)  # the generic tangent maps
    v = jax.tree.map(lambda a: _normal(jax.random.key(a.size), a.shape, a.dtype), params)
    d = jax.tree.map(lambda a: _normal(jax.random.key(a.size + 7), a.shape, a.dtype), params)

    def f(p):
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(group.vertical(p, v)))

    value_and_grad = jax.jit(jax.value_and_grad(f))  # one program for the gradient and the two values of f
    grad = value_and_grad(params)[1]
    # the directional derivative and the shifted points in numpy (eager jnp compiled each operation per shape)
    an = sum(float(np.sum(np.asarray(a) * np.asarray(b))) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
    h = 1e-6
    fd = (value_and_grad(jax.tree.map(lambda a, b: jnp.asarray(np.asarray(a) + h * np.asarray(b)), params, d))[0]
          - value_and_grad(jax.tree.map(lambda a, b: jnp.asarray(np.asarray(a) - h * np.asarray(b)), params, d))[0])
    assert abs(an - float(fd) / (2 * h)) <= 1e-6 * max(1.0, abs(an))

"""Symmetry groups: nested products' solver settings, the float32 accuracy of the matrix-free vertical projection
far from balance, and the limits of deep linear chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from quotient_sgd.symmetry import Product, SymmetryError
from symmetry_cases import mlp_group, mlp_params


def _flat64(tree):
    return np.asarray(ravel_pytree(jax.tree.map(lambda x: np.asarray(x, np.float64), tree))[0])


# ----- nested products: one set of solver settings, the nested product's honoured ------------------------------------
def test_nested_product_keeps_its_solver_settings(x64):
    """A product nested alone in another gives the same canonical point: its settings (here a cap of 2 sweeps, far
    from convergence) were replaced by the outer product's defaults (500 sweeps)."""
    widths = (3, 5, 4, 2)
    base = mlp_group(widths, permutation=False)
    inner = Product(base.components, name="inner", sweeps=2)
    outer = Product([inner], name="outer")
    assert (outer.sweeps, outer.newton, outer.newton_iters, outer.dense_max) == (2, False, 40, 64)
    p = mlp_params(jax.random.key(0), widths, jnp.float64)
    p = base.act(base.sample(jax.random.key(1), p, scale=2.0), p)
    a, b, full = (_flat64(g.canonicalize(p)) for g in (inner, outer, base))
    assert np.linalg.norm(a - full) > 1e-6 * np.linalg.norm(full)  # two sweeps are not converged
    np.testing.assert_array_equal(a, b)


def test_nested_product_settings_merge_and_conflict():
    widths = (3, 5, 4, 2)
    comps = mlp_group(widths).components
    newton_inner = Product(comps[:2], name="a", newton=True, newton_iters=7)
    merged = Product([newton_inner, *comps[2:]], name="outer", dense_max=8)
    assert (merged.newton, merged.newton_iters, merged.dense_max, merged.sweeps) == (True, 7, 8, 500)
    assert Product([Product(comps, name="b")], newton=True).newton  # the outer value over a nested default
    assert Product([newton_inner, *comps[2:]], newton_iters=7).newton_iters == 7  # equal values agree
    with pytest.raises(SymmetryError, match=r"newton_iters=7 in the nested product 'a' conflicts with "
                                            r"newton_iters=9 in this product"):
        Product([newton_inner, *comps[2:]], newton_iters=9)
    with pytest.raises(SymmetryError, match=r"sweeps=4 in the nested product 'd' conflicts with sweeps=3 in the "
                                            r"nested product 'c'"):
        Product([Product(comps[:2], name="c", sweeps=3), Product(comps[2:], name="d", sweeps=4)])


# ----- the matrix-free (CG) vertical projection far from balance, float32 --------------------------------------------
def _exact_vertical(group, q64, v64):
    """``P_V v`` by a float64 least-squares solve on the materialised tangents at ``q64``."""
    T = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(q64)))
    c, *_ = np.linalg.lstsq(T.T, _flat64(v64), rcond=None)
    return T.T @ c, T


@pytest.mark.parametrize("seed", [2])
def test_cg_vertical_float32_far_from_balance(x64, seed):
    """A 32-64-64-10 ReLU MLP's rescale chain (128 generators, above ``dense_max``: solved by CG) moved by an element
    of scale 3 (normalised tangents' smallest singular value ~7e-4).  CG stopped on the normal equations' residual
    and left the float32 vertical part up to 9e-3 off the exact projection of the same float32 point (seed 2); the
    dense M-matrix path of the same chain is at 3e-6.  With refinement in parameter space: below 1e-4.  The
    horizontal part is orthogonal to every generator and the projection idempotent to the same accuracy."""
    widths = (32, 64, 64, 10)
    group = mlp_group(widths, permutation=False, translation=False)
    p = mlp_params(jax.random.key(seed), widths, jnp.float64)
    q32 = jax.tree.map(lambda x: x.astype(jnp.float32), group.act(group.sample(jax.random.key(100 + seed), p, 3.0), p))
    q64 = jax.tree.map(lambda x: x.astype(jnp.float64), q32)
    leaves, treedef = jax.tree.flatten(q64)
    keys = jax.random.split(jax.random.key(7 + seed), len(leaves))
    v64 = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves)])
    v32 = jax.tree.map(lambda x: x.astype(jnp.float32), v64)
    exact, T = _exact_vertical(group, q64, v64)
    got = _flat64(group.vertical(q32, v32))
    assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(exact)
    h = _flat64(v32) - got  # (horizontal = v - vertical)
    cos = np.abs(T @ h) / (np.linalg.norm(T, axis=1) * np.linalg.norm(_flat64(v64)))
    assert np.max(cos) <= 1e-5
    again = _flat64(group.vertical(q32, group.vertical(q32, v32)))
    assert np.linalg.norm(again - got) <= 1e-4 * np.linalg.norm(got)


# ----- deep linear chains: the canonical point in float32 far from balance; the limits -------------------------------
def _chain_mats(q, n_layers):
    return [np.asarray(q["layers"][i]["kernel"], np.float64) for i in range(n_layers)]


@pytest.mark.parametrize("widths,seed", [((8, 4, 4, 4, 8), 0)])
def test_gl_chain_canonical_point_float32_far_from_balance(x64, widths, seed):
    """A minimal deep linear chain moved by an element of scale 3 (condition number 8e3), in float32: the canonical
    point was computed by acting with the chain's elements, whose products multiplied the rounding by about
    cond^2: not balanced (``|W_l^T W_l - W_{l+1} W_{l+1}^T| / |M|`` 250) and 730% off the float64 canonical point
    of the same float32 parameters.  Now balanced to float32 rounding, and as close to the
    float64 point as the chain's function survives the float32 element (the end-to-end product of the point against
    the parameters')."""
    from symmetry_cases import deep_linear_group, deep_linear_params

    group = deep_linear_group(widths)
    n_layers = len(widths) - 1
    p = deep_linear_params(jax.random.key(seed), widths, jnp.float64)
    q32 = jax.tree.map(lambda x: x.astype(jnp.float32), group.act(group.sample(jax.random.key(50 + seed), p, 3.0), p))
    c32 = group.canonicalize(q32)
    c64 = group.canonicalize(jax.tree.map(lambda x: x.astype(jnp.float64), q32))
    m = np.linalg.multi_dot(_chain_mats(q32, n_layers))
    mats = _chain_mats(c32, n_layers)
    balance = max(np.linalg.norm(a.T @ a - b @ b.T) for a, b in zip(mats[:-1], mats[1:]))
    assert balance <= 1e-5 * np.linalg.norm(m)
    func = np.linalg.norm(np.linalg.multi_dot(mats) - m) / np.linalg.norm(m)
    err = np.linalg.norm(_flat64(c32) - _flat64(c64)) / np.linalg.norm(_flat64(c64))
    assert err <= 2 * func + 1e-5, (err, func)
    assert err <= 0.1


# ----- a logit translation far from balance: the canonical rows centred in float32 ------------------------------------
def test_translation_canonical_rows_centred_float32_far_from_balance(x64):
    """A 16-32-32-6 ReLU classifier (two rescales and the logit translation) moved by an element of scale 3: the
    canonical element's shifts are large against the centred rows they leave, and their float32 rounding left the
    point 1.3e-4 off the float64 canonical point of the same float32 parameters (row means ~1e-4 where the rows are
    centred), so canonicalize was not idempotent to better than 1.3e-4.  Both are now at the float32 rounding."""
    widths = (16, 32, 32, 6)
    group = mlp_group(widths, permutation=False)
    p = mlp_params(jax.random.key(1), widths, jnp.float64)
    q32 = jax.tree.map(lambda x: x.astype(jnp.float32), group.act(group.sample(jax.random.key(101), p, 3.0), p))
    c32 = group.canonicalize(q32)
    c64 = _flat64(group.canonicalize(jax.tree.map(lambda x: x.astype(jnp.float64), q32)))
    size = np.linalg.norm(c64)
    assert np.linalg.norm(_flat64(c32) - c64) <= 1e-5 * size
    assert np.linalg.norm(_flat64(group.canonicalize(c32)) - _flat64(c32)) <= 1e-5 * size
    last = np.asarray(c32["layers"][2]["kernel"], np.float64)
    assert np.max(np.abs(last.mean(axis=1))) <= 1e-6 * np.max(np.abs(last))

"""Probe of the symmetry groups and models: the mean-field MMD across dtypes, the GL canonical point where
singular values repeat, and further group identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.models import mmd


def test_mmd_of_particle_sets_of_different_dtypes_is_computed_in_their_common_dtype(x64):
    """Under strict dtype promotion a float32 and a float64 particle set (or an integer / bfloat16 one) failed with
    JAX's bare ``TypePromotionError``; both are now computed in their common floating dtype, with the value of the
    common-dtype computation, and a complex set is refused naming the argument."""
    rng = np.random.default_rng(0)
    p64, q64 = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    want = mmd(jnp.asarray(p64), jnp.asarray(q64))
    assert want.dtype == jnp.float64
    for p, q in [(jnp.asarray(p64, jnp.float32), jnp.asarray(q64)), (jnp.asarray(p64), jnp.asarray(q64, jnp.float32))]:
        got = mmd(p, q)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, mmd(jnp.asarray(p, jnp.float64), jnp.asarray(q, jnp.float64)), rtol=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # integers read as numbers
    ip, iq = jnp.asarray([[0, 1], [2, 3]], jnp.int32), jnp.asarray([[1.0, 1.0]], jnp.float32)
    np.testing.assert_allclose(mmd(ip, iq), mmd(jnp.asarray(ip, jnp.float32), iq), rtol=1e-6)
    assert mmd(ip, ip).dtype == jnp.float64 and float(mmd(ip, ip)) == 0.0
    # array-likes (nested lists) too
    np.testing.assert_allclose(mmd(p64.tolist(), q64.tolist()), want, rtol=1e-12)
    with pytest.raises(TypeError, match="mmd: q has dtype complex64"):
        mmd(jnp.asarray(p64, jnp.float32), jnp.asarray(q64, jnp.complex64))


def _cast(tree, dtype):
    """``tree`` with every leaf cast to ``dtype``, in NumPy (an eager ``astype`` compiles a program per shape)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(dtype)), tree)


def _orthonormal(rng, shape, scales):
    """A ``(..., m, d)`` stack of matrices with orthonormal columns scaled by ``sqrt(scales)``."""
    q, _ = np.linalg.qr(rng.normal(size=shape))
    return q * np.sqrt(np.asarray(scales))


def _tree_err(a, b):
    """The largest entry of ``|a - b|`` over whole trees, in NumPy (eager ``jnp`` would compile each operation)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-10), (jnp.float32, 3e-5)])
def test_gl_canonical_point_is_unique_where_singular_values_repeat(x64, dtype, tol):
    """Heads whose ``M = L R~^T`` has repeated singular values (orthonormal factors: all equal; or two of three
    equal): an SVD returns their singular vectors in any basis of the subspace, and the canonical point took that
    basis as it came, so canonicalize(g.params) differed from canonicalize(params) by O(1) (1.4-1.5 in float64 on
    a 5x3 / 4x3 pair, 1.6-2.3 in float32) and canonicalize was not idempotent (1.4).  Now the basis is fixed from the
    subspace: constant on the orbit, idempotent, balanced and the same function (the same M), to rounding."""
    from quotient_sgd.symmetry import GL

    rng = np.random.default_rng(0)
    # per head (the stacked factors [W; b] with zero biases are the scaled orthonormal kernels): singular values
    # all 1, (3, 1, 1), (2, 2, 1), and one generic head
    heads = [(1, 1, 1), (3, 1, 1), (2, 2, 1)]
    q = np.stack([_orthonormal(rng, (6, 3), s) for s in heads] + [rng.normal(size=(6, 3))])
    k = np.stack([_orthonormal(rng, (6, 3), s) for s in heads] + [rng.normal(size=(6, 3))])
    bq, bk = np.zeros((4, 3)), np.zeros((4, 3))
    bq[3], bk[3] = rng.normal(size=3), rng.normal(size=3)
    p = jax.tree.map(lambda x: jnp.asarray(x, dtype), {"q": {"kernel": q, "bias": bq}, "k": {"kernel": k, "bias": bk}})
    group = GL(left=(("q", "kernel"), ("q", "bias")), right=(("k", "kernel"), ("k", "bias")), kind="qk")
    c = group.canonicalize(p)
    assert _tree_err(group.canonicalize(c), c) < tol
    assert _tree_err(group.invariants(c), group.invariants(p)) < 10 * tol  # the same M per head
    assert float(np.max(np.abs(np.asarray(group.charges(c))))) < 10 * tol  # balanced: zero charge
    for seed in range(3):
        g = group.sample(jax.random.key(seed), p, scale=0.5)
        assert _tree_err(group.canonicalize(group.act(g, p)), c) < 10 * tol, seed


def test_deep_linear_canonical_point_is_unique_where_singular_values_repeat(x64):
    """The same for a minimal deep linear chain (5-3-3-4) with orthonormal outer factors and an identity inner
    one (end-to-end singular values 1, 1, 1): the chain's canonical point depended on the SVD's basis."""
    from flax import nnx

    from quotient_sgd.models import DeepLinear

    rng = np.random.default_rng(1)
    model = DeepLinear(5, (3, 3), 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    group = model.symmetries()
    _, params = nnx.split(model, nnx.Param)
    mats = [_orthonormal(rng, (5, 3), (1, 1, 1)), np.eye(3), _orthonormal(rng, (4, 3), (1, 1, 1)).T]
    params = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(m) for m in mats])
    c = group.canonicalize(params)
    assert _tree_err(group.canonicalize(c), c) < 1e-10
    for seed in range(3):
        g = group.sample(jax.random.key(seed), params, scale=0.5)
        assert _tree_err(group.canonicalize(group.act(g, params)), c) < 1e-9, seed


def _grad_and_difference(f, params, seed, h):
    """``(<grad f, d>, central difference of f along d)`` for a fixed random direction ``d``."""
    leaves, tdef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    ds = [jnp.asarray(rng.normal(size=x.shape)) for x in leaves]
    g = jax.tree.leaves(jax.grad(f)(params))
    ana = sum(float(np.sum(np.asarray(a) * np.asarray(d))) for a, d in zip(g, ds))

    def at(t):
        return f(jax.tree.unflatten(tdef, [x + t * d for x, d in zip(leaves, ds)]))

    return ana, float((at(h) - at(-h)) / (2 * h))


@pytest.mark.parametrize("svals", [(1.0, 1.0, 1.0), (4.0, 1.0, 1.0), (3.0, 2.0, 1.0)])
def test_grad_of_canonical_points_where_singular_values_repeat_is_the_finite_difference(x64, svals):
    """jax.grad through the SVD divides by singular-value gaps: where they repeat the gradient of a canonical point
    was garbage or NaN (a GL pair with values (2, 1, 1): NaN; a deep linear chain with an orthonormal first factor,
    whose least-squares solve went through that factor's SVD: NaN, or 1.13 for a central difference of 0.049).  The
    canonical points are differentiated in closed form now; the central difference is taken with a step that keeps
    equal values within one cluster (1e-9; 1e-5 at distinct values)."""
    from flax import nnx

    from quotient_sgd.models import DeepLinear
    from quotient_sgd.symmetry import GL

    rng = np.random.default_rng(2)
    h = 1e-9 if len(set(svals)) < 3 else 1e-5
    pair = GL(left=(("l",), None), right=(("r",), None), kind="vo")
    p = {"l": jnp.asarray(_orthonormal(rng, (5, 3), svals)), "r": jnp.asarray(_orthonormal(rng, (4, 3), svals).T)}
    w = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), p)

    def f_pair(q):
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(pair.canonicalize(q)), jax.tree.leaves(w)))

    ana, fd = _grad_and_difference(f_pair, p, 0, h)
    assert abs(ana - fd) <= 1e-5 * (1 + abs(fd)), (ana, fd)

    model = DeepLinear(5, (3, 3), 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    group = model.symmetries()
    _, params = nnx.split(model, nnx.Param)
    # the first factor orthonormal (repeated singular values) in every case; the end-to-end values are svals
    mats = [_orthonormal(rng, (5, 3), (1, 1, 1)), np.diag(svals), _orthonormal(rng, (4, 3), (1, 1, 1)).T]
    params = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(m) for m in mats])
    wc = [jnp.asarray(rng.normal(size=m.shape)) for m in mats]

    def f_chain(q):
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(group.canonicalize(q)), wc))

    ana, fd = _grad_and_difference(f_chain, params, 1, h)
    assert abs(ana - fd) <= 1e-5 * (1 + abs(fd)), (ana, fd)


def test_vertical_and_horizontal_take_a_vector_of_another_dtype(x64):
    """A float64 vector (a gradient computed in float64) on float32 parameters, or the reverse, failed under strict
    promotion with JAX's bare ``TypePromotionError``, and so did an integer vector.  ``v`` is now projected in the
    parameters' dtypes and returned in its own floating dtype (integer leaves: the parameters'); a complex ``v`` is
    refused naming the argument and the leaf."""
    from flax import nnx

    from quotient_sgd.models import MLP

    model = MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    group = model.symmetries()
    _, p32, _ = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    v32 = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p32)
    want = group.horizontal(p32, v32)
    got = group.horizontal(p32, _cast(v32, np.float64))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the reverse: float64 parameters, float32 vector, projected in float64 (horizontal: orthogonal to the tangents)
    p64 = _cast(p32, np.float64)
    h = group.horizontal(p64, v32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(h))
    tangents = group.tangents(p64)
    dots = sum(np.sum(np.asarray(t) * np.asarray(x, np.float64)[None], axis=tuple(range(1, t.ndim)))
               for t, x in zip(jax.tree.leaves(tangents), jax.tree.leaves(h)))
    assert float(np.max(np.abs(dots))) < 1e-6
    vi = jax.tree.map(lambda x: jnp.asarray(np.ones(x.shape, np.int32)), p32)
    vert = group.vertical(p32, vi)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(vert))
    ones = jax.tree.map(lambda x: jnp.asarray(np.ones(x.shape, np.float32)), p32)
    for a, b in zip(jax.tree.leaves(vert), jax.tree.leaves(group.vertical(p32, ones))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"horizontal: v has dtype complex64 at \('layers', 0, 'bias'\)"):
        group.horizontal(p32, _cast(v32, np.complex64))


def test_particles_and_moments_of_mixed_or_integer_dtypes(x64):
    """``particles`` of float32 weights with a float64 bias, and ``particle_moments`` of integer particles, failed
    under strict promotion (``TypePromotionError`` in the concatenation / the division by n); they are computed in
    the common floating dtype now, with the values of that computation."""
    from quotient_sgd.models import particle_moments, particles

    rng = np.random.default_rng(0)
    p64 = {"w_in": rng.normal(size=(4, 2)), "b": rng.normal(size=(4,)), "w_out": rng.normal(size=(4, 3))}
    mixed = {k: jnp.asarray(v, jnp.float64 if k == "b" else jnp.float32) for k, v in p64.items()}
    same = {k: jnp.asarray(v, jnp.float64) for k, v in mixed.items()}
    for balanced in (False, True):
        got = particles(mixed, balanced=balanced)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(got, particles(same, balanced=balanced))
    ints = jnp.asarray([[0, 1], [2, 3], [4, 6]], jnp.int32)
    mom = particle_moments(ints)
    want = particle_moments(ints.astype(jnp.float64))
    for k in want:
        assert mom[k].dtype == jnp.float64
        np.testing.assert_array_equal(mom[k], want[k])


def test_act_reads_an_element_of_another_float_width_in_the_parameters_dtypes(x64):
    """An element sampled at float64 parameters applied to float32 ones (or the reverse) failed under strict
    promotion with JAX's bare ``TypePromotionError`` for a GL action (attention heads) and a logit translation,
    while a rescale's or a scale's element was read in the parameters' dtype; every action now reads it so: the
    result has the parameters' dtypes and equals acting with the element cast to them."""
    from symmetry_cases import attention_group, attention_params, mlp_group, mlp_params

    cases = [(attention_group().component("qk"), attention_params(jax.random.key(0), 4, 2, 2, jnp.float64)),
             (mlp_group((3, 4, 2), rescale=False, permutation=False),
              mlp_params(jax.random.key(1), (3, 4, 2), jnp.float64))]
    for group, p64 in cases:
        p32 = _cast(p64, np.float32)
        for p_from, p_to in ((p64, p32), (p32, p64)):
            g = group.sample(jax.random.key(2), p_from)
            got = group.act(g, p_to)
            g_cast = jax.tree.map(lambda e, t: jnp.asarray(np.asarray(e).astype(t.dtype)), g,
                                  group.sample(jax.random.key(2), p_to))
            want = group.act(g_cast, p_to)
            for a, b, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(p_to)):
                assert a.dtype == x.dtype
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

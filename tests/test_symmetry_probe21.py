"""Symmetry groups on models and sizes the other tests do not use: the vertical projection of a LayerNorm CNN's
overlapping (rescale, whole-block scale) cluster in float32 far from balance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quotient_sgd.models import CNN


def _vec(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_layernorm_cnn_float32_projection_far_from_balance(x64):
    """A two-layer CNN with norm='layer' has a cluster of the rescale between the first norm's (scale, bias) and the
    second conv's input channels and the scale of that conv's whole (kernel, bias) block: they share the kernel.
    That cluster was projected by an eigendecomposition of its Gram matrix, which drops directions far from balance:
    float32 parameters moved by an element of scale 3 gave a vertical part 9.4% of |v| off the exact projection
    (3 of 16 samples above 1e-3 on a (4, 8) CNN, up to 5.6%).  Reference: least squares on the float64 tangent
    matrix of the same float32 numbers (numpy, independent of the package's solvers)."""
    model = CNN(2, (3, 3), 3, norm="layer", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    _, p64, _ = nnx.split(model, nnx.Param, ...)
    G = model.symmetries()
    names = [tuple(G.components[i].name for i in cl) for cl in G.continuous_clusters()]
    assert ("rescale/norms.0", "scale/convs.1") in names  # the overlapping cluster this test is about
    g = G.sample(jax.random.key(0), p64, 3.0)
    q32 = jax.tree.map(lambda a: a.astype(jnp.float32), G.act(g, p64))
    q64 = jax.tree.map(lambda a: a.astype(jnp.float64), q32)  # the same numbers, in float64
    v32 = jax.tree.map(lambda a: jax.random.normal(jax.random.key(100), a.shape, jnp.float32), q32)
    v = _vec(v32)

    tangents = G.tangents(q64)  # leading axis: the generators
    J = np.concatenate([np.asarray(t, np.float64).reshape(t.shape[0], -1) for t in jax.tree.leaves(tangents)],
                       axis=1).T
    coef = np.linalg.lstsq(J, v, rcond=None)[0]
    exact = J @ coef
    got = _vec(G.vertical(q32, v32))
    assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(v), np.linalg.norm(got - exact) / np.linalg.norm(v)


def test_permutation_refuses_an_array_axis_listed_twice(x64):
    """A permutation listing the same axis of an array twice (a tied weight listed once per role, or axis 1 and -1 of
    a matrix) reordered it twice: the action of sigma was sigma o sigma, the group law failed (2.45 on a 5 x 3
    matrix) and a transposition moved nothing.  Refused naming the member; a recurrent matrix (two different axes)
    is still a member along both, and its action obeys the group law."""
    import pytest

    from quotient_sgd.symmetry import Permutation, SymmetryError

    rng = np.random.default_rng(0)
    p = {"W": jnp.asarray(rng.standard_normal((5, 5))), "U": jnp.asarray(rng.standard_normal((3, 5)))}
    twice = (((("W",), 0), (("W",), 0)), ((("U",), 1), (("W",), 1), (("U",), -1)), ((("W",), 0), (("W",), -2)))
    for members in twice:
        dup = Permutation(members, name="dup")
        with pytest.raises(SymmetryError, match=r"dup.*listed twice"):
            dup.sample(jax.random.key(0), p)
        with pytest.raises(SymmetryError, match=r"dup.*listed twice"):
            dup.act(jnp.arange(5, dtype=jnp.int32), p)
    rec = Permutation(((("W",), 0), (("W",), 1), (("U",), 1)), name="recurrent")
    g, h = rec.sample(jax.random.key(1), p), rec.sample(jax.random.key(2), p)
    lhs, rhs = rec.act(g, rec.act(h, p)), rec.act(rec.compose(g, h), p)
    for k in p:  # exactly: entries move without arithmetic
        np.testing.assert_array_equal(lhs[k], rhs[k])
        np.testing.assert_array_equal(rec.act(rec.inverse(g), rec.act(g, p))[k], p[k])
    # sigma . W reorders rows and columns: entry (i, j) of the moved matrix is W[g[i], g[j]]
    np.testing.assert_array_equal(rec.act(g, p)["W"], np.asarray(p["W"])[np.ix_(np.asarray(g), np.asarray(g))])


def test_gl_refuses_a_parameter_named_on_both_sides():
    """A GL whose two factors name one parameter (left = right = (W, None)) acted as W -> W A^-T alone (act wrote the
    array twice, the second write discarding the first), not as the declared pair of actions: refused naming the
    path; distinct factors are accepted."""
    import pytest

    from quotient_sgd.symmetry import GL, SymmetryError

    for left, right, kind in (((("W",), None), (("W",), None), "qk"), ((("W",), ("b",)), (("V",), ("b",)), "qk"),
                              ((("W",), None), (("V",), ("V",)), "qk"), ((("W",), ("W",)), (("V",), None), "vo")):
        with pytest.raises(SymmetryError, match=r"'g'.*named more than once"):
            GL(left, right, kind=kind, name="g")
    GL((("W",), ("b",)), (("V",), ("c",)), kind="qk", name="g")


def test_rescale_tangents_are_the_derivative_of_act_where_an_array_is_incoming_twice(x64):
    """A rescale whose incoming side names one array twice (on one axis: factor a^2; on both axes of a square
    matrix: a_i a_j) had tangents built from the last listing alone (0.70 off the derivative of act), so vertical
    did not keep the orbit's own tangents (0.58 off).  Now the tangents are the Jacobian of act (forward-mode
    autodiff), vertical keeps them, and the canonical point is constant on the orbit."""
    from quotient_sgd.symmetry import Rescale

    rng = np.random.default_rng(0)
    p = {"A": jnp.asarray(rng.standard_normal((4, 4))), "C": jnp.asarray(rng.standard_normal((4, 5)))}
    for incoming in (((("A",), 1), (("A",), 1)), ((("A",), 0), (("A",), 1))):
        R = Rescale(incoming, ((("C",), 0),), name="twice")
        T = R.tangents(p)
        J = jax.jacfwd(lambda x, R=R: R.act(x, p))(jnp.zeros((4,), jnp.float64))
        for k in p:
            np.testing.assert_allclose(T[k], jnp.moveaxis(J[k], -1, 0), atol=1e-12)
        t = jax.tree.map(lambda a: a[2], T)
        v = R.vertical(p, t)
        for k in p:
            np.testing.assert_allclose(v[k], t[k], atol=1e-12)
        q = R.act(R.sample(jax.random.key(1), p), p)
        c, cq = R.canonicalize(p), R.canonicalize(q)
        for k in p:
            np.testing.assert_allclose(cq[k], c[k], atol=1e-10)


def test_scale_refuses_an_array_listed_twice():
    """A scale listing one array twice multiplied it by c^2 while its closed forms read it once: a block listed twice
    canonicalised to a point whose own canonical point was the start again (1.19 off).  Refused naming the member."""
    import pytest

    from quotient_sgd.symmetry import Scale, SymmetryError

    p = {"A": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    for members in (((("A",), None), (("b",), None), (("A",), None)), ((("A",), 1), (("A",), -1))):
        with pytest.raises(SymmetryError, match=r"'twice'.*\('A',\) is listed 2 times"):
            Scale(members, name="twice").canonicalize(p)

"""Vertical projections at badly conditioned points, in float32 (THEORY section 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.symmetry import GL, Product


def _gl_vertical_reference(L, R, uL, uR):
    """``P_V u`` in float64 NumPy for ``L -> L A``, ``R -> R A^{-T}`` (one head): the tangents ``(L E_ij, -R E_ji)``
    materialised column by column, then least squares."""
    L, R, uL, uR = (np.asarray(x, np.float64) for x in (L, R, uL, uR))
    d = L.shape[1]
    cols = []
    for i in range(d):
        for j in range(d):
            E = np.zeros((d, d))
            E[i, j] = 1
            cols.append(np.concatenate([(L @ E).ravel(), (-R @ E.T).ravel()]))
    J = np.stack(cols, axis=1)
    u = np.concatenate([uL.ravel(), uR.ravel()])
    return J @ np.linalg.lstsq(J, u, rcond=None)[0], u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gl_vertical_float32_at_unbalanced_heads(seed):
    """The heads' Sylvester solve took its eigenbases from float32 ``eigh`` of the Gram matrices ``L^T L``, which
    squares the condition number: after a GL element of condition number ``e^7.5`` (``sample(scale=2.5)``) a
    Gram matrix's computed smallest eigenvalue was negative where the true one is ``1e-5``, that direction was
    dropped and the vertical part was up to 7% of ``|v|`` off the least-squares projection, refinement or not.
    From the SVDs of the factors it is within float32 rounding times the condition number of the tangents."""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
    params = {"q": jax.random.normal(k1, (2, 5, 4)), "k": jax.random.normal(k2, (2, 5, 4))}
    v = {"q": jax.random.normal(k3, (2, 5, 4)), "k": jax.random.normal(k4, (2, 5, 4))}
    gl = GL(left=(("q",), None), right=(("k",), None), kind="qk", name="qk")
    point = gl.act(gl.sample(k5, params, 2.5), params)
    for group in (gl, Product([gl])):
        got = group.vertical(point, v)
        assert got["q"].dtype == jnp.float32
        for h in range(2):
            ref, u = _gl_vertical_reference(point["q"][h], point["k"][h], v["q"][h], v["k"][h])
            out = np.concatenate([np.ravel(got["q"][h]), np.ravel(got["k"][h])]).astype(np.float64)
            assert np.linalg.norm(out - ref) / np.linalg.norm(u) < 1e-4


def test_product_act_names_a_bad_element():
    """An element that is not a Word failed with ``AttributeError: ... no attribute 'indices'``, a Word naming a
    component the group does not have with a bare ``IndexError``."""
    from quotient_sgd.symmetry import Rescale, Word

    params = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2))}
    group = Product([Rescale(incoming=((("a",), 1),), outgoing=((("b",), 0),), name="r")], name="net")
    with pytest.raises(TypeError, match="Product 'net': an element must be a Word"):
        group.act(jnp.zeros(3), params)
    with pytest.raises(ValueError, match=r"Product 'net': the Word names components \[1\] with 1 elements; this "
                                         r"group has components 0..0 \(\['r'\]\)"):
        group.act(Word((1,), (jnp.zeros(3),)), params)
    out = group.act(Word((0,), (jnp.log(jnp.asarray([1.0, 2.0, 4.0])),)), params)
    assert jnp.array_equal(out["a"][0], jnp.asarray([1.0, 2.0, 4.0]))


def test_mlp_and_deep_linear_name_a_wrong_input_width():
    """A wrong feature count failed inside the first matrix product with JAX's ``dot_general requires contracting
    dimensions to have the same shape`` (also from ``verify``), naming neither the model nor ``din``."""
    from flax import nnx

    from quotient_sgd import models

    mlp = models.MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    deep = models.DeepLinear(3, (4,), 2, rngs=nnx.Rngs(0))
    for model, name in ((mlp, "MLP"), (deep, "DeepLinear")):
        with pytest.raises(ValueError, match=rf"{name}: x must have din=3 features on its last axis, \(\.\.\., 3\), "
                                             rf"got shape \(2, 5\)"):
            model(jnp.ones((2, 5)))
        assert model(jnp.ones((2, 3))).shape == (2, 2)
        assert model(jnp.ones((3,))).shape == (2,)  # one example without a batch axis still works


def test_sgdspec_refuses_values_that_are_not_hyperparameters():
    """``SGDSpec(None)``, ``SGDSpec(0.1, momentum=True)`` or ``nesterov="yes"`` were accepted and failed (or ran
    the wrong recursion) only inside the first traced step; a NumPy scalar below 0 passed the range check."""
    from quotient_sgd.optim import SGDSpec

    with pytest.raises(TypeError, match="SGDSpec: learning_rate=None is not allowed"):
        SGDSpec(None)
    with pytest.raises(TypeError, match="SGDSpec: momentum=True is not allowed"):
        SGDSpec(0.1, momentum=True)
    with pytest.raises(TypeError, match="SGDSpec: nesterov must be True or False"):
        SGDSpec(0.1, nesterov="yes")
    with pytest.raises(ValueError, match="SGDSpec: weight_decay=.*-0.5.* is not allowed"):
        SGDSpec(0.1, weight_decay=np.float32(-0.5))
    for ok in (0.1, np.float32(0.1), jnp.asarray(0.1), "learning_rate", lambda c: 0.1):
        assert SGDSpec(ok).learning_rate is ok
    assert SGDSpec(0.1, nesterov=np.bool_(True)).nesterov


def test_low_precision_sample_and_act_fast():
    """The fast variant of the next test: a bfloat16 Transformer's group element (its QR failed) moves the
    parameters in bfloat16 exactly as the float32 computation rounded to bfloat16."""
    from flax import nnx

    from quotient_sgd.models import Transformer

    m = Transformer(11, 16, 2, 1, 9, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    G, p = m.symmetries(), nnx.state(m, nnx.Param)
    g = G.sample(jax.random.key(1), p, scale=0.5)
    # (the casts and the bound in NumPy: an eager astype / max compiles a program per shape)
    got, want = G.act(g, p), G.act(g, jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(np.float32)), p))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.bfloat16
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a, np.float32), b.astype(jnp.bfloat16).astype(np.float32),
                                   rtol=1e-2, atol=1e-2 * float(np.max(np.abs(b))))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transformer", "cnn"])
def test_low_precision_parameters_are_computed_in_float32(model):
    """bfloat16 parameters (XLA:CPU has no bfloat16 QR / SVD / eigh): the group's public methods and
    ``quotient_distance`` compute in float32 and return what is like the parameters in bfloat16, equal to the
    float32 computation on the same values rounded to bfloat16; ``sample`` failed in its QR, ``quotient_distance``
    in an SVD."""
    from flax import nnx

    from quotient_sgd.models import CNN, Transformer
    from quotient_sgd.symmetry import quotient_distance

    def make(dt):
        if model == "transformer":
            return Transformer(11, 16, 2, 1, 9, rngs=nnx.Rngs(0), param_dtype=dt)
        return CNN(3, (4, 6), 5, rngs=nnx.Rngs(0), param_dtype=dt)

    m = make(jnp.bfloat16)
    G, p = m.symmetries(), nnx.state(m, nnx.Param)
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    g = G.sample(jax.random.key(1), p, scale=0.5)
    assert all(x.dtype != jnp.bfloat16 for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.floating))
    v = jax.tree.map(lambda x: jnp.ones_like(x), p)
    for name, got, want in (("act", G.act(g, p), G.act(g, p32)), ("canonicalize", G.canonicalize(p),
                                                                  G.canonicalize(p32)),
                            ("horizontal", G.horizontal(p, v), G.horizontal(p32, jax.tree.map(
                                lambda x: x.astype(jnp.float32), v)))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == jnp.bfloat16, name
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32),
                                       rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(b))), err_msg=name)
    for a, b in zip(jax.tree.leaves(G.invariants(p)), jax.tree.leaves(G.invariants(p32))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    gp = G.act(g, p)
    moved = float(jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
                               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(gp)))))
    assert float(quotient_distance(G, p, gp)) < 0.2 * moved  # bfloat16 rounding of g.p, not the orbit distance


def test_transformer_refuses_tokens_outside_the_vocabulary():
    """A token ``>= vocab_size`` made every output NaN (the embedding lookup fills it with NaN and attention spreads
    it to every position), a negative one silently read the last embedding row.  Concrete tokens are checked;
    traced ones still run."""
    from flax import nnx

    from quotient_sgd.models import Transformer

    m = Transformer(3, 4, 2, 1, 4, rngs=nnx.Rngs(0))
    for bad, lo, hi in (([[0, 1, 3]], 0, 3), ([[0, -1, 2]], -1, 2)):
        with pytest.raises(ValueError, match=rf"Transformer: tokens must be integers in \[0, vocab_size=3\), got "
                                             rf"values from {lo} to {hi}"):
            m(jnp.asarray(bad, jnp.int32))
    y = nnx.jit(lambda mm, t: mm(t))(m, jnp.asarray([[0, 1, 2]], jnp.int32))  # traced tokens: not checked
    assert y.shape == (1, 3, 3) and bool(jnp.all(jnp.isfinite(y)))
    # concrete tokens closed over by a jitted function: checked with NumPy (jnp.min there is traced: int() failed)
    graphdef, params = nnx.split(m)
    tokens = jnp.asarray([[0, 1, 2]], jnp.int32)
    np.testing.assert_allclose(jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))(params), y, rtol=1e-6)
    bad = jnp.asarray([[0, 1, 3]], jnp.int32)
    with pytest.raises(ValueError, match="got values from 0 to 3"):
        jax.jit(lambda p: nnx.merge(graphdef, p)(bad))(params)


def test_meanfield_names_a_wrong_input_width():
    """A wrong feature count failed inside the matrix product with JAX's ``dot_general requires contracting
    dimensions to have the same shape``, naming neither the model nor ``din``."""
    from flax import nnx

    from quotient_sgd.models import MeanField

    m = MeanField(3, 5, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MeanField: x must have din=3 features on its last axis, \(\.\.\., 3\), "
                                         r"got shape \(6, 2\)"):
        m(jnp.ones((6, 2)))
    assert m(jnp.ones((6, 3))).shape == (6, 2)
    assert m(jnp.ones((3,))).shape == (2,)


def test_quotient_distance_and_align_name_themselves_without_a_canonical_section():
    """A deep linear chain that is not minimal has no canonical representative; align / quotient_distance, which
    canonicalise both points first, raised the canonicalisation's own error ('canonicalize: ...'), naming neither
    themselves nor why they canonicalise."""
    from flax import nnx

    from quotient_sgd.models import DeepLinear
    from quotient_sgd.symmetry import align, quotient_distance, SymmetryError

    m = DeepLinear(2, (3,), 2, rngs=nnx.Rngs(0))
    G, p = m.symmetries(), nnx.split(m, nnx.Param)[1]
    for fn, name in ((quotient_distance, "quotient_distance"), (align, "align")):
        with pytest.raises(SymmetryError, match=rf"^{name}: both points are canonicalised first .* The group says: "
                                                r"canonicalize:"):
            fn(G, p, p)


def test_quotient_distance_canonical_is_a_function_of_the_orbits():
    """The plain quotient_distance is point-to-orbit (symmetrised): moving an argument along its orbit changes
    it, since rescales are not isometries.  ``canonical=True`` compares the canonical representatives: unchanged
    when both arguments are moved by random elements (rescales and permutations), zero on one orbit, never larger
    than the distance between the canonical points."""
    from quotient_sgd.models import MLP
    from quotient_sgd.symmetry import quotient_distance

    model = MLP(3, (6,), 2, rngs=nnx.Rngs(0))
    G = model.symmetries()
    a = nnx.state(model, nnx.Param)
    b = nnx.state(MLP(3, (6,), 2, rngs=nnx.Rngs(1)), nnx.Param)
    ga = G.act(G.sample(jax.random.key(2), a), a)
    gb = G.act(G.sample(jax.random.key(3), b), b)
    qd = jax.jit(lambda p, q: quotient_distance(G, p, q, canonical=True))
    d0 = float(qd(a, b))
    assert float(qd(ga, gb)) == pytest.approx(d0, rel=1e-4)
    gap = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), G.canonicalize(a), G.canonicalize(b))
    assert 0.1 < d0 <= float(np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(gap)))) * (1 + 1e-6)
    assert float(qd(a, ga)) < 1e-4 * d0
    plain = jax.jit(lambda p, q: quotient_distance(G, p, q))
    assert abs(float(plain(ga, gb)) / float(plain(a, b)) - 1) > 1e-3  # the plain one does depend on the points
    with pytest.raises(ValueError, match="canonical=1"):
        quotient_distance(G, a, b, canonical=1)

"""Probe of the symmetry groups: self-overlapping rescales (a recurrent matrix), and further group identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from helpers import dot_precisions
from quotient_sgd.symmetry import Permutation, Product, Rescale


def _sqnorm(p) -> float:
    """The squared norm of a dict of arrays, in NumPy (eager ``jnp`` would compile each of its operations)."""
    return float(sum(np.sum(np.square(np.asarray(x))) for x in p.values()))


def _cast(dtype, tree):
    """``tree`` with every leaf cast to ``dtype``, in NumPy (an eager ``astype`` compiles a program per shape)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(jnp.dtype(dtype))), tree)


def _rel(a, b):
    a, b = (jax.tree.map(lambda x: np.asarray(x, np.float64), t) for t in (a, b))
    err = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return err / max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))


def _rnn(dtype, seed=1, n=5, din=3, dout=2):
    rng = np.random.default_rng(seed)
    return {"U": jnp.asarray(rng.normal(size=(din, n)), dtype), "W": jnp.asarray(rng.normal(size=(n, n)) / 2, dtype),
            "b": jnp.asarray(rng.normal(size=(n,)), dtype), "V": jnp.asarray(rng.normal(size=(n, dout)), dtype)}


def _rnn_apply(p, xs):
    h = jnp.zeros((xs.shape[1], p["W"].shape[0]), p["W"].dtype)
    for x in xs:
        h = jax.nn.relu(h @ p["W"] + x @ p["U"] + p["b"][None, :])
    return h @ p["V"]


#: the hidden units of a ReLU recurrent network: W -> diag(1/a) W diag(a), (U, b) -> (U, b) diag(a), V -> diag(1/a) V
RNN_RESCALE = Rescale(incoming=(("U", 1), ("W", 1), ("b", 0)), outgoing=(("W", 0), ("V", 0)), name="rescale/rnn")
RNN_PERM = Permutation(members=(("U", 1), ("W", 0), ("W", 1), ("b", 0), ("V", 0)), name="perm/rnn")


def test_self_overlapping_rescale_canonicalizes_to_the_balanced_point_of_the_orbit(x64):
    """A rescale whose recurrent matrix is both incoming and outgoing (entries move by a_j / a_i): the canonical
    element was the per-unit closed form, which ignores that one unit's factor changes the others' norms, so
    canonicalize(g . p) differed from canonicalize(p) by 0.38 (relative, float64), canonicalize was not idempotent
    (0.06), and the invariants |in_j| |out_j| changed by 2.7 under a random element.  Now: the minimum-norm
    (balanced) point of the orbit, for the lone rescale and in a product with the units' permutation."""
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 3)))
    p = _rnn(jnp.float64)
    for G in (RNN_RESCALE, Product([RNN_RESCALE, RNN_PERM])):
        gp = G.act(G.sample(jax.random.key(0), p, scale=1.5), p)
        assert _rel(_rnn_apply(gp, xs), _rnn_apply(p, xs)) < 1e-12  # (the declaration is a symmetry)
        c = G.canonicalize(p)
        assert _rel(G.canonicalize(gp), c) < 1e-12
        assert _rel(G.canonicalize(c), c) < 1e-12
        assert _rel(G.invariants(gp), G.invariants(p)) < 1e-12
        assert _rel(_rnn_apply(c, xs), _rnn_apply(p, xs)) < 1e-12
    # balanced: every unit's charge 1/2 (|in_j|^2 - |out_j|^2) vanishes at the canonical point
    charges = RNN_RESCALE.charges(RNN_RESCALE.canonicalize(p))
    assert float(np.max(np.abs(np.asarray(charges)))) < 1e-12 * _sqnorm(p)


def test_self_overlapping_rescale_canonical_point_is_the_minimum_norm_point_and_differentiable(x64):
    """The canonical point of the recurrent rescale is no longer than any other point of the orbit, and jax.grad
    through canonicalize / invariants (implicit differentiation at the minimum) is the central difference."""
    p = _rnn(jnp.float64, seed=3)
    c = RNN_RESCALE.canonicalize(p)
    norm = _sqnorm(c)
    for seed in range(4):
        moved = RNN_RESCALE.act(RNN_RESCALE.sample(jax.random.key(seed), c, scale=0.05), c)
        assert norm <= _sqnorm(moved) * (1 + 1e-12)
    vec, unravel = ravel_pytree(p)
    rng = np.random.default_rng(4)
    d = jnp.asarray(rng.normal(size=vec.shape))
    for fn in (RNN_RESCALE.canonicalize,):
        w = jnp.asarray(rng.normal(size=ravel_pytree(fn(p))[0].shape))

        def f(v, fn=fn, w=w):
            return jnp.sum(ravel_pytree(fn(unravel(v)))[0] * w)

        h = 1e-5
        fd = (f(vec + h * d) - f(vec - h * d)) / (2 * h)
        np.testing.assert_allclose(jnp.dot(jax.grad(f)(vec), d), fd, rtol=1e-7)


def test_verify_fails_a_broken_permutation_of_two_units_for_every_key():
    """A permutation of two hidden units that leaves their biases in place is not a symmetry, but a random
    permutation of two units is the identity half of the time, which moves nothing: verify passed it for 15 of 40
    keys (num_samples=1), 4 of 40 as a product's component.  Identity draws are replaced by a cyclic shift now."""
    from flax import nnx

    from quotient_sgd.models import MLP
    from quotient_sgd.symmetry import SymmetryError, verify

    model = MLP(3, (2,), 2, rngs=nnx.Rngs(0))
    model.layers[0].bias[...] = jnp.asarray([0.5, -0.7])
    broken = Permutation(members=((("layers", 0, "kernel"), 1), (("layers", 1, "kernel"), 0)), name="perm-no-bias")
    x = jax.random.normal(jax.random.key(0), (5, 3))
    for group in (broken, Product([broken])):
        for seed in range(3):
            with pytest.raises(SymmetryError, match="perm-no-bias"):
                verify(model, group, x, jax.random.key(seed), num_samples=1)
    # the declared permutation (biases included) still passes
    assert verify(model, model.symmetries(), x, jax.random.key(0), num_samples=1) < 1e-5


def test_vertical_generic_reads_v_as_vertical_does(x64):
    """vertical_generic, the reference the closed forms must match, took v as it came: a float64 vector for
    float32 parameters (or integers) failed with JAX's bare TypePromotionError under strict promotion, and a v
    missing a leaf with a bare KeyError, where group.vertical projects the first and names the second.  Now it
    reads v as vertical does and agrees with it."""
    from quotient_sgd.symmetry import vertical_generic

    rng = np.random.default_rng(0)
    p = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
         "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    G = Product([Rescale(incoming=(("w1", 1), ("b1", 0)), outgoing=(("w2", 0),), name="r"),
                 Permutation(members=(("w1", 1), ("b1", 0), ("w2", 0)), name="perm")])
    v64 = {k: jnp.asarray(rng.normal(size=x.shape)) for k, x in p.items()}
    got, want = vertical_generic(G, p, v64), G.vertical(p, v64)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(got))
    assert _rel(got, want) < 1e-5
    vint = {k: jnp.ones(x.shape, jnp.int32) for k, x in p.items()}
    assert _rel(vertical_generic(G, p, vint), G.vertical(p, vint)) < 1e-5
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(vertical_generic(G, p, vint)))
    with pytest.raises(ValueError, match=r"vertical_generic: v has no leaf at \('w2',\)"):
        vertical_generic(G, p, {"w1": v64["w1"], "b1": v64["b1"]})


def test_compose_takes_elements_sampled_at_parameters_of_two_float_widths(x64):
    """act reads an element of another float width (sampled at float64 parameters, applied to float32 ones), but
    compose failed on two such elements with JAX's bare TypePromotionError (GL, rescale, translation); the
    composition is now taken in their common dtype and acts as the two elements one after the other."""
    from quotient_sgd.symmetry import GL, Translation

    rng = np.random.default_rng(0)
    p64 = {"q": jnp.asarray(rng.normal(size=(2, 5, 3))), "k": jnp.asarray(rng.normal(size=(2, 5, 3))),
           "w": jnp.asarray(rng.normal(size=(4, 3)))}
    p32 = _cast(jnp.float32, p64)
    for G in (GL(left=("q", None), right=("k", None), kind="qk", name="gl"),
              Rescale(incoming=(("q", 2),), outgoing=(("k", 2),), name="r"), Translation(kernel="w", name="t")):
        g, h = G.sample(jax.random.key(0), p64), G.sample(jax.random.key(1), p32)
        gh = G.compose(g, h)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(gh))
        assert _rel(G.act(gh, p64), G.act(g, G.act(h, p64))) < 1e-6  # (h's float32 rounding)


def test_sample_component_names_itself_for_a_bad_scale():
    """sample_component checked its key under its own name but its scale under sample's ("sample: scale=-1.0 is not
    allowed"), naming a method the caller did not call."""
    p = {"w": jnp.ones((2, 3)), "v": jnp.ones((3, 2))}
    G = Product([Rescale(incoming=(("w", 1),), outgoing=(("v", 0),), name="r")])
    with pytest.raises(ValueError, match=r"^sample_component: scale=-1.0 is not allowed"):
        G.sample_component(jax.random.key(0), p, "r", scale=-1.0)


def test_invariants_of_a_cluster_without_canonical_section_name_themselves_and_do_not_advise_themselves():
    """A GL chain overlapping a logit translation has no canonical section, and its invariants (read at the canonical
    point) are not available either: invariants raised 'canonicalize: ... Use the invariants instead', naming a
    method the caller did not call and advising the one that had just failed.  Now each method names itself and
    says what works; canonicalize still refuses."""
    from quotient_sgd.symmetry import GL, SymmetryError, Translation

    rng = np.random.default_rng(0)
    p = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
         "c": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    G = Product([GL(left=("a", None), right=("b", None), kind="vo", name="gl"),
                 Translation(kernel="b", bias="c", name="t")])
    for method in ("invariants", "unordered_invariants", "canonicalize"):
        with pytest.raises(SymmetryError, match=rf"^{method}: components \['gl', 't'\] overlap") as err:
            getattr(G, method)(p)
        assert "Use the invariants" not in str(err.value)
    v = jax.tree.map(jnp.ones_like, p)  # what the message says works, works
    assert _rel(G.vertical(p, G.vertical(p, v)), G.vertical(p, v)) < 1e-4


def test_parameters_of_two_float_widths_under_strict_promotion(x64):
    """float32 kernels beside float64 biases: under strict dtype promotion canonicalize, vertical, invariants and
    charges of a rescale (and act of a GL whose factor stacks W with its bias, and the gradient carried to its
    canonical point), vertical_generic and quotient_distance all failed with JAX's bare TypePromotionError.  They
    are computed in the parameters' common dtype now, agree with the same parameters in float64, and return what is
    like the parameters in their dtypes."""
    from quotient_sgd.observables import grad_norm_canonical
    from quotient_sgd.symmetry import GL, quotient_distance, vertical_generic

    rng = np.random.default_rng(0)
    p = {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,))),
         "V": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "bv": jnp.asarray(rng.normal(size=(2,)))}
    p64 = _cast(jnp.float64, p)
    dtypes = jax.tree.map(lambda x: x.dtype, p)
    G = Rescale(incoming=(("k", 1), ("b", 0)), outgoing=(("V", 0),), name="r")
    with jax.numpy_dtype_promotion("strict"):
        g = G.sample(jax.random.key(0), p)
        q = G.act(g, p)
        assert jax.tree.map(lambda x: x.dtype, q) == dtypes
        for fn in (G.canonicalize, lambda x: G.vertical(x, p64), lambda x: vertical_generic(G, x, p64)):
            out = fn(q)
            assert _rel(out, fn(_cast(jnp.float64, q))) < 1e-6
        assert jax.tree.map(lambda x: x.dtype, G.canonicalize(q)) == dtypes
        assert _rel(G.invariants(q), G.invariants(p64)) < 1e-5
        assert _rel(G.charges(q), G.charges(_cast(jnp.float64, q))) < 1e-6
        assert float(quotient_distance(G, p, q)) < 1e-5
        gl = GL(left=("k", "b"), right=("V", None), kind="vo", name="gl")  # stacks [k; b]
        p2 = {"k": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,))),
              "V": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
        p2_64 = _cast(jnp.float64, p2)
        q2 = gl.act(gl.sample(jax.random.key(1), p2), p2)
        assert _rel(gl.invariants(q2), gl.invariants(p2_64)) < 1e-5
        # the gradient carried to the canonical point (the observables' closed-form cotransport) too
        assert abs(float(grad_norm_canonical(gl, p2, p2)) / float(grad_norm_canonical(gl, p2_64, p2_64)) - 1) < 1e-5


def test_permutation_of_a_recurrent_matrix_sorts_tied_units_the_same_way_from_every_order(x64):
    """A permutation that reorders both axes of a recurrent matrix (W -> P W P^T): two units of equal norm and sum
    whose entries differ were told apart by a projection of their slices in position order, but W's slices come in
    another order after the permutation, so canonicalize(P . p) differed from canonicalize(p) by 0.36 for 4 of the
    6 orders of 3 units.  The slices of such an array are projected in sorted order now: the same point, bit for
    bit, from every order."""
    import itertools

    rng = np.random.default_rng(0)
    U, V, W = rng.normal(size=(2, 3)), rng.normal(size=(3, 2)), rng.normal(size=(3, 3))
    U[:, 1], V[1] = U[::-1, 0], V[0, ::-1]  # units 0 and 1: the same norms and sums, other entries
    W[:, 1] = W[[1, 0, 2], 0]
    W[1, :] = W[0, [1, 0, 2]]
    W[1, 1], W[0, 1] = W[0, 0], W[1, 0]
    p = {"U": jnp.asarray(U), "W": jnp.asarray(W), "V": jnp.asarray(V)}
    P = Permutation(members=(("U", 1), ("W", 0), ("W", 1), ("V", 0)), name="perm")
    keys = np.asarray(P.invariants(p))
    assert np.min(np.diff(keys)) < 1e-12 * keys[-1]  # (a tie of two units)
    c = P.canonicalize(p)
    for order in itertools.permutations(range(3)):
        q = P.act(jnp.asarray(order, jnp.int32), p)
        cq = P.canonicalize(q)
        assert all(bool(jnp.all(cq[k] == c[k])) for k in p), order
        assert bool(jnp.all(P.invariants(q) == P.invariants(p))), order


def test_group_computations_ask_for_full_precision_products():
    """The groups' matrix products (the M-matrix solve of a rescale chain, the attention heads' Sylvester solves and
    canonical elements, the gradient carried to the canonical point) were traced at JAX's default matmul
    precision: on recent NVIDIA GPUs (TF32) and TPUs (bfloat16) float32 operands are rounded to 10 / 7 bits, far
    below the accuracy the projections are built for.  Every product of these computations asks for
    Precision.HIGHEST now, whatever jax_default_matmul_precision is."""
    from flax import nnx

    from quotient_sgd.models import MLP, Transformer
    from quotient_sgd.observables import canonical_gradient

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    models = (MLP(4, (6, 5), 3, rngs=nnx.Rngs(0)),
              Transformer(vocab_size=7, d_model=8, num_heads=2, num_layers=1, max_len=4, rngs=nnx.Rngs(0)))
    for model in models:
        group, params = model.symmetries(), nnx.state(model, nnx.Param)
        fns = (lambda p: group.vertical(p, p), group.canonicalize, group.invariants, group.canonical_element,
               lambda p: canonical_gradient(group, p, p))
        with jax.default_matmul_precision("bfloat16"):
            for fn in fns:
                found = dot_precisions(fn, params)
                assert found and all(p == highest for p in found), (type(model).__name__, found)

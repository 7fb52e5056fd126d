"""Group actions on hand-written networks: the exact properties of THEORY sections 1-2."""

from __future__ import annotations

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotient_sgd.symmetry import (
    Permutation, Product, Rescale, SymmetryError, Word, align, quotient_distance, vertical_generic,
)

from helpers import assert_tree_allclose, tree_dot, tree_norm
from symmetry_cases import (
    attention_apply, attention_group, attention_params, deep_linear_apply, deep_linear_group, deep_linear_params,
    mlp_apply, mlp_group, mlp_params, normed_apply, normed_group, normed_params,
)


def _logprobs(p, x, activation="relu"):
    return jax.nn.log_softmax(mlp_apply(p, x, activation), axis=-1)


def _cases():
    """(name, params_fn(key, dtype), apply(params, x), group, x_fn(key, dtype), classifier)."""
    widths = (5, 7, 6, 3)
    return {
        "mlp": (lambda k, dt=jnp.float32: mlp_params(k, widths, dt), _logprobs, mlp_group(widths),
                lambda k, dt=jnp.float32: jax.random.normal(k, (9, 5), dt)),
        "attention": (lambda k, dt=jnp.float32: attention_params(k, dtype=dt), attention_apply, attention_group(),
                      lambda k, dt=jnp.float32: jax.random.normal(k, (2, 4, 8), dt)),
        "layernorm": (lambda k, dt=jnp.float32: normed_params(k, dtype=dt), normed_apply, normed_group(False),
                      lambda k, dt=jnp.float32: jax.random.normal(k, (9, 5), dt)),
        "batchnorm": (lambda k, dt=jnp.float32: normed_params(k, dtype=dt),
                      lambda p, x: normed_apply(p, x, per_channel=True), normed_group(True),
                      lambda k, dt=jnp.float32: jax.random.normal(k, (9, 5), dt)),
        "deep_linear": (lambda k, dt=jnp.float32: deep_linear_params(k, (4, 5, 5, 3), dt), deep_linear_apply,
                        deep_linear_group((4, 5, 5, 3)), lambda k, dt=jnp.float32: jax.random.normal(k, (9, 4), dt)),
    }


CASES = _cases()
CANONICAL = ["mlp", "attention", "layernorm", "batchnorm"]


# The checks' own arithmetic (norms, differences, products of trees) runs in numpy, float64: eager jnp compiled
# each operation per leaf shape.
def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in _np(tree))))


def _dot(a, b) -> float:
    return float(sum(np.sum(x * y) for x, y in zip(_np(a), _np(b))))


def _diff(a, b):
    return [x - y for x, y in zip(_np(a), _np(b))]


def _rel_max(y, y0) -> float:
    """``max |y - y0| / max |y0|``."""
    y, y0 = np.asarray(y, np.float64), np.asarray(y0, np.float64)
    return float(np.max(np.abs(y - y0)) / np.max(np.abs(y0)))


def _rel(a, b):
    return _norm(_diff(a, b)) / _norm(b)


@functools.partial(jax.jit, static_argnums=(0,))
def _inverse_and_compose(G, g, h):
    """``(g^-1, g o h)``: the group law as one compiled program per group (eager, its matrix inverses, products and
    gathers compiled one by one per shape)."""
    return G.inverse(g), G.compose(g, h)


@pytest.mark.parametrize("name", list(CASES))
def test_action_preserves_function_and_group_law(name):
    make, f, G, xs = CASES[name]
    p, x = make(jax.random.key(0)), xs(jax.random.key(1))
    g, h = G.sample(jax.random.key(2), p), G.sample(jax.random.key(3), p)
    y0 = f(p, x)
    gp = G.act(g, p)
    assert _rel_max(f(gp, x), y0) < 1e-5
    assert _rel(gp, p) > 0.1  # the parameters really moved
    inverse, composed = _inverse_and_compose(G, g, h)
    assert_tree_allclose(G.act(inverse, gp), p, rtol=1e-4, atol=1e-5)
    assert_tree_allclose(G.act(composed, p), G.act(g, G.act(h, p)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_is_horizontal_per_example_and_batch(name):
    make, f, G, xs = CASES[name]
    p, x = make(jax.random.key(0)), xs(jax.random.key(1))
    T = G.tangents(p)
    k = jax.tree.leaves(T)[0].shape[0]
    assert k > 0

    def loss(p, x):
        return jnp.sum(jnp.sin(f(p, x)))

    grad = jax.jit(jax.grad(loss))  # compiled once per batch shape (eager: op by op, every call)
    grads = [grad(p, x)] + [grad(p, x[i:i + 1]) for i in range(3)]
    tl = [t.reshape(k, -1) for t in _np(T)]
    tnorm = np.sqrt(sum(np.sum(np.square(t), axis=1) for t in tl))
    for gr in grads:
        dots = sum(t @ g.reshape(-1) for t, g in zip(tl, _np(gr)))
        bound = 1e-6 * _norm(gr) * tnorm
        # float32 rounding of the dot products themselves: a few ulps of |grad| |v_i|
        assert bool(np.all(np.abs(dots) <= np.maximum(bound, 2e-6 * _norm(gr) * tnorm))), (name, dots, bound)


@pytest.mark.parametrize("name", list(CASES))
def test_projections(name, x64):
    make, f, G, xs = CASES[name]
    p = make(jax.random.key(0), jnp.float64)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), a.shape, a.dtype), p)
    V, H = G.vertical(p, v), G.horizontal(p, v)
    assert_tree_allclose(jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), V, H), v, rtol=1e-12, atol=1e-12)
    assert_tree_allclose(G.horizontal(p, H), H, rtol=1e-9, atol=1e-10)
    assert_tree_allclose(G.vertical(p, V), V, rtol=1e-9, atol=1e-10)
    T = G.tangents(p)
    k = jax.tree.leaves(T)[0].shape[0]

    @jax.jit  # the index traced: one program for every i (eager, t[i] compiled a slice per index)
    def dot_and_norm(i):
        ti = jax.tree.map(lambda t: t[i], T)
        return tree_dot(ti, H), tree_norm(ti)

    for i in range(k):
        dot, norm_i = dot_and_norm(i)
        assert abs(float(dot)) <= 1e-9 * float(norm_i) * _norm(v)
    assert_tree_allclose(V, vertical_generic(G, p, v), rtol=1e-8, atol=1e-10)
    # the vertical part lies in the span of the tangents: it is orthogonal to every horizontal vector
    w = jax.tree.map(lambda a: jax.random.normal(jax.random.key(8), a.shape, a.dtype), p)
    assert abs(_dot(V, G.horizontal(p, w))) <= 1e-9 * _norm(V) * _norm(w)


@pytest.mark.parametrize("name", CANONICAL)
def test_canonicalize(name):
    make, f, G, xs = CASES[name]
    p, x = make(jax.random.key(0)), xs(jax.random.key(1))
    c = G.canonicalize(p)
    assert_tree_allclose(G.canonicalize(c), c, rtol=1e-4, atol=1e-5)
    y0 = f(p, x)
    assert _rel_max(f(c, x), y0) < 1e-5
    for s in range(3):
        g = G.sample(jax.random.key(10 + s), p)
        assert _rel(G.canonicalize(G.act(g, p)), c) < 1e-4
        assert_tree_allclose(G.invariants(G.act(g, p)), G.invariants(p), rtol=1e-4, atol=1e-5)


def test_canonicalize_permutations_exactly():
    make, f, G, xs = CASES["mlp"]
    p = make(jax.random.key(0))
    c = G.canonicalize(p)
    g = G.sample_component(jax.random.key(1), p, "perm/0")
    g = G.compose(G.sample_component(jax.random.key(2), p, "perm/1"), g)
    cg = G.canonicalize(G.act(g, p))
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(cg), jax.tree.leaves(c)))


def test_canonicalize_and_invariants_exact_under_permutations_of_tied_units():
    """Units (heads) with equal sort keys but different weights (one's entries a reordering of the other's: equal
    norm and sum) are ordered from any starting order: canonicalize and the invariants stay bit-exact under
    permutations (their order followed the input's)."""
    make, f, G, xs = CASES["mlp"]
    # the tied units written in numpy copies (eager .at[].set compiled a scatter per shape)
    p = jax.tree.map(np.array, make(jax.random.key(0)))
    k0, b0, k1 = p["layers"][0]["kernel"], p["layers"][0]["bias"], p["layers"][1]["kernel"]
    k0[:, 2] = k0[[1, 2, 3, 4, 0], 0]
    b0[2] = b0[0]
    k1[2] = k1[0]
    p = jax.tree.map(jnp.asarray, p)
    swap = Product([G.component("perm/0")])
    word = Word((0,), (jnp.asarray([2, 1, 0, 3, 4, 5, 6], jnp.int32),))
    c, cs = swap.canonicalize(p), swap.canonicalize(swap.act(word, p))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cs), jax.tree.leaves(c)))
    A = attention_group()
    q = jax.tree.map(lambda a: np.round(4 * np.asarray(a)), attention_params(jax.random.key(0)))  # integers
    rows = [1, 2, 3, 4, 5, 6, 7, 0]  # head 1: head 0 with its input rows reordered (W_QK reordered)
    for n in ("q", "k", "v", "o"):
        q[n]["kernel"][1] = q[n]["kernel"][0][rows] if n in "qk" else q[n]["kernel"][0]
    for n in ("q", "k", "v"):
        q[n]["bias"][1] = q[n]["bias"][0]
    q = jax.tree.map(jnp.asarray, q)
    heads = Product([A.component("heads")])
    flip = Word((0,), (jnp.asarray([1, 0], jnp.int32),))
    inv = jax.jit(A.invariants)
    jax.tree.map(np.testing.assert_array_equal, inv(heads.act(flip, q)), inv(q))


def test_charges_vanish_at_balanced_point():
    make, f, G, xs = CASES["mlp"]
    c = G.canonicalize(make(jax.random.key(0)))
    for name in ("rescale/0", "rescale/1"):
        assert float(jnp.max(jnp.abs(G.charges(c)[name]))) < 1e-5


def test_sgd_step_breaks_charges_by_the_exact_amount(x64):
    """THEORY section 2: Q+ = (1 - eta lam)^2 Q + 1/2 eta^2 (|g_in|^2 - |g_out|^2) = (1-eta lam)^2 Q + eta^2 Q(g);
    the linear translation charge S+ = (1 - eta lam) S."""
    make, f, G, xs = CASES["mlp"]
    p, x = make(jax.random.key(0), jnp.float64), xs(jax.random.key(1), jnp.float64)
    labels = jnp.arange(x.shape[0]) % 3

    def loss(p):
        return -jnp.mean(jnp.take_along_axis(f(p, x), labels[:, None], axis=1))

    eta, lam = 0.7, 0.05
    g = jax.jit(jax.grad(loss))(p)  # (eager, the gradient dispatched and compiled op by op)
    # the step and the prediction in numpy, float64 (eager jnp compiled each operation per shape)
    new = jax.tree.map(lambda a, b: jnp.asarray((1 - eta * lam) * np.asarray(a) - eta * np.asarray(b)), p, g)
    Q, Qg, Qn = G.charges(p), G.charges(g), G.charges(new)
    for name in ("rescale/0", "rescale/1"):
        pred = (1 - eta * lam) ** 2 * np.asarray(Q[name]) + eta**2 * np.asarray(Qg[name])
        np.testing.assert_allclose(Qn[name], pred, rtol=1e-10, atol=1e-12)
        assert float(np.max(np.abs(np.asarray(Qn[name]) - np.asarray(Q[name])))) > 1e-4  # really broken
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(Qn["translation"][k], (1 - eta * lam) * np.asarray(Q["translation"][k]), rtol=1e-10,
                                   atol=1e-12)


def test_charges_conserved_by_gradient_flow(x64):
    # identity activation: rescale is still a symmetry, and the flow is smooth (ReLU kinks would stall a
    # tight-tolerance adaptive solver without changing the conservation law)
    make, _, G, xs = CASES["mlp"]
    p, x = make(jax.random.key(0), jnp.float64), xs(jax.random.key(1), jnp.float64)
    y = jnp.sin(x[:, :3])

    def loss(p):
        return 0.5 * jnp.mean(jnp.square(jnp.tanh(mlp_apply(p, x, "identity")) - y))

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, p, args: jax.tree.map(jnp.negative, jax.grad(loss)(p))),
        diffrax.Dopri8(), t0=0.0, t1=1.0, dt0=0.01, y0=p,
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12), max_steps=100_000,
    )
    p1 = jax.tree.map(lambda a: a[-1], sol.ys)
    assert float(loss(p1)) < 0.9 * float(loss(p))  # it trained
    Q0, Q1 = G.charges(p), G.charges(p1)
    for name in ("rescale/0", "rescale/1"):
        scale = float(jnp.max(jnp.abs(Q0[name])) + jnp.max(jnp.abs(G.invariants(p)[name])))
        assert float(jnp.max(jnp.abs(Q1[name] - Q0[name]))) <= 1e-6 * scale


def test_deep_linear_invariant_is_end_to_end_product():
    make, f, G, xs = CASES["deep_linear"]
    p = make(jax.random.key(0))
    g = G.sample(jax.random.key(1), p)
    inv, inv_g = G.invariants(p), G.invariants(G.act(g, p))
    assert_tree_allclose(inv_g, inv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inv["gl/0"], f(p, jnp.eye(4)), rtol=1e-5, atol=1e-6)
    with pytest.raises(SymmetryError, match="minimal chains only"):  # inner widths 5 > min(4, 3)
        G.canonicalize(p)


def test_single_gl_bond_wider_than_its_ends_has_no_canonical_section():
    """One GL bond of inner width 4 between 3 inputs and 2 outputs (a deep linear network with one wide hidden
    layer) failed inside the QR / SVD with a broadcasting TypeError; it is a SymmetryError naming the action."""
    from flax import nnx

    from quotient_sgd import models

    model = models.DeepLinear(3, (4,), 2, rngs=nnx.Rngs(0))
    _, p = nnx.split(model, nnx.Param)
    with pytest.raises(SymmetryError, match="inner dimension d=4 wider"):
        model.symmetries().canonical_element(p)
    narrow = models.DeepLinear(3, (2,), 3, rngs=nnx.Rngs(0))
    _, q = nnx.split(narrow, nnx.Param)
    k = narrow.symmetries().canonical_element(q)  # d = 2 <= min(3, 3): the balanced point
    c = narrow.symmetries().act(k, q)
    w0, w1 = c["layers"][0]["kernel"].value, c["layers"][1]["kernel"].value
    np.testing.assert_allclose(w0.T @ w0, w1 @ w1.T, atol=1e-4)  # balanced


# (4, 2, 2, 4) runs the same code on a shorter chain (one inner factor instead of two): slow suite
@pytest.mark.parametrize("widths", [(6, 3, 3, 3, 5), pytest.param((4, 2, 2, 4), marks=pytest.mark.slow)])
def test_deep_linear_minimal_chain_canonicalize(widths, x64):
    """A minimal chain (equal inner widths <= min(in, out)) has a balanced canonical representative: constant on
    orbits, idempotent, function-preserving, balanced (W_l^T W_l = W_{l+1} W_{l+1}^T), diagonal inner factors."""
    G = deep_linear_group(widths)
    p = deep_linear_params(jax.random.key(0), widths, jnp.float64)
    x = jax.random.normal(jax.random.key(2), (7, widths[0]), jnp.float64)
    c = G.canonicalize(p)
    # the network and the balance products in numpy, float64 (eager jnp compiled each product per shape)
    host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    np.testing.assert_allclose(deep_linear_apply(host(c), np.asarray(x)), deep_linear_apply(host(p), np.asarray(x)),
                               rtol=1e-10, atol=1e-12)
    for s in range(3):
        g = G.sample(jax.random.key(10 + s), p, scale=1.0)
        assert_tree_allclose(G.canonicalize(G.act(g, p)), c, rtol=1e-8, atol=1e-10)
    assert_tree_allclose(G.canonicalize(c), c, rtol=1e-10, atol=1e-12)
    mats = [np.asarray(c["layers"][i]["kernel"]) for i in range(len(widths) - 1)]
    for a, b in zip(mats[:-1], mats[1:]):
        np.testing.assert_allclose(a.T @ a, b @ b.T, rtol=1e-8, atol=1e-10)
    for m in mats[1:-1]:
        np.testing.assert_allclose(m, np.diag(np.diagonal(m)), atol=1e-10)


def test_canonicalize_rank_deficient_heads_stays_finite():
    """A head whose QK or VO product has rank < d_head (a zero-initialised W_O, a zero W_Q column) has no balanced
    point on its orbit; canonicalize keeps that head (finite, same products) instead of applying a singular
    element (NaN)."""
    p = jax.tree.map(np.array, attention_params(jax.random.key(0)))  # (numpy copies: eager .at[].set compiled)
    p["o"]["kernel"][1] = 0.0
    p["q"]["kernel"][0, :, 1] = 0.0
    p["q"]["bias"][0, 1] = 0.0
    p = jax.tree.map(jnp.asarray, p)
    G = attention_group()
    for name in ("qk", "vo"):
        gl = G.component(name)
        c = jax.jit(gl.canonicalize)(p)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(c)), name
        np.testing.assert_allclose(gl.invariants(c), gl.invariants(p), rtol=1e-5, atol=1e-6)


def test_deep_linear_rank_deficient_chain_canonicalize_stays_finite():
    """A minimal chain whose end-to-end product has rank < n (a zero column inside) has no balanced point on its
    orbit; canonicalize leaves it (finite, same function) instead of applying singular elements (NaN)."""
    widths = (4, 2, 2, 4)
    G = deep_linear_group(widths)
    p = deep_linear_params(jax.random.key(0), widths)
    p = jax.tree.map(np.array, p)  # (numpy copies: eager .at[].set compiled a scatter)
    p["layers"][1]["kernel"][:, 0] = 0.0
    p = jax.tree.map(jnp.asarray, p)
    c = G.canonicalize(p)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(c))
    x = jnp.eye(4)
    np.testing.assert_allclose(deep_linear_apply(c, x), deep_linear_apply(p, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_align_and_quotient_distance(name):
    make, f, G, xs = CASES[name]
    a = make(jax.random.key(0))
    g = G.sample(jax.random.key(1), a)
    ga = G.act(g, a)
    raw = _norm(_diff(a, ga))
    assert raw > 0.5
    assert float(quotient_distance(G, a, ga)) < 1e-4 * _norm(a)
    assert _rel(align(G, a, ga), a) < 1e-4
    b = make(jax.random.key(5))
    dab, dba = float(quotient_distance(G, a, b)), float(quotient_distance(G, b, a))
    assert dab == pytest.approx(dba, rel=1e-5)
    assert dab <= _norm(_diff(a, b)) * (1 + 1e-6)
    assert dab > 1e-2


def test_errors_name_the_problem():
    p = mlp_params(jax.random.key(0), (5, 7, 3))
    bad = Rescale(incoming=((("layers", 0, "kernel"), -1),), outgoing=((("layers", 9, "kernel"), 0),), name="r")
    with pytest.raises(SymmetryError, match=r"layers', 9"):
        bad.charges(p)
    mismatched = Rescale(incoming=((("layers", 0, "kernel"), -1),), outgoing=((("layers", 1, "kernel"), 1),), name="r")
    with pytest.raises(SymmetryError, match="number of units"):
        mismatched.charges(p)
    with pytest.raises(SymmetryError, match="unique"):
        Product([Permutation(members=((("layers", 0, "bias"), 0),), name="x"),
                 Permutation(members=((("layers", 0, "bias"), 0),), name="x")])
    with pytest.raises(SymmetryError, match="components must be groups"):
        Product([1, 2])
    G = Product([Rescale(incoming=((("layers", 0, "kernel"), -1), (("layers", 0, "bias"), 0)),
                         outgoing=((("layers", 1, "kernel"), 0),), name="r")])
    for bad_kw in ({"rounds": -1}, {"iters": 2.5}, {"rounds": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad_kw))} must be an integer >= 0"):
            align(G, p, p, **bad_kw)
        with pytest.raises(ValueError, match=f"{next(iter(bad_kw))} must be an integer >= 0"):
            quotient_distance(G, p, p, **bad_kw)
    with pytest.raises(TypeError):  # a misspelt option was ignored
        quotient_distance(G, p, p, round=5)


def test_jit_and_vmap_over_group_elements():
    make, f, G, xs = CASES["mlp"]
    p, x = make(jax.random.key(0)), xs(jax.random.key(1))
    gs = jax.vmap(lambda k: G.sample(k, p))(jax.random.split(jax.random.key(2), 5))
    ys = jax.jit(jax.vmap(lambda g: f(G.act(g, p), x)))(gs)  # (eager, the batched network compiled op by op)
    np.testing.assert_allclose(ys, jnp.broadcast_to(f(p, x), ys.shape), rtol=1e-4, atol=1e-5)
    cs = jax.jit(jax.vmap(lambda g: G.canonicalize(G.act(g, p))))(gs)
    c = G.canonicalize(p)
    for i in range(5):
        assert _rel(jax.tree.map(lambda a: a[i], cs), c) < 1e-4


_MLP_GROUP_CASES = dict(
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    activation=st.sampled_from(["relu", "leaky_relu", "identity"]),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.2, 1.0),
)


# every drawn width list is a new set of shapes to compile (~6 s each on 2 cores): 2 draws in the fast suite,
# 12 in the slow one
@settings(max_examples=2, deadline=None)
@given(**_MLP_GROUP_CASES)
def test_property_mlp_group(widths, activation, seed, scale):
    _check_mlp_group(widths, activation, seed, scale)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(**_MLP_GROUP_CASES)
def test_property_mlp_group_more_examples(widths, activation, seed, scale):
    _check_mlp_group(widths, activation, seed, scale)


@functools.partial(jax.jit, static_argnums=(1,))
def _mlp_group_draws(key, ws):
    """``(params, inputs, vector, sample key)`` of a drawn case, one compiled program per width list (eager, every
    new shape compiled its draws one by one)."""
    k1, k2, k3 = jax.random.split(key, 3)
    p, x = mlp_params(k1, ws), jax.random.normal(k2, (6, 3))
    return p, x, jax.tree.map(lambda a: jax.random.normal(k3, a.shape), p), k3


_logprobs_jit = jax.jit(_logprobs, static_argnums=(2,))  # (eager, the network compiled op by op per new shape)


def _check_mlp_group(widths, activation, seed, scale):
    ws = (3, *widths, 2)
    G = mlp_group(ws)
    p, x, v, k3 = _mlp_group_draws(jax.random.key(seed), ws)
    g = G.sample(k3, p, scale=scale)
    gp = G.act(g, p)
    y0 = _logprobs_jit(p, x, activation)
    assert _rel_max(_logprobs_jit(gp, x, activation), y0) <= 1e-4
    H = G.horizontal(gp, v)
    assert_tree_allclose(G.horizontal(gp, H), H, rtol=1e-3, atol=1e-4)
    assert _rel(G.canonicalize(gp), G.canonicalize(p)) < 1e-3
    assert_tree_allclose(G.invariants(gp), G.invariants(p), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", CANONICAL)
def test_continuous_canonical_element_and_unordered_invariants(name):
    """The continuous canonical point differs from the canonical representative by a permutation of units (same
    norms); warm-starting it from a nearby point's element gives the same element; unordered invariants have the
    norms of the invariants, component by component, and are unchanged in norm on g.params."""
    make, _, G, _ = CASES[name]
    p = make(jax.random.key(0))
    k = G.continuous_canonical_element(p)
    np.testing.assert_allclose(_norm(G.act(k, p)), _norm(G.canonicalize(p)), rtol=1e-5)
    near = jax.tree.map(lambda a: a * (1 + 0.01 * jax.random.normal(jax.random.key(5), a.shape, a.dtype)), p)
    k_near = G.continuous_canonical_element(near)
    assert_tree_allclose(G.continuous_canonical_element(near, init=k), k_near, rtol=1e-4, atol=1e-5)
    inv = G.invariants(p)
    g = G.sample(jax.random.key(1), p, scale=1.0)
    for un in (G.unordered_invariants(p), G.unordered_invariants(p, k), G.unordered_invariants(G.act(g, p))):
        for c in inv:
            np.testing.assert_allclose(_norm(un[c]), _norm(inv[c]), rtol=1e-4, atol=1e-6)


def test_sample_scale_and_align_layout_are_checked():
    from flax import nnx

    from quotient_sgd.models import MLP

    def params(hidden, seed):
        return nnx.split(MLP(4, hidden, 3, rngs=nnx.Rngs(seed)), nnx.Param)[1]

    p = params((8,), 0)
    group = MLP(4, (8,), 3, rngs=nnx.Rngs(0)).symmetries()
    for bad in (-1.0, float("nan"), float("inf"), "big", [1.0, 2.0], True):
        with pytest.raises(ValueError, match="scale=.* need a finite number >= 0"):
            group.sample(jax.random.key(0), p, scale=bad)
        with pytest.raises(ValueError, match="scale="):
            group.sample_component(jax.random.key(0), p, group.components[0].name, scale=bad)
    g0 = group.sample(jax.random.key(0), p, scale=0.0)  # scale 0: the continuous part is the identity
    moved = group.act(g0, p)
    assert float(quotient_distance(group, p, moved)) < 1e-5
    for fn in (align, quotient_distance):
        with pytest.raises(ValueError, match=r"has shape \(.*8,?\) in params_a and \(.*9,?\) in params_b"):
            fn(group, p, params((9,), 1))


def test_malformed_declarations_and_projection_inputs_are_named():
    """A translation bias that is not one entry per class (its vertical part was computed with the kernel's class
    count), a GL factor that is not a matrix or a bias of the wrong shape, a vector v unlike params, and verify
    with no samples (it checked nothing and returned 0) are reported, naming the argument."""
    from quotient_sgd.symmetry import GL, Translation, verify

    p = {"w": jnp.ones((3, 4)), "b": jnp.ones((5,))}
    with pytest.raises(SymmetryError, match=r"bias must be \(C,\) = \(4,\).*got \(5,\)"):
        Translation(kernel=("w",), bias=("b",)).vertical(p, p)
    a = {"q": jnp.ones((2, 4, 3)), "bq": jnp.ones((2, 4)), "k": jnp.ones((2, 4, 3)), "v": jnp.ones((4,))}
    with pytest.raises(SymmetryError, match=r"bias \('bq',\) must have shape \(2, 3\)"):
        GL(left=(("q",), ("bq",)), right=(("k",), None), kind="qk").charges(a)
    with pytest.raises(SymmetryError, match=r"\('v',\) must be a matrix"):
        GL(left=(("v",), None), right=(("k",), None), kind="qk").charges(a)
    with pytest.raises(SymmetryError, match="left and right must be"):
        GL(left=("q",), right=(("k",), None), kind="qk")
    make, f, G, xs = CASES["mlp"]
    params = make(jax.random.key(0))
    v = jax.tree.map(jnp.ones_like, params)
    v["layers"][0]["bias"] = jnp.ones((7, 2))
    with pytest.raises(ValueError, match=r"horizontal: v has shape \(7, 2\) at \('layers', 0, 'bias'\)"):
        G.horizontal(params, v)
    with pytest.raises(ValueError, match=r"vertical: v has no leaf at"):
        G.vertical(params, {"x": jnp.ones(3)})
    from flax import nnx

    from quotient_sgd.models import MLP

    model = MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        verify(model, model.symmetries(), jnp.ones((2, 3)), jax.random.key(0), num_samples=0)


def test_member_axis_outside_the_array_is_named():
    p = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
    bad = Rescale(incoming=((("a", "kernel"), 5),), outgoing=((("b", "kernel"), 0),), name="r")
    with pytest.raises(SymmetryError, match=r"'r': member \('a', 'kernel'\) acts along axis 5, but that parameter "
                                            r"has shape \(3, 4\)"):
        Product([bad]).sample(jax.random.key(0), p)
    with pytest.raises(SymmetryError, match="acts along axis -3"):
        Permutation(members=((("a", "kernel"), -3), (("b", "kernel"), 0)), name="perm").sample(jax.random.key(0), p)


# (attention in the slow suite: test_observables_hessian.py's frozen projection checks its float32 projection at
# an unbalanced point here)
@pytest.mark.parametrize("name, scale, tol", [("mlp", 2.0, 1e-3), ("deep_linear", 1.0, 1e-3),
                                              pytest.param("attention", 2.0, 1e-4, marks=pytest.mark.slow)])
def test_float32_projection_at_unbalanced_point_matches_float64(name, scale, tol):
    """The float32 vertical projection at a point moved by a sampled element (rescale factors up to e^4, GL
    condition number e^6) agrees with the float64 projection at the same point: the rescale chain's dense solve
    and the per-head Sylvester solve refine their normal-equation solutions with the residual in parameter
    space, the deep linear GL chain solves least squares on its tangent matrix (without either: 32% / 8% / 0.06%
    of |v| off)."""
    make, _, G, _ = CASES[name]
    p = make(jax.random.key(3))
    gp = G.act(G.sample(jax.random.key(101), p, scale), p)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(5), a.shape, a.dtype), gp)
    V32 = jax.jit(G.vertical)(gp, v)
    with jax.enable_x64(True):
        up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
        V64 = jax.jit(G.vertical)(up(gp), up(v))
        err = _norm(_diff(V32, V64)) / _norm(v)
    assert err < tol, err

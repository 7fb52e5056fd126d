"""Issue A's acceptance properties on the real Flax NNX models (MLP, CNN, Transformer)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from quotient_sgd.models import CNN, MLP, Transformer
from quotient_sgd.symmetry import GL, Rescale, Scale, Word

from helpers import assert_tree_allclose, np_tree_norm as tree_norm, np_tree_sub as _sub


def _absmax(y):
    return float(np.max(np.abs(np.asarray(y))))


def _mlp():
    return MLP(6, (8, 7), 4, activation="relu", classifier=True, rngs=nnx.Rngs(0)), \
        jax.random.normal(jax.random.key(1), (10, 6)), jnp.arange(10) % 4


def _cnn():
    return CNN(1, (3, 4), 5, norm="layer", activation="relu", classifier=True, rngs=nnx.Rngs(0)), \
        jax.random.normal(jax.random.key(1), (6, 8, 8, 1)), jnp.arange(6) % 5


def _transformer():
    model = Transformer(11, 8, 2, 2, 5, rngs=nnx.Rngs(0), mlp_ratio=2)
    x = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    return model, x, jnp.roll(x, -1, axis=1)


MODELS = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}


def _build(name):
    model, x, y = MODELS[name]()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(p):
        return nnx.merge(graphdef, p, rest)(x)

    def loss(p, xb=x, yb=y):
        logp = nnx.merge(graphdef, p, rest)(xb)
        return -jnp.mean(jnp.take_along_axis(logp, yb[..., None], axis=-1))

    # eager grad dispatched op by op: ~3.5 s a call on the transformer; jitted, one compile per batch shape
    return model.symmetries(), params, jax.jit(apply), jax.jit(jax.grad(loss))


# one model, jitted forward and jitted gradient per kind, shared by the float32 tests (none mutates them; the float64
# test builds its own, so that no input drawn under float64 reaches the others)
_setup = functools.cache(_build)


def _push(G, params, c=4.0):
    """A group element scaling every continuous positive/GL component uniformly by e^c: with the sampled element
    (factors e^-2..e^2, GL condition number e^3 ~ 20) it makes raw norms change by well over 10x."""
    idx, elems = [], []
    for i, comp in enumerate(G.components):
        if isinstance(comp, (Rescale, Scale)):
            idx.append(i)
            elems.append(comp.identity(params) + c)
        elif isinstance(comp, GL):
            idx.append(i)
            elems.append(comp.identity(params) * np.exp(c).astype(np.float32))
    return Word(tuple(idx), tuple(elems))


@functools.partial(jax.jit, static_argnums=(0,))
def _pushed_sample(G, p, key):
    """``_push(G, p) o G.sample(key, p, scale=1.0)`` as one compiled program per group and shapes (eager, each
    component's identity element compiled a program of its own, and the group law op by op)."""
    return G.compose(_push(G, p), G.sample(key, p, scale=1.0))


@pytest.mark.parametrize("name", list(MODELS))
def test_models_outputs_invariants_and_canonical_quantities(name):
    G, p, apply, grad = _setup(name)
    y0, c = apply(p), G.canonicalize(p)
    inv = G.invariants(p)
    gnorm_c = tree_norm(grad(c))
    for s in range(2):
        g = _pushed_sample(G, p, jax.random.key(10 + s))
        gp = G.act(g, p)
        ratio = tree_norm(gp) / tree_norm(p)
        assert ratio >= 10 or ratio <= 0.1, ratio
        np.testing.assert_allclose(apply(gp), y0, rtol=1e-5, atol=1e-5 * _absmax(y0))
        assert_tree_allclose(G.invariants(gp), inv, rtol=1e-4, atol=1e-5)
        cg = G.canonicalize(gp)
        assert tree_norm(_sub(cg, c)) / tree_norm(c) < 1e-4
        np.testing.assert_allclose(apply(cg), y0, rtol=1e-5, atol=1e-5 * _absmax(y0))
        np.testing.assert_allclose(tree_norm(grad(cg)), gnorm_c, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_models_gradient_horizontal(name):
    G, p, apply, grad = _setup(name)
    model, x, y = MODELS[name]()
    T = G.tangents(p)
    k = jax.tree.leaves(T)[0].shape[0]
    tl = jax.tree.leaves(T)
    # the products and norms in numpy, float64 (eager jnp compiled each operation per leaf shape)
    tl = [np.asarray(t, np.float64).reshape(k, -1) for t in tl]
    tnorm = np.sqrt(sum(np.sum(np.square(t), axis=1) for t in tl))
    grads = [grad(p)] + [grad(p, x[i:i + 1], y[i:i + 1]) for i in range(2)]
    for gr in grads:
        dots = sum(t @ np.asarray(g, np.float64).reshape(-1) for t, g in zip(tl, jax.tree.leaves(gr)))
        assert bool(np.all(np.abs(dots) <= 1e-6 * tree_norm(gr) * tnorm + 1e-7 * tnorm)), \
            (name, np.max(np.abs(dots)))


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_models_projection_closed_forms_agree_with_generic(name):
    from quotient_sgd.symmetry import vertical_generic
    # the shared float32 model (built with float64 off: its initialisation is not compiled again under float64),
    # its parameters cast to float64 and a random float64 vector drawn on the host (no compile per leaf shape)
    G, p, _, _ = _setup(name)
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), p)
        rng = np.random.default_rng(3)
        v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), p)
        V = G.vertical(p, v)
        assert_tree_allclose(V, vertical_generic(G, p, v), rtol=1e-7, atol=1e-9)
        H = G.horizontal(p, v)
        assert_tree_allclose(G.horizontal(p, H), H, rtol=1e-8, atol=1e-10)


_NNX_MLP_CASES = dict(hidden=st.lists(st.integers(2, 5), min_size=1, max_size=3),
                      activation=st.sampled_from(["relu", "leaky_relu", "identity"]),
                      seed=st.integers(0, 1000))


# every drawn width list is a new set of shapes to compile: 2 draws in the fast suite, 12 in the slow one
@settings(max_examples=2, deadline=None)
@given(**_NNX_MLP_CASES)
def test_property_nnx_mlp(hidden, activation, seed):
    _check_nnx_mlp(hidden, activation, seed)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(**_NNX_MLP_CASES)
def test_property_nnx_mlp_more_examples(hidden, activation, seed):
    _check_nnx_mlp(hidden, activation, seed)


def _check_nnx_mlp(hidden, activation, seed):
    model = MLP(3, tuple(hidden), 2, activation=activation, classifier=True, rngs=nnx.Rngs(seed))
    G = model.symmetries()
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(seed), (4, 3))
    g = G.sample(jax.random.key(seed + 1), p)
    gp = G.act(g, p)
    apply = jax.jit(lambda q: nnx.merge(graphdef, q, rest)(x))  # (eager: each new shape compiled op by op)
    y0 = apply(p)
    np.testing.assert_allclose(apply(gp), y0, rtol=1e-4, atol=1e-4 * _absmax(y0))
    c = G.canonicalize(p)
    assert tree_norm(_sub(G.canonicalize(gp), c)) / tree_norm(c) < 1e-3


# (slow: test_models_outputs_invariants_and_canonical_quantities[transformer] checks the Transformer's invariants here)
@pytest.mark.slow
def test_transformer_invariants_without_canonicalisation():
    """The attention cluster (QK, VO, head permutation) and the MLP cluster (rescale, unit permutation) report their
    invariants without canonicalising: sorted by invariant keys.  They are exactly unchanged by permutations, equal
    to tolerance on any orbit point, and they separate orbits (an off-orbit change of one head moves them)."""
    G, p, apply, _ = _setup("transformer")
    flat, _ = G._flat(p)
    for cl in G.clusters():
        if len(cl) > 1:
            assert G._sorted_invariants(cl, flat) is not None, [G.components[i].name for i in cl]
    inv = G.invariants(p)
    perms = [i for i, c in enumerate(G.components) if not c.continuous]
    for s in range(3):
        keys = jax.random.split(jax.random.key(20 + s), len(perms))
        word = Word(tuple(perms), tuple(G.components[i]._sample(k, flat, 1.0) for i, k in zip(perms, keys)))
        jax.tree.map(np.testing.assert_array_equal, G.invariants(G.act(word, p)), inv)
        g = G.compose(_push(G, p, 2.0), G.sample(jax.random.key(30 + s), p, scale=1.0))
        assert_tree_allclose(G.invariants(G.act(g, p)), inv, rtol=1e-4, atol=1e-5)
    w_q = p["blocks"][0]["attn"]["w_q"]
    bumped = jax.tree.map(lambda a: a, p)
    bumped["blocks"][0]["attn"]["w_q"] = nnx.Param(w_q.value.at[1, 0, 0].add(0.5))
    assert not np.allclose(apply(bumped), apply(p), rtol=1e-4)
    moved = G.invariants(bumped)
    assert float(jnp.max(jnp.abs(moved["qk/blocks.0"] - inv["qk/blocks.0"]))) > 1e-2

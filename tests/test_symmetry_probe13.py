"""Configurations whose declared symmetry group is not the model's: LayerNorms over two features, and the
symmetries a model documents as undeclared (float64 checks of each against the model function)."""

from __future__ import annotations

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import CNN, MLP, LayerNorm, MeanField, Transformer
from helpers import np_tree_norm as _norm


def _cast(dtype, tree):
    """``tree`` with every leaf cast to ``dtype``, in NumPy (an eager ``astype`` compiles a program per shape)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(jnp.dtype(dtype))), tree)


def _pure_fn(model, x):
    """``(params as a plain dict, p -> model output at x under params p)``, the rest of the model fixed."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(pure):
        state = nnx.split(model, nnx.Param, ...)[1]
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state, rest)(x)

    return params.to_pure_dict(), jax.jit(f)


def test_layernorm_over_two_features_is_a_sign_and_a_transformer_of_width_two_is_refused(x64):
    """A LayerNorm over two features outputs ``+-(scale_0, -scale_1) + bias``, a function of the sign of
    ``x_0 - x_1`` alone; a Transformer reads its residual stream only through such norms, so with d_model = 2 no
    parameter before the final norm gets a gradient (measured: 1e-11 for the embeddings and attention, against
    0.1-0.2 at d_model = 3).  It was built silently; it is refused now, naming d_model."""
    ln = LayerNorm(2, param_dtype=jnp.float64)
    ln.scale[...] = jnp.asarray([1.5, -0.7])
    ln.bias[...] = jnp.asarray([0.2, 0.3])
    z = jax.random.normal(jax.random.key(0), (50, 2), jnp.float64)
    sign = jnp.sign(z[:, :1] - z[:, 1:])
    want = sign * jnp.asarray([[1.5, 0.7]]) + jnp.asarray([[0.2, 0.3]])
    np.testing.assert_allclose(np.asarray(ln(z)), np.asarray(want), rtol=1e-6, atol=1e-6)  # (eps / d^2)
    with pytest.raises(ValueError, match=r"Transformer: d_model must be >= 3, got 2"):
        Transformer(5, 2, 1, 1, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Transformer: d_model must be >= 3, got 2"):
        Transformer(5, 2, 2, 1, 4, rngs=nnx.Rngs(0))


def test_cnn_layernorm_over_two_channels_warns_and_its_conv_gets_no_gradient(x64):
    """With norm='layer' a conv layer of 2 channels is read through one sign per position: its parameters got a
    gradient of 5e-7 (3 channels: 1.4) and are flat directions of every loss outside the declared group.  The
    model was built without a word; it warns now (3 channels: no warning)."""
    x = jax.random.normal(jax.random.key(2), (4, 5, 6, 1), jnp.float64)
    grads = {}
    for c in (2, 3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = CNN(1, (c,), 3, norm="layer", classifier=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        said = [w for w in caught if issubclass(w.category, UserWarning) and "2 channels" in str(w.message)]
        assert len(said) == (1 if c == 2 else 0), [str(w.message) for w in caught]
        pure, f = _pure_fn(model, x)
        g = jax.grad(lambda p: jnp.sum(f(p)[:, 0]))(pure)
        grads[c] = (_norm(g["convs"]), _norm(g["head"]))
    conv2, head2 = grads[2]
    conv3, head3 = grads[3]
    assert conv2 < 1e-4 * head2, grads
    assert conv3 > 1e-2 * head3, grads
    with pytest.warns(UserWarning, match=r"norm='layer' over a conv layer of 2 channels"):
        CNN(1, (4, 2), 3, norm="layer", rngs=nnx.Rngs(0))


def _transformer_case():
    model = Transformer(5, 4, 2, 1, 4, mlp_ratio=1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (6, 4), 0, 5)
    pure, f = _pure_fn(model, tokens)
    # biases and norm parameters away from their zero / one initialisation, so that every claim is tested
    vec, unravel = jax.flatten_util.ravel_pytree(pure)
    pure = unravel(vec + 0.3 * jax.random.normal(jax.random.key(3), vec.shape, vec.dtype))
    return model, pure, f


def _moved(pure, updates):
    """A copy of the plain parameter dict with ``updates`` ({path tuple: new value}) applied."""
    out = jax.tree.map(lambda x: x, pure)
    for path, value in updates.items():
        node = out
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return out


@jax.jit
def _undeclared_moves(p):
    """``{name: {path: moved value}}`` for the symmetries the Transformer's docstring lists as undeclared
    (one block, 2 heads of d_head 2, d_model 4, vocabulary 5), and ``"control"``: the query bias moved alone."""
    a, ln1, ln2 = p["blocks"][0]["attn"], p["blocks"][0]["ln1"], p["blocks"][0]["ln2"]
    fc_in = p["blocks"][0]["fc_in"]
    key = iter(jax.random.split(jax.random.key(7), 16))

    def rnd(shape):
        return jax.random.normal(next(key), shape, jnp.float64)

    A = ("blocks", 0, "attn")
    delta_v, delta_1, delta_2, delta_f, c, uq = rnd((2, 2)), rnd((4,)), rnd((4,)), rnd((4,)), rnd((4,)), rnd((2, 2))
    ones = jnp.ones((4,), jnp.float64)
    gamma = jnp.exp(rnd((4,)))
    moves = {
        "key bias": {A + ("b_k",): a["b_k"] + rnd((2, 2))},
        "value bias / output bias": {A + ("b_v",): a["b_v"] + delta_v,
                                     A + ("b_o",): a["b_o"] - jnp.einsum("hd,hdD->D", delta_v, a["w_o"])},
        "token / position embedding": {("tok_embed", "embedding"): p["tok_embed"]["embedding"] + c[None, :],
                                       ("pos_embed", "embedding"): p["pos_embed"]["embedding"] - c[None, :]},
        "ln1 bias / attention biases": {
            ("blocks", 0, "ln1", "bias"): ln1["bias"] + delta_1,
            A + ("b_q",): a["b_q"] - jnp.einsum("D,hDd->hd", delta_1, a["w_q"]),
            A + ("b_k",): a["b_k"] - jnp.einsum("D,hDd->hd", delta_1, a["w_k"]),
            A + ("b_v",): a["b_v"] - jnp.einsum("D,hDd->hd", delta_1, a["w_v"])},
        "ln2 bias / fc_in bias": {("blocks", 0, "ln2", "bias"): ln2["bias"] + delta_2,
                                  ("blocks", 0, "fc_in", "bias"): fc_in["bias"] - delta_2 @ fc_in["kernel"]},
        "ln_f bias / unembed bias": {("ln_f", "bias"): p["ln_f"]["bias"] + delta_f,
                                     ("unembed", "bias"): p["unembed"]["bias"] - delta_f @ p["unembed"]["kernel"]},
        "stream mean: token rows": {("tok_embed", "embedding"):
                                    p["tok_embed"]["embedding"] + rnd((5, 1)) * ones[None, :]},
        "stream mean: w_o": {A + ("w_o",): a["w_o"] + rnd((2, 2, 1)) * ones[None, None, :]},
        "reader of ln1: w_q": {A + ("w_q",): a["w_q"] + (1 / ln1["scale"])[None, :, None] * uq[:, None, :],
                               A + ("b_q",): a["b_q"] - jnp.sum(ln1["bias"] / ln1["scale"]) * uq},
        "ln2 coordinate rescale": {("blocks", 0, "ln2", "scale"): ln2["scale"] * gamma,
                                   ("blocks", 0, "ln2", "bias"): ln2["bias"] * gamma,
                                   ("blocks", 0, "fc_in", "kernel"): fc_in["kernel"] / gamma[:, None]},
        "control": {A + ("b_q",): a["b_q"] + rnd((2, 2))},
    }
    return moves


def test_transformer_symmetries_documented_as_undeclared_hold_and_are_horizontal(x64):
    """Each direction the Transformer's symmetries() docstring lists as a symmetry outside the declared group
    leaves the log-probabilities unchanged (float64, to rounding), and is not vertical for the declared group (a
    sizeable part outside the span of its orbit tangents): the declared group is a strict subgroup, as
    documented."""
    model, p, f = _transformer_case()
    y0 = f(p)
    moves = {name: _moved(p, upd) for name, upd in _undeclared_moves(p).items()}
    # the check has power: the query bias moved alone (no compensation) changes the outputs
    y0 = np.asarray(y0)  # (the comparisons in NumPy: eager jnp compiles each operation)
    control = float(np.max(np.abs(np.asarray(f(moves.pop("control"))) - y0)))
    assert control > 1e-3 * float(np.max(np.abs(y0))), control
    # the declared group's orbit tangents, as columns; a direction's part outside their span is its horizontal part
    tangents = model.symmetries().tangents(p)
    T = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(tangents)).T
    p_vec = np.asarray(jax.flatten_util.ravel_pytree(p)[0])
    for name, q in moves.items():
        change = float(np.max(np.abs(np.asarray(f(q)) - y0)) / np.max(np.abs(y0)))
        assert change < 1e-12, (name, change)
        d = np.asarray(jax.flatten_util.ravel_pytree(q)[0]) - p_vec
        h = d - T @ np.linalg.lstsq(T, d, rcond=None)[0]
        assert np.linalg.norm(h) > 0.1 * np.linalg.norm(d), (name, np.linalg.norm(h), np.linalg.norm(d))


def test_tanh_sign_flip_is_a_symmetry_outside_the_declared_group(x64):
    """tanh is odd: flipping the sign of a hidden unit's incoming weights, bias and outgoing weights leaves the MLP
    unchanged (the MLP docstring says so), but the declared group (permutations only, no rescale: tanh is not
    positively homogeneous) does not contain it, so the canonical points of the two differ."""
    model = MLP(3, (4,), 2, activation="tanh", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    p, f = _pure_fn(model, x)
    flip = jnp.asarray([1.0, -1.0, 1.0, 1.0])
    layers = p["layers"]
    q = _moved(p, {("layers", 0, "kernel"): layers[0]["kernel"] * flip[None, :],
                   ("layers", 0, "bias"): layers[0]["bias"] * flip,
                   ("layers", 1, "kernel"): layers[1]["kernel"] * flip[:, None]})
    np.testing.assert_allclose(np.asarray(f(q)), np.asarray(f(p)), rtol=1e-13, atol=1e-13)
    names = [c.name for c in model.symmetries().components]
    assert names == ["permutation/layers.0"]
    group = model.symmetries()
    cp = jax.flatten_util.ravel_pytree(group.canonicalize(p))[0]
    cq = jax.flatten_util.ravel_pytree(group.canonicalize(q))[0]
    assert float(np.linalg.norm(np.asarray(cq) - np.asarray(cp))) > 0.1 * float(np.linalg.norm(np.asarray(cp)))


def test_meanfield_tanh_sign_flip_and_identity_gl_are_symmetries_outside_the_declared_group(x64):
    """The MeanField docstring's undeclared symmetries: for tanh the sign flip of one particle, for the identity
    activation ``w_in -> A w_in``, ``b -> A b``, ``w_out -> A^{-T} w_out`` with ``A`` in ``GL(width)`` acting on the
    particle axis; both leave the outputs unchanged and neither is in the declared group (for tanh only the
    permutations, whose canonical point differs; for identity a generic ``A`` is no monomial matrix, so its
    direction has a part outside the declared orbit tangents)."""
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    model = MeanField(3, 4, 2, activation="tanh", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    p, f = _pure_fn(model, x)
    p = _moved(p, {("b",): 0.5 * jax.random.normal(jax.random.key(2), (4,), jnp.float64)})
    flip = jnp.asarray([1.0, 1.0, -1.0, 1.0])
    q = {"w_in": p["w_in"] * flip[:, None], "b": p["b"] * flip, "w_out": p["w_out"] * flip[:, None]}
    np.testing.assert_allclose(np.asarray(f(q)), np.asarray(f(p)), rtol=1e-13, atol=1e-13)
    group = model.symmetries()
    cp = jax.flatten_util.ravel_pytree(group.canonicalize(p))[0]
    cq = jax.flatten_util.ravel_pytree(group.canonicalize(q))[0]
    assert float(np.linalg.norm(np.asarray(cq) - np.asarray(cp))) > 0.1 * float(np.linalg.norm(np.asarray(cp)))

    model = MeanField(3, 4, 2, activation="identity", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    p, f = _pure_fn(model, x)
    A = jnp.eye(4, dtype=jnp.float64) + 0.3 * jax.random.normal(jax.random.key(3), (4, 4), jnp.float64)
    q = {"w_in": A @ p["w_in"], "b": A @ p["b"], "w_out": jnp.linalg.inv(A).T @ p["w_out"]}
    np.testing.assert_allclose(np.asarray(f(q)), np.asarray(f(p)), rtol=1e-12, atol=1e-12)
    T = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(model.symmetries().tangents(p))).T
    d = np.asarray(jax.flatten_util.ravel_pytree(q)[0] - jax.flatten_util.ravel_pytree(p)[0])
    h = d - T @ np.linalg.lstsq(T, d, rcond=None)[0]
    assert np.linalg.norm(h) > 0.1 * np.linalg.norm(d)


def test_batchnorm_cnn_vertical_projection_is_accurate_in_float32(x64):
    """A BatchNorm CNN's channel scales (``scale/convs.{l}``) and the rescale between ``norms.{l}`` and the next conv
    (``rescale/norms.{l}``) overlap: the rescale's share of the next kernel is the sum of that kernel's channel-scale
    tangents, so the vertical space holds a direction on the norm's (scale, bias) alone that is their small
    difference far from balance.  The eigendecomposition of the float32 Gram matrix dropped it: at elements of
    scale 2 of a (1, 2)-channel network the projection was 24% and 7% of ``|v|`` off the float64 least-squares
    projection onto the orbit tangents (float64: 6e-13).  Solved now like a rescale chain (the M-matrix
    factorisation): 1e-4 and 3e-6."""
    model = CNN(1, (1, 2), 3, norm="batch", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    group = model.symmetries()
    p = nnx.split(model, nnx.Param, ...)[1]
    vec, unravel = jax.flatten_util.ravel_pytree(p)
    p = unravel(vec + 0.3 * jax.random.normal(jax.random.key(5), vec.shape, vec.dtype))
    for seed in (0, 5):
        q32 = _cast(jnp.float32, group.act(group.sample(jax.random.key(seed), p, 2.0), p))
        q64 = _cast(jnp.float64, q32)  # the same point
        v = unravel(jax.random.normal(jax.random.key(9 + seed), vec.shape, vec.dtype))
        T = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(group.tangents(q64))).T
        vv = np.asarray(jax.flatten_util.ravel_pytree(v)[0])
        exact = T @ np.linalg.lstsq(T, vv, rcond=None)[0]
        got = group.vertical(q32, _cast(jnp.float32, v))
        err = np.linalg.norm(np.asarray(jax.flatten_util.ravel_pytree(got)[0], np.float64) - exact) / np.linalg.norm(vv)
        assert err < 1e-3, (seed, err)

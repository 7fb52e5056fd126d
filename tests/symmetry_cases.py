"""Small functional networks (plain dict parameters) with hand-declared groups, for the symmetry tests.

Independent of quotient_sgd.models, so the group machinery is tested on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quotient_sgd.symmetry import GL, Permutation, Product, Rescale, Scale, Translation

ACTS = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.1),
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
}


def mlp_params(key, widths, dtype=jnp.float32):
    keys = jax.random.split(key, 2 * len(widths))
    layers = {}
    for i in range(len(widths) - 1):
        layers[i] = {
            "kernel": (jax.random.normal(keys[2 * i], (widths[i], widths[i + 1]), dtype) / np.sqrt(widths[i])),
            "bias": 0.1 * jax.random.normal(keys[2 * i + 1], (widths[i + 1],), dtype),
        }
    return {"layers": layers}


def mlp_apply(params, x, activation="relu"):
    act = ACTS[activation]
    n = len(params["layers"])
    h = x
    for i in range(n):
        h = h @ params["layers"][i]["kernel"] + params["layers"][i]["bias"][None, :]
        if i < n - 1:
            h = act(h)
    return h


def mlp_group(widths, *, rescale=True, permutation=True, translation=True):
    comps = []
    for i in range(len(widths) - 2):
        k, b, nxt = ("layers", i, "kernel"), ("layers", i, "bias"), ("layers", i + 1, "kernel")
        if rescale:
            comps.append(Rescale(incoming=((k, -1), (b, 0)), outgoing=((nxt, 0),), name=f"rescale/{i}"))
        if permutation:
            comps.append(Permutation(members=((k, -1), (b, 0), (nxt, 0)), name=f"perm/{i}"))
    if translation:
        last = len(widths) - 2
        comps.append(Translation(kernel=("layers", last, "kernel"), bias=("layers", last, "bias"),
                                 name="translation"))
    return Product(comps)


def attention_params(key, d_model=8, heads=2, d_head=3, dtype=jnp.float32):
    ks = jax.random.split(key, 8)
    s = 1 / np.sqrt(d_model)
    return {
        "q": {"kernel": s * jax.random.normal(ks[0], (heads, d_model, d_head), dtype),
              "bias": 0.1 * jax.random.normal(ks[1], (heads, d_head), dtype)},
        "k": {"kernel": s * jax.random.normal(ks[2], (heads, d_model, d_head), dtype),
              "bias": 0.1 * jax.random.normal(ks[3], (heads, d_head), dtype)},
        "v": {"kernel": s * jax.random.normal(ks[4], (heads, d_model, d_head), dtype),
              "bias": 0.1 * jax.random.normal(ks[5], (heads, d_head), dtype)},
        "o": {"kernel": s * jax.random.normal(ks[6], (heads, d_head, d_model), dtype),
              "bias": 0.1 * jax.random.normal(ks[7], (d_model,), dtype)},
    }


def attention_apply(p, x):
    """x: (B, T, D) -> (B, T, D); causal multi-head attention with explicit per-head parameters."""
    q = jnp.einsum("btd,hde->bhte", x, p["q"]["kernel"]) + p["q"]["bias"][None, :, None, :]
    k = jnp.einsum("btd,hde->bhte", x, p["k"]["kernel"]) + p["k"]["bias"][None, :, None, :]
    v = jnp.einsum("btd,hde->bhte", x, p["v"]["kernel"]) + p["v"]["bias"][None, :, None, :]
    T = x.shape[1]
    s = jnp.einsum("bhte,bhse->bhts", q, k)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, None], s, -1e30)
    a = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhts,bhse->bhte", a, v)
    return jnp.einsum("bhte,hed->btd", o, p["o"]["kernel"]) + p["o"]["bias"][None, None, :]


def attention_group():
    return Product([
        GL(left=(("q", "kernel"), ("q", "bias")), right=(("k", "kernel"), ("k", "bias")), kind="qk", name="qk"),
        GL(left=(("v", "kernel"), ("v", "bias")), right=(("o", "kernel"), None), kind="vo", name="vo"),
        Permutation(members=((("q", "kernel"), 0), (("q", "bias"), 0), (("k", "kernel"), 0), (("k", "bias"), 0),
                             (("v", "kernel"), 0), (("v", "bias"), 0), (("o", "kernel"), 0)), name="heads"),
    ])


def normed_params(key, din=5, width=6, dout=3, dtype=jnp.float32):
    ks = jax.random.split(key, 4)
    return {
        "conv": {"kernel": jax.random.normal(ks[0], (din, width), dtype), "bias": jax.random.normal(ks[1], (width,), dtype)},
        "gamma": 1 + 0.1 * jax.random.normal(ks[2], (width,), dtype),
        "beta": 0.1 * jnp.ones((width,), dtype),
        "head": {"kernel": jax.random.normal(ks[3], (width, dout), dtype) / np.sqrt(width)},
    }


def normed_apply(p, x, per_channel=False, eps=1e-12):
    """Linear -> normalisation (LayerNorm over features, or batch-norm over the batch per channel) -> affine ->
    ReLU -> head.  Scale of the first linear map is a symmetry; rescale between (gamma, beta) and the head too."""
    h = x @ p["conv"]["kernel"] + p["conv"]["bias"][None, :]
    axis = 0 if per_channel else 1
    mu = jnp.mean(h, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=axis, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + eps)
    h = jax.nn.relu(h * p["gamma"][None, :] + p["beta"][None, :])
    return h @ p["head"]["kernel"]


def normed_group(per_channel=False):
    ax = 1 if per_channel else None
    bax = 0 if per_channel else None
    return Product([
        Scale(members=((("conv", "kernel"), ax), (("conv", "bias"), bax)), name="scale"),
        Rescale(incoming=((("gamma",), 0), (("beta",), 0)), outgoing=((("head", "kernel"), 0),), name="rescale"),
    ])


def deep_linear_params(key, widths, dtype=jnp.float32):
    ks = jax.random.split(key, len(widths))
    return {"layers": {i: {"kernel": jax.random.normal(ks[i], (widths[i], widths[i + 1]), dtype) / np.sqrt(widths[i])}
                       for i in range(len(widths) - 1)}}


def deep_linear_apply(p, x):
    for i in range(len(p["layers"])):
        x = x @ p["layers"][i]["kernel"]
    return x


def deep_linear_group(widths):
    return Product([GL(left=(("layers", i, "kernel"), None), right=(("layers", i + 1, "kernel"), None), kind="vo",
                       name=f"gl/{i}") for i in range(len(widths) - 2)])

"""The flat-drawn initialisers return flax's / JAX's defaults bitwise (quotient_sgd/models/_init.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import CNN, MLP, MeanField, Transformer
from quotient_sgd.models import _init

SHAPES = [(32, 10), (3, 3, 5, 7), (4, 8, 6), (2, 1)]
CASES = [
    (1.0, "fan_in", "truncated_normal"),
    (2.0, "fan_out", "normal"),
    (0.5, "fan_avg", "uniform"),
    (1.0, "fan_geo_avg", "truncated_normal"),
    (1.0, "fan_in", "normal", -2, 0),  # flax's Embed
    (1.0, "fan_in", "normal", (0, 1), -1),  # several input axes
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("args", CASES)
def test_variance_scaling_equals_jax_bitwise(shape, args, getkey):
    key = getkey()
    ours = _init.variance_scaling(*args)(key, shape)
    ref = jax.nn.initializers.variance_scaling(*args)(key, shape)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_float64_and_normal_equal_jax_bitwise(x64, getkey):
    key = getkey()
    for dtype in (jnp.float64, jnp.float32, jnp.bfloat16):
        a = _init.lecun_normal()(key, (33, 10), dtype)
        b = jax.nn.initializers.lecun_normal()(key, (33, 10), dtype)
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
        np.testing.assert_array_equal(np.asarray(_init.normal(0.3)(key, (5, 7, 3), dtype), np.float64),
                                      np.asarray(jax.nn.initializers.normal(0.3)(key, (5, 7, 3), dtype), np.float64))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode = 'fan'"):
        _init.variance_scaling(1.0, "fan", "normal")
    with pytest.raises(ValueError, match="distribution = 'cauchy'"):
        _init.variance_scaling(1.0, "fan_in", "cauchy")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        _init.lecun_normal()(jax.random.key(0), (5,))


def _kernels(model):
    return {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("seed", [0, 7])
def test_models_keep_flax_default_initialisation(seed):
    """Each model's parameters are what flax's default initialisers give for the same rng stream."""
    mlp = MLP(64, (32, 17), 10, rngs=nnx.Rngs(seed))
    rngs = nnx.Rngs(seed)
    ref = [nnx.Linear(a, b, rngs=rngs) for a, b in ((64, 32), (32, 17), (17, 10))]
    for layer, r in zip(mlp.layers, ref):
        np.testing.assert_array_equal(np.asarray(layer.kernel[...]), np.asarray(r.kernel[...]))

    cnn = CNN(3, (8, 12), 10, rngs=nnx.Rngs(seed))
    rngs = nnx.Rngs(seed)
    convs = [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in ((3, 8), (8, 12))]
    head = nnx.Linear(12, 10, rngs=rngs)
    for conv, r in zip(cnn.convs, convs):
        np.testing.assert_array_equal(np.asarray(conv.kernel[...]), np.asarray(r.kernel[...]))
    np.testing.assert_array_equal(np.asarray(cnn.head.kernel[...]), np.asarray(head.kernel[...]))

    mf = MeanField(5, 13, 3, rngs=nnx.Rngs(seed))
    rngs = nnx.Rngs(seed)
    np.testing.assert_array_equal(np.asarray(mf.w_in[...]),
                                  np.asarray(jax.random.normal(rngs.params(), (13, 5)) / np.float32(np.sqrt(5))))
    np.testing.assert_array_equal(np.asarray(mf.w_out[...]), np.asarray(jax.random.normal(rngs.params(), (13, 3))))

    tr = Transformer(11, 16, 2, 1, 9, rngs=nnx.Rngs(seed))
    rngs = nnx.Rngs(seed)
    # construction order of the Transformer: embeddings, then the blocks (attention, MLP), then the unembedding
    tok = nnx.Embed(11, 16, rngs=rngs)
    pos = nnx.Embed(9, 16, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(tr.tok_embed.embedding[...]), np.asarray(tok.embedding[...]))
    np.testing.assert_array_equal(np.asarray(tr.pos_embed.embedding[...]), np.asarray(pos.embedding[...]))
    assert all(np.all(np.isfinite(v)) for v in _kernels(tr).values())

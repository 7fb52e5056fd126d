"""Models and data: integral sizes of every kind, and edge cases of the models, tasks and detectors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import (
    CNN,
    MLP,
    BatchNorm,
    CausalSelfAttention,
    DeepLinear,
    LayerNorm,
    MeanField,
    Transformer,
    mmd,
    particle_moments,
    particles,
)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# (constructor, its size arguments as Python ints): each is rebuilt with the sizes as JAX / NumPy 0-d integers
_BUILDERS = [
    (lambda din, h, dout: MLP(din, (h,), dout, rngs=nnx.Rngs(0)), (3, 4, 2)),
    (lambda din, h, dout: DeepLinear(din, (h, h), dout, rngs=nnx.Rngs(0)), (3, 4, 2)),
    (lambda din, w, dout: MeanField(din, w, dout, rngs=nnx.Rngs(0)), (3, 5, 2)),
    (lambda c, ch, dout, k, s: CNN(c, (ch, ch), dout, kernel_size=k, strides=s, norm="batch", rngs=nnx.Rngs(0)),
     (1, 2, 3, 3, 2)),
    (lambda v, d, h, nl, ml, r: Transformer(v, d, h, nl, ml, mlp_ratio=r, rngs=nnx.Rngs(0)), (5, 4, 2, 1, 3, 2)),
    (lambda d, h: CausalSelfAttention(d, h, rngs=nnx.Rngs(0)), (4, 2)),
    (lambda n: LayerNorm(n), (3,)),
    (lambda n: BatchNorm(n), (3,)),
]


@pytest.mark.parametrize("convert", [jnp.int32, jnp.uint8, np.array, jnp.asarray],
                         ids=["jnp.int32", "jnp.uint8", "np.array", "jnp.asarray"])
@pytest.mark.parametrize("build,sizes", _BUILDERS, ids=["MLP", "DeepLinear", "MeanField", "CNN", "Transformer",
                                                         "CausalSelfAttention", "LayerNorm", "BatchNorm"])
def test_model_sizes_take_any_integral_scalar(build, sizes, convert):
    """Every model refused a JAX integer size (``MLP: din must be an integer >= 1, got Array(3, dtype=int32)``) and
    a NumPy 0-d integer array, while it took a NumPy integer scalar.  Built from any integral scalar it has exactly
    the parameters it has from the Python integers, and the sizes it keeps (``MeanField.width``,
    ``Transformer.max_len``, ``CNN.strides``) are Python integers."""
    ref = build(*sizes)
    got = build(*(convert(s) for s in sizes))
    a, b = _params(got), _params(ref)
    assert len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))
    for attr in ("width", "max_len", "num_features", "num_heads", "d_head"):
        if hasattr(ref, attr):
            assert type(getattr(got, attr)) is int and getattr(got, attr) == getattr(ref, attr)
    if isinstance(got, CNN):
        assert got.strides == ref.strides and all(type(s) is int for s in got.strides)


@pytest.mark.parametrize("bad", [jnp.int32(0), np.array(-2), jnp.float32(3.0), 3.0, True, np.bool_(True),
                                 jnp.bool_(True), jnp.array([3]), "3", None])
def test_model_sizes_refuse_what_is_not_a_positive_integral_scalar(bad):
    """Zero, negative, non-integral, boolean, non-scalar and non-numeric sizes are refused with a ``ValueError``
    naming the model and the argument, whatever array type carries them."""
    with pytest.raises(ValueError, match=r"MLP: din must be an integer >= 1, got "):
        MLP(bad, (4,), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MLP: hidden must be a sequence of widths >= 1"):
        MLP(3, (4, bad), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Transformer: max_len must be an integer >= 1, got "):
        Transformer(5, 4, 2, 1, bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"CNN: strides must be an integer >= 1"):
        CNN(1, (2, 2), 2, strides=bad, rngs=nnx.Rngs(0))


def test_model_sizes_refuse_traced_values():
    """A size fixes the parameters' shapes, so a traced one (under ``jit``) is refused naming the argument rather
    than failing inside flax."""
    with pytest.raises(ValueError, match=r"LayerNorm: num_features must be an integer >= 1 known when the model is "
                                         r"built, got a traced value"):
        jax.jit(lambda n: LayerNorm(n).scale[...])(3)


def test_particle_sets_of_the_wrong_shape_are_refused_naming_the_argument():
    """``particle_moments`` of a 1-D ``p`` returned scalar moments (shape ``()``, where ``(k,)`` and ``(k, k)`` are
    promised), of a 3-D one a bare matmul error, of an empty set a NaN mean; ``mmd`` against an empty set was NaN;
    ``particles`` of another model's parameters raised a bare ``KeyError: 'w_in'``.  Each is refused by a
    ``ValueError`` naming the function and the argument; a proper particle set still gives the exact moments."""
    for p in (jnp.arange(3.0), jnp.ones((2, 3, 3)), jnp.ones((0, 3)), jnp.float32(2.0)):
        with pytest.raises(ValueError, match=r"particle_moments: p must be a particle set \(n, k\) with n >= 1"):
            particle_moments(p)
    with pytest.raises(ValueError, match=r"mmd: p and q must hold at least one particle each"):
        mmd(jnp.ones((0, 2)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"mmd: p and q must hold at least one particle each"):
        mmd(jnp.ones((3, 2)), jnp.ones((0, 2)))
    mlp = MLP(2, (3,), 1, rngs=nnx.Rngs(0))
    for bad in (mlp, nnx.state(mlp, nnx.Param), {"w_in": jnp.ones((3, 2)), "b": jnp.ones(4), "w_out": jnp.ones((3, 1))},
                {"w_in": jnp.ones((3, 2)), "b": jnp.ones(3), "w_out": jnp.ones(3)}):
        with pytest.raises(ValueError, match=r"particles: params must be a MeanField model or its parameters"):
            particles(bad)
    p = np.arange(6.0).reshape(3, 2)
    mom = particle_moments(jnp.asarray(p))
    np.testing.assert_allclose(mom["mean"], p.mean(0), rtol=1e-6)
    np.testing.assert_allclose(mom["second_moment"], p.T @ p / 3, rtol=1e-6)
    mf = MeanField(2, 4, 1, rngs=nnx.Rngs(0))
    assert particles(mf).shape == (4, 4) and float(mmd(particles(mf), particles(mf))) == 0.0


def test_flags_take_zero_dimensional_boolean_arrays():
    """``classifier=jnp.bool_(True)`` (or a NumPy 0-d boolean array) was refused as ``must be True or False``, as
    the integer sizes were; it is read as the bool it holds, and builds the model the Python bool builds.  Integers,
    strings, arrays with an axis and traced values are still refused."""
    x = jnp.ones((2, 3))
    ref = MLP(3, (4,), 2, classifier=True, rngs=nnx.Rngs(0))
    for flag in (jnp.bool_(True), np.array(True), jnp.asarray(True)):
        got = MLP(3, (4,), 2, classifier=flag, rngs=nnx.Rngs(0))
        assert got.classifier is True
        np.testing.assert_array_equal(np.asarray(got(x)), np.asarray(ref(x)))
    assert BatchNorm(2, use_running_average=jnp.bool_(False)).use_running_average is False
    for bad in (jnp.int32(1), jnp.array([True]), "True", 1):
        with pytest.raises(ValueError, match=r"MLP: classifier must be True or False"):
            MLP(3, (4,), 2, classifier=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MLP: classifier must be True or False"):
        jax.jit(lambda c: MLP(3, (4,), 2, classifier=c, rngs=nnx.Rngs(0)).classifier)(True)


def _normalised(z: np.ndarray, axes) -> np.ndarray:
    """``(z - mean) / std`` over ``axes`` in float64 (biased variance; the layers' ``eps = 1e-12`` is far below
    it)."""
    zc = z - z.mean(axis=axes, keepdims=True)
    return zc / np.sqrt(np.mean(zc * zc, axis=axes, keepdims=True))


def test_bfloat16_normalisation_is_the_exact_result_rounded_once():
    """A bfloat16 LayerNorm / BatchNorm computed its statistics and ``z - mean`` in bfloat16: the mean, rounded to
    8 bits, put an error of up to ``2^-9 |mean| / std`` into every output (0.195, in units of the unit-variance
    output, for inputs of mean 1 and deviation 0.01, where rounding the exact result to bfloat16 costs 0.008).
    Computed in float32 and rounded once, every output is within a bfloat16 rounding (relative ``2^-8``) of the
    float64 normalisation of the same (bfloat16) input, in training and in evaluation mode."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(1.0 + 0.01 * rng.standard_normal((8, 256)), jnp.bfloat16)
    z64 = np.asarray(z, np.float64)

    def check(y, want):
        y = np.asarray(y, np.float64)
        assert y.shape == want.shape and np.all(np.abs(y - want) <= 2.0**-8 * np.abs(want) + 1e-4)

    ln = LayerNorm(256, param_dtype=jnp.bfloat16)
    assert ln(z).dtype == jnp.bfloat16
    check(ln(z), _normalised(z64, (1,)))
    zb = z.T  # (256, 8): a batch of 256 for 8 channels
    bn = BatchNorm(8, param_dtype=jnp.bfloat16)
    check(bn(zb), _normalised(z64.T, (0,)))
    bn.eval()
    mean, var = bn.mean[...], bn.var[...]  # the running statistics, bfloat16
    check(bn(zb), (z64.T - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64)))

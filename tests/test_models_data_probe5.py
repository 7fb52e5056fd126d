"""Models and data, fifth probe: low-precision mean-field widths, parameter dtypes below 16 bits, and data held in
JAX's extra real dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import data
from quotient_sgd.models import CNN, MLP, LayerNorm, MeanField, Transformer


def test_float16_mean_field_wider_than_float16_range_averages_its_particles():
    """The mean over particles divided by the width cast to the parameters' dtype: in float16 a width above 65504
    was inf, and ``MeanField(3, 70000, 2, param_dtype="float16")`` gave outputs of exactly 0 for every input.  The
    output is now the mean of the float16 model's terms (computed here in float64) to float16 rounding."""
    m = MeanField(3, 70000, 2, param_dtype="float16", rngs=nnx.Rngs(0))
    x = np.array([[0.5, -1.0, 2.0], [1.0, 0.25, -0.5]])
    w_in, b, w_out = (np.asarray(v[...], np.float64) for v in (m.w_in, m.b, m.w_out))
    h = np.asarray(jnp.asarray(np.maximum(np.asarray(jnp.asarray(x, jnp.float16), np.float64) @ w_in.T + b, 0),
                               jnp.float16), np.float64)
    ref = h @ w_out / 70000
    out = m(x)
    assert out.dtype == jnp.float16
    scale = np.abs(h) @ np.abs(w_out) / 70000  # the size of the terms that cancel in the mean
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - ref), 2e-3 * scale)
    assert np.all(np.abs(ref) > 1e-3 * scale)  # (not a mean that is 0 anyway)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn"])
def test_parameter_dtypes_below_16_bits_are_refused_naming_the_argument(dtype):
    """JAX counts the ``ml_dtypes`` float8 / float4 types as real floating dtypes, and they were accepted: a
    float8_e4m3fn MLP (and CNN, Transformer) gave NaN outputs from its first call, silently; float8_e8m0fnu (no zero,
    no sign) NaN in every model; float4 failed inside ``jax.random`` with a bare ``TypeError``."""
    for make in (lambda: MLP(3, (4,), 2, param_dtype=dtype, rngs=nnx.Rngs(0)),
                 lambda: CNN(1, (3,), 2, param_dtype=dtype, rngs=nnx.Rngs(0)),
                 lambda: Transformer(5, 6, 2, 1, 4, param_dtype=dtype, rngs=nnx.Rngs(0)),
                 lambda: LayerNorm(3, param_dtype=dtype)):
        with pytest.raises(ValueError, match=r"param_dtype must be a real floating dtype \(one of float16, bfloat16, "
                                             rf"float32, float64; .*got {dtype}$"):
            make()
    assert MLP(3, (4,), 2, param_dtype="float16", rngs=nnx.Rngs(0))(np.ones((1, 3))).dtype == jnp.float16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_make_dataset_reads_jax_extra_real_dtypes(dtype):
    """A bfloat16 (or float8) input or target is a real array, but NumPy gives it ``kind "V"`` and it was refused
    as ``x_train must be a real or boolean array ..., got dtype bfloat16``.  It is now read as the float32 values it
    holds (exactly); a NaN in it is still refused."""
    x = np.array([[0.5, -1.25], [2.0, 0.125], [3.0, -0.5]])
    ds = data.make_dataset(jnp.asarray(x, dtype), jnp.asarray([0, 1, 1], dtype), jnp.asarray(x[:1], dtype),
                           jnp.asarray([1], dtype), task="classification", num_classes=2, name="t")
    assert ds.x_train.dtype == jnp.float32 and ds.y_train.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ds.x_train), x)
    np.testing.assert_array_equal(np.asarray(ds.y_train), [0, 1, 1])
    reg = data.make_dataset(x, jnp.asarray(x, dtype), x[:1], jnp.asarray(x[:1], dtype), task="regression",
                            num_classes=2, name="t")
    np.testing.assert_array_equal(np.asarray(reg.y_train), x)
    with pytest.raises(ValueError, match=r"x_train holds 1 value\(s\) that are not finite"):
        data.make_dataset(jnp.asarray(np.where(x == 3.0, np.nan, x), dtype), [0, 1, 1], x[:1], [1],
                          task="classification", num_classes=2, name="t")


def test_generators_take_seeds_beyond_64_bits():
    """NumPy seeds its generators from integers of any size, but a seed of 2^64 or more was refused with the
    self-contradicting ``seed=18446744073709551616 is not allowed; need an integer >= 0`` (NumPy made the Python
    integer an object array).  Such seeds now give their own data, deterministically."""
    a, b = (data.teacher_student(seed=s, n_train=3, n_test=1, din=2) for s in (2**64, 2**100))
    again = data.teacher_student(seed=2**100, n_train=3, n_test=1, din=2)
    np.testing.assert_array_equal(np.asarray(b.x_train), np.asarray(again.x_train))
    assert not np.array_equal(np.asarray(a.x_train), np.asarray(b.x_train))
    with pytest.raises(ValueError, match=r"seed=-1 is not allowed; need an integer >= 0"):
        data.teacher_student(seed=-1)


@pytest.mark.parametrize("sampler", ["swap_or_not", "top_k"])
def test_sample_indices_refuses_more_examples_than_int32_indices_reach(sampler):
    """The indices are int32: for ``n = 2^32 - 5`` the swap-or-not sampler overflowed its uint32 arithmetic and
    returned 50027 negative indices among 100000, for ``n >= 2^32`` it failed with a bare ``OverflowError``, and
    ``top_k`` with ``lax.top_k``'s own error.  ``n`` is now refused naming the argument and the range."""
    for n in (2**31, 2**32 - 5, 2**40):
        with pytest.raises(ValueError, match=rf"sample_indices: n={n} is not allowed; need an integer in \[0, 2\^31\)"):
            data.sample_indices(jax.random.key(0), n, 4, sampler)
    if sampler == "swap_or_not":  # (O(batch) work: the largest n is still drawn from)
        out = np.asarray(data.sample_indices(jax.random.key(0), 2**31 - 1, 3, sampler))
        assert len(set(out.tolist())) == 3 and out.min() >= 0


def test_rngs_without_a_parameter_stream_are_refused_naming_the_argument():
    """``nnx.Rngs(dropout=0)`` is an ``nnx.Rngs`` but has neither a ``params`` nor a ``default`` stream: every model
    failed inside its first layer with flax's ``AttributeError: No RngStream named 'params' found in Rngs``."""
    for make in (lambda r: MLP(3, (4,), 2, rngs=r), lambda r: MeanField(3, 4, 2, rngs=r),
                 lambda r: Transformer(5, 6, 2, 1, 4, rngs=r)):
        with pytest.raises(ValueError, match=r": rngs must have a 'params' or a 'default' stream"):
            make(nnx.Rngs(dropout=0))
        a, b = make(nnx.Rngs(params=3)), make(nnx.Rngs(3))  # (a params stream alone, or the default)
        for u, v in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
            assert u.shape == v.shape


def test_bfloat16_batchnorm_running_mean_follows_the_batch_mean():
    """The running statistics were held in the parameters' dtype: in bfloat16 the average ``0.9 r + 0.1 b`` stops
    moving once ``0.1 |b - r|`` is below half the spacing of ``r`` (0.016 near 5.3), and stalled about one standard
    deviation of the input below the batch mean (400 batches of mean 5.3, deviation 0.2: -1.03 sd; 1.37 / 0.05:
    -0.37 sd), so the evaluation-mode outputs were shifted by as much.  They are now held in float32 (as flax's
    BatchNorm holds them) and follow the float64 recursion over the same batch."""
    from quotient_sgd.models import BatchNorm

    z = np.random.default_rng(0).normal(5.3, 0.2, size=(64, 1)).astype(np.float32)
    b = float(np.mean(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float64)))  # the batch mean of the bf16 input
    bn = BatchNorm(1, param_dtype=jnp.bfloat16)
    step = jax.jit(lambda stats: nnx.split((lambda m: (m(z), m)[1])(nnx.merge(gd, stats)))[1])
    gd, stats = nnx.split(bn)
    r = 0.0
    for _ in range(60):
        stats = step(stats)
        r = 0.9 * r + 0.1 * b
    bn = nnx.merge(gd, stats)
    assert abs(float(bn.mean[...][0]) - r) < 1e-3 * 0.2  # (was 5.094 against 5.29)
    assert bn.mean[...].dtype == jnp.float32 and bn.scale[...].dtype == jnp.bfloat16
    bn.use_running_average = True
    assert bn(z).dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(momentum="0.5"), r"BatchNorm: momentum must be a number in \[0, 1\], got '0.5'"),
    (dict(eps="1e-5"), r"BatchNorm: eps must be a finite number >= 0, got '1e-5'"),
])
def test_norm_options_given_as_text_are_refused(kwargs, match):
    """``BatchNorm(momentum="0.5")`` and ``eps="1e-5"`` were read through ``float`` as the numbers the text spells,
    where every other non-number is refused (a config typo passed on as a string would train silently).  Text is now
    refused, naming the option; the numbers themselves are still taken."""
    from quotient_sgd.models import BatchNorm

    with pytest.raises(ValueError, match=match):
        BatchNorm(4, **kwargs)
    with pytest.raises(ValueError, match=r"LayerNorm: eps must be a finite number >= 0, got '1e-5'"):
        LayerNorm(4, eps="1e-5")
    assert BatchNorm(4, momentum=0.5, eps=1e-5).momentum == 0.5

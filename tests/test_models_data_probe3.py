"""Models and data, third probe: host tokens beyond 32 bits, empty sequences and images, the attention layer and
the normalisation layers on inputs of other shapes and dtypes, an empty batch through BatchNorm, and the data
generators' sizes given as JAX integers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import data
from quotient_sgd.models import CNN, BatchNorm, CausalSelfAttention, LayerNorm, Transformer


@pytest.fixture(scope="module")
def transformer():
    return Transformer(5, 4, 2, 1, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [
    np.array([[2**32 + 3, 1]]),  # int64: jnp.asarray wrapped it to token 3 (x64 off)
    np.array([[2**32 + 3, 1]], np.uint64),
    np.array([[-2**32 + 1, 1]]),  # wrapped to token 1
    [[2**32 + 3, 1]],
])
def test_host_tokens_beyond_32_bits_are_refused_not_wrapped(transformer, bad):
    """Without x64, JAX converts int64 / uint64 host arrays to 32 bits by wrapping: 2^32 + 3 was read as token 3
    (the outputs equal those of [[3, 1]]) with no error; the range check saw the wrapped values."""
    with pytest.raises(ValueError, match=r"Transformer: tokens must be integers in \[0, vocab_size=5\), got values "
                                         r"from -?\d+ to \d+"):
        transformer(bad)
    with pytest.raises(ValueError, match=r"Transformer: tokens must be integer token ids"):
        transformer([[2**70, 1]])  # beyond 64 bits: NumPy holds Python ints (object dtype)
    # in-range host tokens of any integer dtype give the same outputs as the device array
    ref = transformer(jnp.asarray([[3, 1]], jnp.int32))
    for ok in (np.array([[3, 1]], np.int64), np.array([[3, 1]], np.uint64), [[3, 1]]):
        np.testing.assert_array_equal(np.asarray(transformer(ok)), np.asarray(ref))


def test_empty_sequences_give_empty_logits(transformer):
    """A 1-D empty sequence (and an empty sequence under several batch axes) failed with a bare ZeroDivisionError in
    a reshape to (-1, 0); a (B, 0) batch already gave (B, 0, V)."""
    assert transformer(jnp.zeros((0,), jnp.int32)).shape == (0, 5)
    assert transformer(np.zeros((2, 3, 0), np.int64)).shape == (2, 3, 0, 5)


def test_attention_layer_checks_and_casts_its_input():
    """``CausalSelfAttention`` (exported) failed on a wrong feature size or a one-sequence input with a bare einsum
    error, and on an input of another dtype than its parameters (float16, int) with a TypePromotionError under
    strict promotion; it now reads (..., T, d_model) real inputs in its parameters' dtype, as the models do."""
    attn = CausalSelfAttention(4, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 1, 5, 4))
    batch = attn(x.reshape(2, 5, 4))
    assert batch.shape == (2, 5, 4) and batch.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(attn(x)), np.asarray(batch).reshape(2, 1, 5, 4))
    np.testing.assert_allclose(np.asarray(attn(x[1, 0])), np.asarray(batch[1]), rtol=1e-5, atol=1e-6)
    half = x.reshape(2, 5, 4).astype(jnp.float16)
    np.testing.assert_array_equal(np.asarray(attn(half)), np.asarray(attn(half.astype(jnp.float32))))
    assert attn(jnp.ones((2, 5, 4), jnp.int32)).dtype == jnp.float32
    # causal: position t reads positions <= t only
    changed = attn(x.reshape(2, 5, 4).at[:, 3:].set(7.0))
    np.testing.assert_array_equal(np.asarray(changed[:, :3]), np.asarray(batch[:, :3]))
    assert not np.allclose(np.asarray(changed[:, 3:]), np.asarray(batch[:, 3:]))
    for bad in (jnp.ones((1, 3, 5)), jnp.ones((4,))):
        with pytest.raises(ValueError, match=r"CausalSelfAttention: x must be \(\.\.\., T, d_model=4\).*got shape"):
            attn(bad)
    with pytest.raises(ValueError, match="CausalSelfAttention: x must hold real numbers"):
        attn(jnp.ones((1, 3, 4), jnp.complex64))


@pytest.mark.parametrize("make", [lambda: LayerNorm(3), lambda: BatchNorm(3),
                                  lambda: BatchNorm(3, use_running_average=True)])
def test_norm_layers_read_inputs_in_their_parameters_dtype(make):
    """``LayerNorm`` / ``BatchNorm`` (exported) failed on a float16 input to float32 parameters with a bare
    TypePromotionError under strict promotion, and on an integer input with 'data type int32 not inexact' from
    ``jnp.finfo``; they cast inputs to the parameters' dtype, as the models do (the same outputs as a float32
    input)."""
    z = jnp.asarray([[1.0, 2.0, 4.0], [3.0, -1.0, 0.0]], jnp.float32)
    ref = make()(z)
    for other in (z.astype(jnp.float16), z.astype(jnp.int32), np.asarray(z, np.float64)):
        out = make()(other)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match=r"(LayerNorm|BatchNorm): x must hold real numbers"):
        make()(z.astype(jnp.complex64))


def test_an_empty_batch_leaves_batchnorm_running_statistics_as_they_were():
    """The batch statistics of an empty batch are 0 / 0: the training-mode update wrote NaN into the running mean
    and variance (flax's own BatchNorm does too), so every evaluation-mode output after it was NaN.  An empty batch
    now returns an empty output and keeps them, eagerly and with the statistics threaded through jit as state."""
    layer = BatchNorm(2)
    z = jnp.asarray([[1.0, 2.0], [3.0, -5.0], [2.0, 0.5]])
    layer(z)
    before = {k: np.asarray(getattr(layer, k)[...]) for k in ("mean", "var")}
    assert not np.allclose(before["mean"], 0.0)  # a real update first: the statistics kept are the trained ones
    for empty in (jnp.zeros((0, 2)), jnp.zeros((2, 0, 2))):  # no element over the reduced axes
        assert layer(empty).shape == empty.shape
        for k, v in before.items():
            np.testing.assert_array_equal(np.asarray(getattr(layer, k)[...]), v)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def statistics_after(p, r, u):
        m = nnx.merge(graphdef, p, r)
        m(u)
        return nnx.split(m, nnx.Param, ...)[2]

    new_rest = statistics_after(params, rest, jnp.zeros((0, 2)))
    np.testing.assert_array_equal(np.asarray(new_rest["mean"][...]), before["mean"])
    layer.eval()
    assert np.all(np.isfinite(np.asarray(layer(z))))


def test_cnn_refuses_images_without_pixels():
    """An image of height or width 0 gave NaN outputs (the global average of no pixel), silently; it is refused
    naming x; a 1x1 image is still read."""
    model = CNN(1, (2,), 4, strides=2, rngs=nnx.Rngs(0))
    for shape in ((2, 0, 5, 1), (2, 5, 0, 1)):
        with pytest.raises(ValueError, match=r"CNN: x must be images of at least one pixel.*got shape"):
            model(jnp.ones(shape))
    for shape in ((1, 1, 1, 1),):
        out = model(jnp.ones(shape))
        assert out.shape == (shape[0], 4) and np.all(np.isfinite(np.asarray(out)))


def _arrays(ds):
    return [np.asarray(getattr(ds, f)) for f in ("x_train", "y_train", "x_test", "y_test")]


@pytest.mark.parametrize("make,kw", [
    (data.modular_arithmetic, dict(p=jnp.int32(7))),
    (data.sparse_parity, dict(n_bits=jnp.int32(6), k=np.array(2), n_train=jnp.uint8(20), n_test=jnp.int32(5))),
    (data.teacher_student, dict(n_train=jnp.int32(6), n_test=np.array(3), din=jnp.int32(2), dout=jnp.int16(2),
                                teacher_hidden=jnp.int32(3))),
])
def test_task_sizes_take_concrete_integer_arrays_as_the_seed_does(make, kw):
    """The seed takes a concrete JAX integer; the sizes refused one with a self-contradicting message
    ('p=Array(7, dtype=int32) is not allowed; need an integer >= 2').  They take it now, with the same data as
    the Python integer; floats, bools and arrays of more than one number are still refused."""
    ref = make(seed=1, **{k: int(v) for k, v in kw.items()})
    got = make(seed=jnp.int32(1), **kw)
    for a, b in zip(_arrays(got), _arrays(ref)):
        np.testing.assert_array_equal(a, b)
    assert type(got.num_classes) is int and got.num_classes == ref.num_classes
    name = make.__name__
    arg = next(iter(kw))
    for bad in (jnp.float32(7), jnp.bool_(True), np.array([7])):
        with pytest.raises(ValueError, match=rf"{name}: {arg}=.* is not allowed; need an integer"):
            make(**{**kw, arg: bad})


def test_models_that_would_ignore_their_input_are_refused():
    """A LayerNorm over one feature outputs its bias alone: a Transformer with d_model=1 gave the same logits for
    every token sequence (difference 0.0), and a CNN with norm='layer' and a one-channel layer gave outputs (and
    parameter gradients) that did not depend on x; both are refused at construction, naming the argument.  A
    one-channel layer under BatchNorm (per channel over batch and space) is fine."""
    with pytest.raises(ValueError, match=r"Transformer: d_model must be >= 2, got 1: .*not depend on the tokens"):
        Transformer(5, 1, 1, 1, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"CNN: norm='layer' needs at least 2 channels in every conv layer, got "
                                         r"channels=\(3, 1\)"):
        CNN(1, (3, 1), 2, norm="layer", rngs=nnx.Rngs(0))
    assert CNN(1, (1,), 2, norm="batch", rngs=nnx.Rngs(0)).norms[0].num_features == 1


@pytest.mark.parametrize("make", [lambda: LayerNorm(3, eps=0.0), lambda: BatchNorm(3, eps=0)])
def test_zero_eps_normalises_a_constant_input_to_zero(make):
    """``eps = 0`` is allowed (exact scale invariance), but a constant input gave ``0 * rsqrt(0) = NaN`` where the
    default eps maps it to 0 (so did a channel of zero running variance in evaluation mode); it maps to 0 now, with
    a finite gradient, and other inputs are normalised exactly as before (scale-invariant)."""
    layer = make()
    const = jnp.full((2, 3), 1.5)
    np.testing.assert_array_equal(np.asarray(layer(const)), 0.0)
    graphdef, state = nnx.split(make())
    grad = jax.grad(lambda u: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(u))))(const)
    assert np.all(np.isfinite(np.asarray(grad)))
    z = jnp.asarray([[1.0, 2.0, 4.0], [3.0, -1.0, 0.0]])
    y = np.asarray(make()(z))
    np.testing.assert_allclose(y, np.asarray(make()(z * 9.0)), rtol=1e-6, atol=1e-6)
    axis = -1 if isinstance(layer, LayerNorm) else 0
    np.testing.assert_allclose(y.var(axis), 1.0, rtol=1e-6)
    if isinstance(layer, BatchNorm):
        layer.eval()
        layer.var[...] = jnp.zeros((3,))  # the running variance of a channel that was constant in training
        layer.mean[...] = jnp.full((3,), 1.5)
        np.testing.assert_array_equal(np.asarray(layer(const)), 0.0)


@pytest.mark.parametrize("arg,bad,shown", [("x_train", np.nan, "nan"), ("x_test", -np.inf, "-inf"),
                                           ("x_train", 1e39, r"1e\+39"), ("y_train", np.inf, "inf"),
                                           ("y_test", np.nan, "nan")])
def test_make_dataset_refuses_inputs_and_regression_targets_that_are_not_finite(arg, bad, shown):
    """Classification targets had to be finite, but a NaN or infinite input or regression target was accepted
    silently (and 1e39 became inf in the float32 cast, with only a RuntimeWarning): every loss it entered was NaN or
    inf, reported by a run as a divergence at its first step.  They are refused naming the argument and the
    entry."""
    arrays = dict(x_train=np.zeros((4, 2)), y_train=np.zeros((4, 1)), x_test=np.zeros((2, 2)), y_test=np.zeros((2, 1)))
    arrays[arg][1, 0] = bad
    what = "inputs" if arg.startswith("x") else "regression targets"
    with pytest.raises(ValueError, match=rf"make_dataset: {arg} holds 1 value\(s\) that are not finite in float32 "
                                         rf"\(the first, {shown}, at index \(1, 0\)\); need finite {what}"):
        data.make_dataset(**arrays, task="regression", num_classes=1, name="probe")
    arrays[arg][1, 0] = 3e38  # large but within float32: kept
    ds = data.make_dataset(**arrays, task="regression", num_classes=1, name="probe")
    assert np.isfinite(np.asarray(getattr(ds, arg))).all() and float(getattr(ds, arg)[1, 0]) == np.float32(3e38)


@pytest.mark.parametrize("enable_x64", [False, True])
def test_teacher_student_noise_given_as_a_jax_scalar_is_read_on_the_host(enable_x64):
    """A JAX ``noise`` made the targets a JAX computation: under x64 with strict promotion it failed with a bare
    TypePromotionError against the float64 NumPy draws, without x64 the targets were summed in float32 on device
    (not the host arrays the generator promises).  The data equal those of the same Python float."""
    with jax.enable_x64(enable_x64):
        got = data.teacher_student(seed=2, n_train=40, n_test=8, noise=jnp.float32(0.3))
        ref = data.teacher_student(seed=2, n_train=40, n_test=8, noise=float(np.float32(0.3)))
    for a, b in zip(_arrays(got), _arrays(ref)):
        np.testing.assert_array_equal(a, b)


def test_split_fractions_given_as_jax_scalars_count_in_double_precision():
    """``round(train_fraction * p^2)`` (and the digits' ``round(test_fraction * n)``) was computed in float32 for a
    JAX float32 fraction: 0.27777779 * 9 = 2.50000011 rounds to 3 pairs, but 2.5 in float32 rounded to 2.  The
    counts are those of the number the scalar holds, and so are the splits."""
    t = jnp.float32(0.2777778)
    ds = data.modular_arithmetic(p=3, train_fraction=t)
    assert ds.num_train == round(float(t) * 9) == 3
    for a, b in zip(_arrays(ds), _arrays(data.modular_arithmetic(p=3, train_fraction=float(t)))):
        np.testing.assert_array_equal(a, b)
    n = 1797
    u = next(u for u in (np.float32((k + 0.5) / n) for k in range(1, n - 1))
             if round(float(u) * n) != int(round(np.float32(u) * np.float32(n))))  # float32 rounding changed it
    assert data.digits(test_fraction=jnp.float32(u)).num_test == round(float(u) * n)


def test_make_dataset_refuses_an_empty_training_split():
    """An empty training split was accepted: the full batch's loss was 0 / 0 (weights summing to 0) and batch_fn
    refused every batch size asking for 'an integer in [1, 0]'.  It is refused; an empty test split is still
    taken (the generators make one with n_test=0)."""
    with pytest.raises(ValueError, match=r"make_dataset: x_train holds no example \(shape \(0, 2\)\); need at least "
                                         r"one training example"):
        data.make_dataset(np.zeros((0, 2)), np.zeros((0,), int), np.zeros((2, 2)), np.array([0, 1]),
                          task="classification", num_classes=2, name="probe")
    ds = data.make_dataset(np.zeros((2, 2)), np.array([0, 1]), np.zeros((0, 2)), np.zeros((0,), int),
                           task="classification", num_classes=2, name="probe")
    assert (ds.num_train, ds.num_test) == (2, 0)

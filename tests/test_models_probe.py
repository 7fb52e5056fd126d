"""Constructor arguments, input checks and BatchNorm state under jax.grad of quotient_sgd.models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_allclose

from quotient_sgd.models import (
    CNN,
    MLP,
    BatchNorm,
    CausalSelfAttention,
    DeepLinear,
    LayerNorm,
    MeanField,
    Transformer,
)

_MAKERS = {
    "MLP": lambda **kw: MLP(2, (3,), 2, **kw),
    "DeepLinear": lambda **kw: DeepLinear(2, (3,), 2, **kw),
    "MeanField": lambda **kw: MeanField(2, 3, 2, **kw),
    "CNN": lambda **kw: CNN(1, (2,), 2, **kw),
    "Transformer": lambda **kw: Transformer(5, 4, 2, 1, 4, **kw),
}


@pytest.mark.parametrize("name", ["MLP", "CNN", "Transformer"])
@pytest.mark.parametrize("bad", ["False", 0, 1, None])
def test_classifier_must_be_a_bool(name, bad):
    """``classifier="False"`` was read as ``bool("False") = True``: a log-softmax head and a translation symmetry
    the caller had turned off."""
    with pytest.raises(ValueError, match=rf"{name}: classifier must be True or False, got {bad!r}"):
        _MAKERS[name](classifier=bad, rngs=nnx.Rngs(0))
    assert _MAKERS[name](classifier=np.bool_(False), rngs=nnx.Rngs(0)).classifier is False


@pytest.mark.parametrize("name", sorted(_MAKERS))
@pytest.mark.parametrize("bad,shown", [(jnp.int32, "int32"), ("float33", "'float33'"), (jnp.bool_, "bool"),
                                       (jnp.complex64, "complex64"), (None, "None")])
def test_param_dtype_must_be_real_floating(name, bad, shown):
    """An integer ``param_dtype`` failed in the first call with a dtype-promotion error naming neither the model
    nor the argument; an unknown name with NumPy's error."""
    with pytest.raises(ValueError, match=rf"{name}: param_dtype must be a real floating dtype .*got {shown}$"):
        _MAKERS[name](param_dtype=bad, rngs=nnx.Rngs(0))


def test_bfloat16_params_give_bfloat16_outputs():
    x = jnp.ones((2, 2), jnp.float32)
    assert MLP(2, (3,), 2, classifier=True, param_dtype="bfloat16", rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", sorted(_MAKERS))
@pytest.mark.parametrize("bad", [None, 0])
def test_rngs_must_be_nnx_rngs(name, bad):
    with pytest.raises(ValueError, match=rf"{name}: rngs must be an nnx.Rngs .*got {type(bad).__name__} {bad!r}"):
        _MAKERS[name](rngs=bad)


@pytest.mark.parametrize("d_model,num_heads,needle", [
    (4, 0, "CausalSelfAttention: num_heads must be an integer >= 1, got 0"),  # was ZeroDivisionError
    (-4, 2, "CausalSelfAttention: d_model must be an integer >= 1, got -4"),  # was math domain error
    (10, 4, r"CausalSelfAttention: d_model \(10\) must be divisible by num_heads \(4\)"),
])
def test_attention_sizes_are_checked(d_model, num_heads, needle):
    with pytest.raises(ValueError, match=needle):
        CausalSelfAttention(d_model, num_heads, rngs=nnx.Rngs(0))


def test_transformer_heads_must_divide_d_model():
    with pytest.raises(ValueError, match=r"Transformer: d_model \(10\) must be divisible by num_heads \(4\)"):
        Transformer(5, 10, 4, 1, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("make,needle", [
    (lambda: LayerNorm(0), "LayerNorm: num_features must be an integer >= 1, got 0"),
    (lambda: LayerNorm(3, eps=-1.0), "LayerNorm: eps must be a finite number >= 0, got -1.0"),
    (lambda: BatchNorm(3, eps=float("nan")), "BatchNorm: eps must be a finite number >= 0, got nan"),
    (lambda: BatchNorm(-1), "BatchNorm: num_features must be an integer >= 1, got -1"),
    (lambda: BatchNorm(3, momentum=2.0), r"BatchNorm: momentum must be a number in \[0, 1\], got 2.0"),
    (lambda: BatchNorm(3, momentum="a"), r"BatchNorm: momentum must be a number in \[0, 1\], got 'a'"),
    (lambda: BatchNorm(3, use_running_average="no"), "BatchNorm: use_running_average must be True or False"),
    (lambda: LayerNorm(3, param_dtype=jnp.int32), "LayerNorm: param_dtype must be a real floating dtype"),
])
def test_norm_layer_arguments_are_checked(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


@pytest.mark.parametrize("layer", [LayerNorm(3), BatchNorm(3), BatchNorm(3, use_running_average=True)])
def test_norm_layers_check_the_feature_axis(layer):
    """A last axis of the wrong size failed with JAX's broadcasting error, naming neither layer nor size."""
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}: the input must have num_features=3 .*got shape \(2, 4\)"):
        layer(jnp.ones((2, 4), jnp.float32))
    assert layer(jnp.ones((2, 3), jnp.float32)).shape == (2, 3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_])
def test_transformer_refuses_non_integer_tokens(dtype):
    model = Transformer(5, 4, 2, 1, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"Transformer: tokens must be integer token ids .*got dtype "
                                         rf"{jnp.dtype(dtype).name}"):
        model(jnp.zeros((2, 3), dtype))


def test_batchnorm_statistics_thread_through_grad():
    """``jax.grad`` of a loss that merges a BatchNorm CNN from state split outside it (the plain NNX pattern)
    failed with NNX's TraceContextError: the layer mutated the running statistics' Variables, created at the
    outer trace.  Now the merged model takes new Variables: the gradient and the returned statistics equal those
    of the same loss traced under jit first (where the state is a traced argument), and the state passed in is
    unchanged."""
    model = CNN(1, (3,), 2, norm="batch", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 1)) * 2.0 + 1.0
    before = jax.tree.map(np.asarray, rest)

    def loss(p, r):
        m = nnx.merge(graphdef, p, r)
        y = m(x)
        return jnp.sum(jnp.sin(y)), nnx.split(m, nnx.Param, ...)[2]

    grads, new_rest = jax.jit(lambda p: jax.grad(lambda q: loss(q, rest), has_aux=True)(p))(params)
    ref_grads, ref_rest = jax.grad(jax.jit(loss), has_aux=True)(params, rest)
    assert_tree_allclose(grads, ref_grads, rtol=1e-6, atol=1e-7)
    assert_tree_allclose(new_rest, ref_rest, rtol=1e-6, atol=1e-7)
    conv_out = np.asarray(model.convs[0](x))
    np.testing.assert_allclose(new_rest["norms"][0]["mean"][...], 0.1 * conv_out.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-7)
    assert_tree_allclose(rest, before, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [LayerNorm(4, param_dtype=jnp.float16), BatchNorm(4, param_dtype=jnp.float16),
                                   BatchNorm(4, use_running_average=True, param_dtype=jnp.float16)])
def test_float16_norm_of_a_constant_input_is_zero(layer):
    """``NORM_EPS = 1e-12`` rounds to 0 in float16, so a constant input gave ``0 * rsqrt(0) = NaN`` (the module's
    guard against 0 / 0 was lost); the normalisation is now computed in float32 there: the output is ``bias`` = 0,
    in float16 (with a finite gradient through the batch statistics), and a non-constant input is still
    normalised (mean 0, variance 1)."""
    if isinstance(layer, BatchNorm) and layer.use_running_average:
        layer.var[...] = jnp.zeros((4,), layer.var[...].dtype)  # the running variance of a channel that was constant
        layer.mean[...] = jnp.ones((4,), layer.mean[...].dtype)
    z = jnp.ones((3, 4), jnp.float16)
    y = layer(z)
    assert y.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)
    if not (isinstance(layer, BatchNorm) and layer.use_running_average):  # (there dy/dz = 1 / sqrt(eps) = 1e6)
        graphdef, state = nnx.split(layer)
        grad = jax.jit(jax.grad(lambda u: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(u).astype(jnp.float32)))))(z)
        assert grad.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(grad, np.float32)))
        x = jax.random.normal(jax.random.key(0), (8, 4), jnp.float16) * jnp.float16(3) + jnp.float16(1)
        y = np.asarray(layer(x), np.float32)
        axis = -1 if isinstance(layer, LayerNorm) else 0
        np.testing.assert_allclose(y.mean(axis), 0.0, atol=5e-3)
        np.testing.assert_allclose(y.var(axis), 1.0, atol=5e-3)


def test_float16_cnn_with_layer_norm_is_finite_on_a_blank_image():
    model = CNN(1, (3,), 2, norm="layer", param_dtype=jnp.float16, rngs=nnx.Rngs(0))
    out = jax.jit(model)(jnp.zeros((2, 4, 4, 1), jnp.float32))  # (one program, not one per operation)
    assert out.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_transformer_too_long_sequence_names_the_model():
    model = Transformer(5, 4, 2, 1, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Transformer: tokens have sequence length 5, which exceeds max_len=4 .*"
                                         r"at most max_len tokens"):
        jax.jit(model)(jnp.zeros((2, 5), jnp.int32))
    assert jax.jit(model)(jnp.zeros((2, 4), jnp.int32)).shape == (2, 4, 5)  # max_len itself is allowed

"""Shapes, argument validation, determinism and train/eval state of quotient_sgd.models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import _tree
from quotient_sgd.models import CNN, MLP, DeepLinear, MeanField, Transformer

from helpers import assert_tree_allclose, tree_allclose


def _params(model):
    return nnx.split(model, nnx.Param, ...)[1]


# a model's forward pass as one compiled program per model structure and input shape (called eagerly, the model
# dispatches and compiles op by op: ~0.7 s a shape for a small Transformer against ~0.2 s); training-mode batch
# statistics are updated through nnx.jit as in an eager call
_call = nnx.jit(lambda model, x: model(x))


def test_mlp_shapes_and_paths():
    model = MLP(3, (5, 4), 2, activation="gelu", rngs=nnx.Rngs(0))
    assert model(jnp.ones((7, 3), jnp.float32)).shape == (7, 2)
    flat = {p: v.shape for p, v in _tree.flatten(_params(model))[0].items()}
    assert flat == {("layers", 0, "kernel"): (3, 5), ("layers", 0, "bias"): (5,),
                    ("layers", 1, "kernel"): (5, 4), ("layers", 1, "bias"): (4,),
                    ("layers", 2, "kernel"): (4, 2), ("layers", 2, "bias"): (2,)}


@pytest.mark.parametrize("make", [
    lambda a: MLP(2, (3,), 1, activation=a, rngs=nnx.Rngs(0)),
    lambda a: MeanField(2, 4, 1, activation=a, rngs=nnx.Rngs(0)),
    lambda a: CNN(1, (2,), 3, activation=a, rngs=nnx.Rngs(0)),
    lambda a: Transformer(5, 4, 2, 1, 4, activation=a, rngs=nnx.Rngs(0)),
])
@pytest.mark.parametrize("bad", ["swish", "ReLU", None])
def test_activation_validation(make, bad):
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'.*got"):
        make(bad)


def test_cnn_norm_validation():
    with pytest.raises(ValueError, match="norm must be one of"):
        CNN(1, (2,), 3, norm="group", rngs=nnx.Rngs(0))


def test_classifier_outputs_are_normalised_log_probs():
    x = jax.random.normal(jax.random.key(0), (6, 3))
    model = MLP(3, (4,), 5, classifier=True, rngs=nnx.Rngs(0))
    y = model(x)
    np.testing.assert_allclose(np.exp(np.asarray(y)).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y, jax.nn.log_softmax(model.logits(x)), rtol=1e-6)
    reg = MLP(3, (4,), 5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(reg(x), model.logits(x))


@pytest.mark.parametrize("hw", [8, 28])
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_cnn_shapes(hw, norm):
    model = CNN(1, (3, 4), 10, norm=norm, strides=(1, 2), rngs=nnx.Rngs(0))
    assert _call(model, jnp.ones((2, hw, hw, 1), jnp.float32)).shape == (2, 10)
    p = _params(model)
    assert p["convs"][1]["kernel"].shape == (3, 3, 3, 4)
    assert ("bias" in p["convs"][0]) == (norm != "batch")
    assert p["head"]["kernel"].shape == (4, 10)


def test_transformer_shapes_and_paths():
    V, D, H, L, T = 7, 8, 2, 2, 5
    model = Transformer(V, D, H, L, T, rngs=nnx.Rngs(0), mlp_ratio=2)
    tokens = jnp.zeros((3, 4), jnp.int32)
    assert _call(model, tokens).shape == (3, 4, V)
    a = _params(model)["blocks"][1]["attn"]
    for n in ("w_q", "w_k", "w_v"):
        assert a[n].shape == (H, D, D // H)
    for n in ("b_q", "b_k", "b_v"):
        assert a[n].shape == (H, D // H)
    assert a["w_o"].shape == (H, D // H, D) and a["b_o"].shape == (D,)
    assert _params(model)["unembed"]["kernel"].shape == (D, V)
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, T + 1), jnp.int32))


def test_transformer_one_sequence_and_several_batch_axes():
    """One sequence ``(T,)`` gives ``(T, V)`` (it gave ``(1, T, V)``, a batch of one), equal to its row of a batch;
    several batch axes ``(A, B, T)`` give ``(A, B, T, V)``, equal to the flattened batch; a scalar is refused."""
    model = Transformer(7, 8, 2, 1, 6, rngs=nnx.Rngs(0))
    batch = jax.random.randint(jax.random.key(0), (6, 5), 0, 7)
    out = _call(model, batch)
    one = _call(model, batch[2])
    np.testing.assert_allclose(one, out[2], rtol=1e-6, atol=1e-6)
    assert one.shape == (5, 7)
    np.testing.assert_allclose(_call(model, batch.reshape(2, 3, 5)), out.reshape(2, 3, 5, 7), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sequence axis"):
        model(jnp.int32(3))
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((7,), jnp.int32))


def test_transformer_is_causal():
    model = Transformer(7, 8, 2, 2, 6, rngs=nnx.Rngs(0))
    t1 = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
    t2 = t1.at[0, 4].set(0)
    y1, y2 = _call(model, t1), _call(model, t2)
    np.testing.assert_array_equal(y1[:, :4], y2[:, :4])
    assert not np.allclose(y1[:, 4:], y2[:, 4:])


def test_meanfield_formula():
    model = MeanField(3, 5, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    w_in, b, w_out = model.w_in[...], model.b[...], model.w_out[...]
    expected = sum(np.outer(np.maximum(x @ w_in[j] + b[j], 0), w_out[j]) for j in range(5)) / 5
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda r: MLP(3, (4,), 2, rngs=r),
    lambda r: DeepLinear(3, (4,), 2, rngs=r),
    lambda r: CNN(1, (2,), 3, norm="batch", rngs=r),
    lambda r: Transformer(5, 4, 2, 1, 4, rngs=r),
    lambda r: MeanField(3, 4, 2, rngs=r),
])
def test_determinism_per_rngs(make):
    p0 = _params(make(nnx.Rngs(0)))
    assert_tree_allclose(p0, _params(make(nnx.Rngs(0))), rtol=0, atol=0)
    assert not tree_allclose(p0, _params(make(nnx.Rngs(1))))


def test_float64_params(x64):
    model = MLP(2, (3,), 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert model(jnp.ones((2, 2), jnp.float32)).dtype == jnp.float64


def test_batchnorm_state_threading_in_jit():
    model = CNN(1, (3,), 2, norm="batch", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * 2.0 + 1.0

    @jax.jit
    def step(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        y = m(x)
        _, _, new_rest = nnx.split(m, nnx.Param, ...)
        return y, new_rest

    y, rest1 = step(params, rest, x)
    mean0, mean1 = rest["norms"][0]["mean"][...], rest1["norms"][0]["mean"][...]
    assert not np.allclose(mean0, mean1)  # training mode updates the running statistics
    # the update is r <- 0.9 r + 0.1 * (batch mean of the conv output)
    conv_out = model.convs[0](x)
    np.testing.assert_allclose(mean1, 0.1 * np.asarray(conv_out).mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
    # training mode output does not depend on the running statistics
    y2, rest2 = step(params, rest1, x)
    np.testing.assert_allclose(y, y2, rtol=1e-6)
    assert not np.allclose(rest2["norms"][0]["var"][...], rest1["norms"][0]["var"][...])

    # evaluation mode: uses the running statistics and leaves them alone; graphdef records the mode
    model.eval()
    graphdef_e, params_e, rest_e = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step_eval(params, rest, x):
        m = nnx.merge(graphdef_e, params, rest)
        y = m(x)
        return y, nnx.split(m, nnx.Param, ...)[2]

    ye1, r1 = step_eval(params, rest1, x)
    ye2, _ = step_eval(params, rest2, x)
    assert_tree_allclose(r1, rest1, rtol=0, atol=0)
    assert not np.allclose(ye1, ye2)
    assert not np.allclose(ye1, y)
    model.train()
    assert model.norms[0].use_running_average is False


_SLOW = pytest.mark.slow
# every kernel size / stride / odd-even size / norm in the fast run (each case compiles its own programs); the
# rest of the grid in the slow run
_PATCH_CASES = [pytest.param(k, s, hw, n, marks=() if (k, s, hw, n) in {
    (3, 1, 8, None), (5, 2, 8, "layer"), (2, 1, 5, "layer"), (3, 3, 28, None), (3, 2, 7, None)} else _SLOW)
    for (k, s, hw) in [(3, 1, 8), (3, 2, 7), (5, 2, 8), (2, 1, 5), (3, 3, 28)] for n in (None, "layer")]


@pytest.mark.parametrize("k,stride,hw,norm", _PATCH_CASES)
def test_cnn_patch_convolution_equals_xla_convolution(k, stride, hw, norm, x64):
    """The im2col convolution (default on CPU) is the same function as XLA's convolution, with the same
    gradient, for odd/even sizes, strides and kernel sizes (float64)."""
    kw = dict(kernel_size=k, strides=stride, norm=norm, param_dtype=jnp.float64)
    a = CNN(2, (3, 4), 5, conv_impl="patches", rngs=nnx.Rngs(0), **kw)
    b = CNN(2, (3, 4), 5, conv_impl="xla", rngs=nnx.Rngs(0), **kw)
    x = jax.random.normal(jax.random.key(1), (3, hw, hw, 2), jnp.float64)
    ga, pa = nnx.split(a, nnx.Param)
    gb, pb = nnx.split(b, nnx.Param)

    def outputs_and_grad(graphdef, p):
        """The outputs and the gradient of sum(sin(outputs)), in one jitted program per model (run eagerly, the
        model dispatched op by op through nnx.merge, seconds per call)."""
        def loss(q):
            y = nnx.merge(graphdef, q)(x)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
        return y, grad

    y_a, grad_a = outputs_and_grad(ga, pa)
    y_b, grad_b = outputs_and_grad(gb, pb)
    np.testing.assert_allclose(y_a, y_b, rtol=1e-12, atol=1e-12)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-12), grad_a, grad_b)


def test_cnn_conv_impl_is_checked():
    with pytest.raises(ValueError, match="conv_impl"):
        CNN(1, (3,), 2, conv_impl="fft", rngs=nnx.Rngs(0))
    assert CNN(1, (3, 3), 2, strides=np.int64(2), rngs=nnx.Rngs(0)).strides == (2, 2)  # NumPy integers accepted


@pytest.mark.parametrize("hidden", [8, (8, 0), (8, 2.5), "8"])
def test_mlp_hidden_must_be_a_sequence_of_widths(hidden):
    with pytest.raises(ValueError, match="hidden must be a sequence of widths"):
        MLP(4, hidden, 3, rngs=nnx.Rngs(0))
    assert MLP(4, [np.int64(8)], 3, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape == (2, 3)


@pytest.mark.parametrize("make,needle", [
    (lambda: CNN(1, 8, 10, rngs=nnx.Rngs(0)), "CNN: channels must be a sequence of widths >= 1"),
    (lambda: CNN(1, (), 10, rngs=nnx.Rngs(0)), "CNN: channels must be a non-empty sequence"),
    (lambda: CNN(0, (4,), 10, rngs=nnx.Rngs(0)), "CNN: in_channels must be an integer >= 1, got 0"),
    (lambda: MeanField(4, 0, 1, rngs=nnx.Rngs(0)), "MeanField: width must be an integer >= 1, got 0"),
    (lambda: Transformer(10, 32, 0, 1, 8, rngs=nnx.Rngs(0)), "Transformer: num_heads must be an integer >= 1"),
    (lambda: Transformer(10, 32, 4, 1, 8, mlp_ratio=0, rngs=nnx.Rngs(0)), "Transformer: mlp_ratio must be"),
    (lambda: MLP(0, (4,), 2, rngs=nnx.Rngs(0)), "MLP: din must be an integer >= 1, got 0"),
    (lambda: DeepLinear(3, (4, -1), 2, rngs=nnx.Rngs(0)), "DeepLinear: widths must be a sequence of widths"),
    (lambda: CNN(1, (4,), 2, strides=0, rngs=nnx.Rngs(0)), "CNN: strides must be an integer >= 1"),
    (lambda: CNN(1, (4, 4), 2, strides=(1, -1), rngs=nnx.Rngs(0)), "CNN: strides must be an integer >= 1"),
    (lambda: CNN(1, (4,), 2, strides=1.5, rngs=nnx.Rngs(0)), "CNN: strides must be an integer >= 1"),
    (lambda: CNN(1, (4, 4), 2, strides=(1,), rngs=nnx.Rngs(0)), "one such integer per conv layer"),
    (lambda: CNN(1, (4,), 2, norm="layer", norm_eps=-1e-5, rngs=nnx.Rngs(0)), "CNN: norm_eps must be a finite"),
    (lambda: Transformer(10, 32, 4, 1, 8, norm_eps=-1.0, rngs=nnx.Rngs(0)), "Transformer: norm_eps must be a"),
])
def test_model_sizes_are_checked(make, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        make()
